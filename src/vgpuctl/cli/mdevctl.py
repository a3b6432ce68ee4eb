"""mdevctl 1.2.0's command line on vgpuctl's mdev core.

Run as ``mdevctl`` or ``lsmdev`` (a link to vgpuctl by that name) or as ``vgpuctl mdevctl ...``,
vgpuctl behaves as Debian 12's mdevctl 1.2.0 (/work/shared/spec/peers.md section 1): the same
options (libvirt's ``--parent=P --jsonfile=/dev/stdin --uuid=U`` included), byte-identical stdout
for ``list`` and ``types`` (text and ``--dumpjson``, with 1.2.0's extra trailing newline), the same
config files, and exit status 0, 1 (``Error: <message>`` on stderr, anyhow's ``Caused by:`` when
there is a cause) or 2 (usage errors, ``error: ...``).

The work is the core's: sysfs reads and writes (:mod:`vgpuctl.mdev.sysfs`), the checks of parents and
types (:mod:`vgpuctl.mdev.report`), the definition files (:mod:`vgpuctl.mdev.definitions`). This module
keeps mdevctl's order of checks and says the core's errors in mdevctl's words, from their data
(:func:`in_mdevctl_words`). It stands in for mdevctl: it uses the functions below vgpuctl's Manager,
so vgpuctl's ownership rule does not apply and nothing it makes is recorded as vgpuctl's; what vgpuctl
had made and it removes is forgotten. Mutations take vgpuctl's per-parent lock, so the two never
interleave. Not supported: mdevctl's callout scripts.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import sys
import time
import uuid as uuidlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, NoReturn

from vgpuctl.base.errors import Conflict, InvalidInput, KernelError, NotFound, VgpuError
from vgpuctl.base.state import StateDir
from vgpuctl.host import HostRoot
from vgpuctl.host.root import path_name, relative_path
from vgpuctl.mdev import definitions, sysfs
from vgpuctl.mdev.definitions import Definition
from vgpuctl.mdev.report import check_parent, check_type
from vgpuctl.mdev.state import Journal
from vgpuctl.mdev.sysfs import ActiveDevice, MdevType

VERSION = "1.2.0"
_HEX = "[0-9a-fA-F]"
_HYPHENATED = rf"{_HEX}{{8}}-{_HEX}{{4}}-{_HEX}{{4}}-{_HEX}{{4}}-{_HEX}{{12}}"
# The forms the Rust uuid crate (mdevctl's parser of -u and of file names) accepts.
UUID_FORMS = re.compile(rf"(?:urn:uuid:)?{_HYPHENATED}|\{{{_HYPHENATED}\}}|{_HEX}{{32}}")

# parent -> [(device, " (active)" / " (defined)" / "")], as mdevctl lists them
Listing = dict[str, list[tuple[Definition, str]]]


class MdevctlError(Exception):
    """A runtime error (exit status 1); ``cause`` is what anyhow prints under ``Caused by:``."""

    def __init__(self, message: str, cause: str | None = None) -> None:
        super().__init__(message)
        self.cause = cause


def _io(errno: int | None, fallback: str = "") -> str:
    """An OS error as Rust's std::io::Error displays it."""
    return f"{os.strerror(errno)} (os error {errno})" if errno else fallback


# serde_json's words for what Python's json decoder says
_SERDE = {"Expecting value": "expected value", "Extra data": "trailing characters"}


def in_mdevctl_words(error: VgpuError) -> MdevctlError:
    """What mdevctl 1.2.0 says (message, cause) for one of the core's errors, from its data."""
    data, cause = error.data, _io(error.errno) or None
    if isinstance(error, Conflict) and isinstance(error.holder, ActiveDevice):  # MDev::start's own checks
        holder = error.holder
        if holder.parent != error.parent:
            return MdevctlError("Device exists under different parent")
        if holder.type_id != error.type_id:
            return MdevctlError("Device exists with different type")
        return MdevctlError("Device already exists")
    if isinstance(error, NotFound) and error.what == "parent":
        hint = data.get("hint")
        return MdevctlError(f"Unable to find parent device '{error.parent}'" + (f". Did you mean '{hint}'?" if hint
                                                                                 else ""))
    if isinstance(error, NotFound) and error.what == "type":
        return MdevctlError(f"Parent {error.parent} does not support mdev type {error.type_id}")
    if isinstance(error, KernelError) and error.what == "device":
        if data.get("action") == "create":
            return MdevctlError(f"Failed to create mdev {error.uuid}, type {error.type_id} on {error.parent}", cause)
        return MdevctlError(f"Error removing device {error.uuid}", cause)
    if isinstance(error, KernelError) and error.what == "attribute":
        return MdevctlError(f"Failed to write {data['value']} to attribute {data['attribute']}", cause)
    if isinstance(error, InvalidInput) and error.what == "attribute":
        return MdevctlError(f"Invalid attribute '{data.get('attribute', data.get('value'))}'")
    if isinstance(error, InvalidInput) and error.what == "parent":  # not one name: mdevctl would join it to a path
        return MdevctlError(f"Invalid parent '{data['value']}': a device name, not a path")
    if isinstance(error, KernelError) and error.what == "definition":
        return MdevctlError(f"Failed to write config for device {error.uuid}", cause)
    if isinstance(error, InvalidInput) and error.what == "definition":
        return MdevctlError(_config_words(data))
    return MdevctlError(str(error))


def _said(error: MdevctlError | VgpuError) -> MdevctlError:
    return in_mdevctl_words(error) if isinstance(error, VgpuError) else error


def _config_words(data: dict[str, Any]) -> str:
    """serde's and mdevctl's load_from_json's words for a config the core could not read."""
    problem = data["problem"]
    if problem == "json" and data["input_end"] is not None:  # serde reports running out where the input ends
        return "EOF while parsing a value at line {} column {}".format(*data["input_end"])
    if problem == "json":
        return f"{_SERDE.get(data['json_error'], data['json_error'])} at line {data['line']} column {data['column']}"
    if problem == "attr_value":
        return (f"invalid JSON format for attribute {{{_json(data['key'])}, {_json(data['value'])}}}: "
                "value must be of type str")
    return {"attrs": "attributes field is not an array", "attr": "invalid JSON format for attribute: not an object",
            "attr_fields": "invalid JSON format for attribute: too many fields",
            "utf-8": "stream did not contain valid UTF-8"}.get(problem, "invalid json")


def _warn(message: str, module: str = "mdevctl") -> None:
    """A warning in env_logger's format, as mdevctl prints them on stderr."""
    stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    sys.stderr.write(f"[{stamp} WARN  {module}] {message}\n")


def _json(data: Any) -> str:
    """serde_json's pretty print: 2-space indent, UTF-8 as is."""
    return json.dumps(data, indent=2, ensure_ascii=False)


def _read_jsonfile(path: str) -> str:
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except OSError as e:
        raise MdevctlError(f"Unable to read jsonfile {_json(path)}", _io(e.errno, str(e))) from None
    except UnicodeDecodeError:
        raise MdevctlError(f"Unable to read jsonfile {_json(path)}", "stream did not contain valid UTF-8") from None


def _config(text: str, uuid: str, parent: str, where: str) -> Definition:
    """A config as mdevctl's load_from_json reads it: any start but "auto" is manual."""
    return definitions.parse_config(text, uuid, parent, where, strict=False)


def _line(device: Definition, marker: str, verbose: bool) -> str:
    text = f"{device.uuid} {device.parent} {device.mdev_type} {device.start}{marker}\n"
    if verbose and device.attrs:
        text += "  Attrs:\n" + "".join(f'    @{{{i}}}: {{"{k}":"{v}"}}\n' for i, (k, v) in enumerate(device.attrs))
    return text


def _type_text(t: MdevType) -> str:
    name, description = _type_strings(t)
    return (f"  {t.type_id}\n    Available instances: {t.available_instances}\n    Device API: {t.device_api.strip()}\n"
            + (f"    Name: {name}\n" if name else "") + (f"    Description: {description}\n" if description else ""))


def _type_json(t: MdevType) -> dict[str, Any]:
    name, description = _type_strings(t)
    data: dict[str, Any] = {"available_instances": t.available_instances, "device_api": t.device_api.strip()}
    if name:
        data["name"] = name
    if description:
        data["description"] = description
    return {t.type_id: data}


def _type_strings(t: MdevType) -> tuple[str, str]:
    """Name and description as mdevctl shows them: trimmed, description lines joined by ", "."""
    return (t.name or "").strip(), (t.description or "").strip().replace("\n", ", ")


def _hierarchy(parents: dict[str, list[Any]]) -> list[dict[str, list[Any]]]:
    return [parents] if parents else []


@dataclass
class Mdevctl:
    """mdevctl's commands against a host; each takes the parsed arguments and returns the exit status."""

    root: HostRoot
    state: StateDir

    # -------------------------------------------------------------- what is there
    def defined(self, uuid: str | None = None, parent: str | None = None) -> dict[str, list[Definition]]:
        """mdevctl's defined_devices: every config, of one UUID or parent; one bad file fails it all."""
        found: dict[str, list[Definition]] = {}
        for name, child in definitions.files(self.root):
            if parent is not None and name != parent:
                continue
            if not definitions.is_uuid(child):  # mdevctl cannot list non-canonical names either
                if not UUID_FORMS.fullmatch(child):
                    _warn(f"Can't determine uuid for file '{child}'")
                continue
            if uuid is None or child == uuid:
                found.setdefault(name, []).append(definitions.read(self.root, name, child, strict=False))
        return found

    def is_defined(self, parent: str, uuid: str) -> bool:
        return self.root.path(definitions.definition_path(self.root, parent, uuid)).exists()

    def list_active(self, uuid: str | None, parent: str | None) -> Listing:
        """Active devices; start, attrs (and, as 1.2.0 does, the type) come from a definition if any."""
        found: Listing = {}
        for device in sysfs.active_devices(self.root):
            if not UUID_FORMS.fullmatch(device.uuid):
                _warn(f"Can't determine uuid for file '{device.uuid}'")
                continue
            u = str(uuidlib.UUID(device.uuid))
            if (uuid is not None and u != uuid) or (parent is not None and device.parent != parent):
                continue
            shown = Definition(u, device.parent, device.type_id)
            with contextlib.suppress(VgpuError, OSError):  # mdevctl ignores a bad definition here
                config = definitions.read(self.root, device.parent, u, strict=False)
                if config.mdev_type != device.type_id:
                    _warn(f"Overwriting mdev type for mdev {u}: {device.type_id} => {config.mdev_type}",
                          "mdevctl::mdev")
                shown = config
            found.setdefault(device.parent, []).append((shown, " (defined)" if self.is_defined(device.parent, u)
                                                        else ""))
        return found

    def list_defined(self, uuid: str | None, parent: str | None) -> Listing:
        """Definitions; " (active)" when a device of that UUID runs on that parent with that type."""
        running = {(d.uuid, d.parent, d.type_id) for d in sysfs.active_devices(self.root)}
        return {p: [(d, " (active)" if (d.uuid, d.parent, d.mdev_type) in running else "") for d in devices]
                for p, devices in self.defined(uuid, parent).items()}

    def one_definition(self, uuid: str, parent: str | None) -> Definition:
        found = self.defined(uuid, parent)
        where = f"{parent}/{uuid}" if parent is not None else uuid
        if not found:
            raise MdevctlError(f"Mediated device {where} is not defined")
        if len(found) > 1:
            raise MdevctlError(f"Multiple definitions found for {uuid}, specify a parent")
        return next(iter(found.values()))[0]

    # -------------------------------------------------------------- changing the host
    @contextlib.contextmanager
    def lock(self, parent: str) -> Iterator[None]:
        """vgpuctl's lock of the parent; none when it cannot be had (no state directory, not root)."""
        with contextlib.ExitStack() as stack:
            with contextlib.suppress(OSError):
                stack.enter_context(self.state.lock(f"parent-{parent}"))
            yield

    def create(self, device: Definition) -> None:
        """mdevctl's MDev::start: its checks in its order, create, then the attributes in order;
        when one cannot be written the device is removed again."""
        uuid, parent, type_id = device.uuid, device.parent, device.mdev_type
        sysfs.check_free(self.root, uuid, parent, type_id)
        check_parent(self.root, parent)
        if not self.root.path(self.root.mdev_types_dir(parent)).is_dir():
            raise MdevctlError(f"Parent {parent} is not currently registered for mdev support")
        if check_type(self.root, parent, type_id).available_instances == 0:
            raise MdevctlError(f"No available instances of {type_id} on {parent}")
        with self.lock(parent):
            sysfs.create_device(self.root, parent, type_id, uuid)
            try:
                for name, value in device.attrs:
                    sysfs.write_attribute(self.root, uuid, name, value)
            except VgpuError:
                sysfs.remove_device(self.root, uuid)
                raise

    def write(self, device: Definition) -> None:
        with self.lock(device.parent):
            definitions.write(self.root, device)

    def forget_if_gone(self, uuid: str) -> None:
        """If vgpuctl had made this vGPU or definition and it is gone now, vgpuctl's record goes too."""
        with contextlib.suppress(OSError, VgpuError):
            journal = Journal(self.state)
            owned = journal.ownership()
            for key in [k for k in owned.definitions if k.endswith(f"/{uuid}")]:
                if not self.is_defined(key.partition("/")[0], uuid):
                    journal.forget("definition", key)
            if uuid in owned.devices and sysfs.active_device(self.root, uuid) is None:
                journal.forget("device", uuid)

    # -------------------------------------------------------------- the commands
    def cmd_list(self, args: argparse.Namespace) -> int:
        listing = (self.list_defined if args.defined else self.list_active)(args.uuid, args.parent)
        listing = {p: sorted(entries, key=lambda e: e[0].uuid) for p, entries in sorted(listing.items())}
        devices = [device for entries in listing.values() for device, _ in entries]
        if args.dumpjson:
            if args.uuid is not None and len(devices) <= 1:  # the bare config, usable as a config file
                text = _json(devices[0].config() if devices else [])
            else:
                text = _json(_hierarchy({p: [{d.uuid: d.config()} for d, _ in entries]
                                         for p, entries in listing.items()}))
        else:
            text = "".join(_line(d, marker, args.verbose) for entries in listing.values() for d, marker in entries)
        print(text)  # println!: 1.2.0 ends every listing with one more newline
        return 0

    def cmd_types(self, args: argparse.Namespace) -> int:
        found = {p: sorted(sysfs.read_types(self.root, p), key=lambda t: t.type_id)
                 for p in sysfs.parent_names(self.root) if args.parent is None or p == args.parent}
        if args.dumpjson:
            text = _json(_hierarchy({p: [_type_json(t) for t in types] for p, types in found.items()}))
        else:
            text = "".join(f"{p}\n" + "".join(_type_text(t) for t in types) for p, types in found.items())
        print(text)
        return 0

    def cmd_define(self, args: argparse.Namespace) -> int:
        uuid = args.uuid or str(uuidlib.uuid4())
        if args.jsonfile is not None:
            if args.parent is None:
                raise MdevctlError(f"Parent device required to define device via {_json(args.jsonfile)}")
            if self.defined(uuid, args.parent):
                raise MdevctlError(f"Cowardly refusing to overwrite existing config for {args.parent}/{uuid}")
            device = _config(_read_jsonfile(args.jsonfile), uuid, args.parent, args.jsonfile)
        else:
            parent, type_id = args.parent, args.mdev_type
            active = sysfs.active_device(self.root, uuid) if args.uuid else None
            if args.uuid and parent is None and (active is None or type_id is not None):
                raise MdevctlError("No parent specified")
            if active is not None:  # a running device: its parent and type unless given
                parent = active.parent if parent is None else parent
                type_id = active.type_id if type_id is None else type_id
            if parent is None:
                raise MdevctlError("No parent specified")
            if type_id is None:
                raise MdevctlError("No type specified")
            if self.is_defined(parent, uuid):
                raise MdevctlError(f"Device {uuid} on {parent} already defined")
            device = Definition(uuid, parent, type_id, "auto" if args.auto else "manual")
        self.write(device)
        if args.uuid is None:
            print(uuid)
        return 0

    def cmd_undefine(self, args: argparse.Namespace) -> int:
        found = self.defined(args.uuid, args.parent)
        if not found:
            raise MdevctlError("No devices match the specified uuid")
        for parent, devices in found.items():
            with self.lock(parent), contextlib.suppress(KernelError):  # 1.2.0 ignores a failed removal
                for device in devices:
                    definitions.delete(self.root, device)
        self.forget_if_gone(args.uuid)
        return 0

    def cmd_modify(self, args: argparse.Namespace) -> int:
        device = self.one_definition(args.uuid, args.parent)
        if args.mdev_type is not None:
            device.mdev_type = args.mdev_type
        if args.auto or args.manual:
            device.start = "auto" if args.auto else "manual"
        index = args.index
        if args.addattr is not None:
            if index is not None and index > len(device.attrs):
                raise MdevctlError(f"Attribute index {index} is invalid")
            device.attrs.insert(len(device.attrs) if index is None else index, (args.addattr, args.value))
        elif args.delattr and (index is not None or device.attrs):
            if index is not None and index >= len(device.attrs):  # 1.2.0 panics for index == len
                raise MdevctlError(f"Attribute index {index} is invalid")
            del device.attrs[-1 if index is None else index]
        self.write(device)
        return 0

    def cmd_start(self, args: argparse.Namespace) -> int:
        uuid = args.uuid or str(uuidlib.uuid4())
        if args.jsonfile is not None:
            text = _read_jsonfile(args.jsonfile)
            if args.parent is None:  # 1.2.0 parses the JSON before it wants a parent, and checks the fields after
                try:
                    _config(text, uuid, "", args.jsonfile)
                except InvalidInput as e:
                    if e.data["problem"] == "json":
                        raise
                raise MdevctlError("Parent device required to start device via json file")
            device = _config(text, uuid, args.parent, args.jsonfile)
        else:
            found = [d for ds in self.defined(args.uuid, args.parent).values() for d in ds] if args.uuid else []
            if len(found) > 1:
                raise MdevctlError(f"Multiple definitions found for device {uuid}. Please specify a parent.")
            if found and args.mdev_type not in (None, found[0].mdev_type):
                raise MdevctlError(f"Device {uuid} already exists on parent {found[0].parent} "
                                   f"with type {found[0].mdev_type}")
            if not found and args.mdev_type is not None and args.parent is None:
                raise MdevctlError("can't provide type without parent")
            if not found and (args.mdev_type is None or args.parent is None):
                raise MdevctlError("Device is insufficiently specified")
            device = found[0] if found else Definition(uuid, args.parent, args.mdev_type)
        self.create(device)
        if args.uuid is None:
            print(uuid)
        return 0

    def cmd_stop(self, args: argparse.Namespace) -> int:
        sysfs.remove_device(self.root, args.uuid)
        self.forget_if_gone(args.uuid)
        return 0

    def cmd_start_parent_mdevs(self, args: argparse.Namespace) -> int:
        """What udev runs when a parent appears: start its auto definitions; failures are only warned."""
        for device in self.defined(None, args.parent).get(args.parent, []):
            if device.start == "auto":
                try:
                    self.create(device)
                except (MdevctlError, VgpuError) as e:
                    said = _said(e)
                    _warn(str(said))
                    if said.cause:
                        _warn(said.cause)
        return 0


# ------------------------------------------------------------------ the command line, clap's way


class _Parser(argparse.ArgumentParser):
    """clap's conventions: no abbreviated options, help only when nothing is wrong, usage errors
    as ``error: ...`` with exit status 2."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs | {"allow_abbrev": False, "add_help": False})
        self.add_argument("-h", "--help", action="store_true", help="Print help information")

    def error(self, message: str) -> NoReturn:
        message = re.sub(r"^argument [^:]+: (?=Invalid value)", "", message)
        unknown = re.match(r"unrecognized arguments: (\S+)|argument <SUBCOMMAND>: invalid choice: '(.*?)'", message)
        if unknown:
            word = unknown[1] or unknown[2]
            message = f"Found argument '{word}' which wasn't expected, or isn't valid in this context"
        usage = self.format_usage().removeprefix("usage: ").strip()
        self.exit(2, f"error: {message}\n\nUSAGE:\n    {usage}\n\nFor more information try --help\n")


class _Once(argparse.Action):
    """clap's rule that an option is given at most once (a flag when nargs=0)."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace,
                 values: Any, option_string: str | None = None) -> None:
        if getattr(namespace, self.dest) not in (None, False):
            parser.error(f"The argument '{_shown(self)}' was provided more than once, "
                         "but cannot be used multiple times")
        setattr(namespace, self.dest, True if self.nargs == 0 else values)


def _shown(action: argparse.Action) -> str:
    return action.option_strings[-1] + (f" <{action.metavar}>" if action.nargs != 0 else "")


def _uuid(text: str) -> str:
    if not UUID_FORMS.fullmatch(text):
        raise argparse.ArgumentTypeError(f'Invalid value "{text}" for \'--uuid <UUID>\': invalid UUID')
    return str(uuidlib.UUID(text))


def _index(text: str) -> int:
    if not text.isdecimal() or int(text) >= 2**32:
        raise argparse.ArgumentTypeError(f'Invalid value "{text}" for \'--index <INDEX>\'')
    return int(text)


def _option(parser: argparse.ArgumentParser, *names: str, help: str, metavar: str | None = None,
            **kwargs: Any) -> None:
    if metavar is None:
        parser.add_argument(*names, action=_Once, nargs=0, default=False, help=help)
    else:
        parser.add_argument(*names, action=_Once, metavar=metavar, help=help, **kwargs)


def _list_options(parser: argparse.ArgumentParser, version: str) -> argparse.ArgumentParser:
    _option(parser, "-d", "--defined", help="Show defined devices")
    _option(parser, "--dumpjson", help="Output device list in json format")
    _option(parser, "-p", "--parent", metavar="PARENT", help="List devices associated with the specified Parent device")
    _option(parser, "-u", "--uuid", metavar="UUID", type=_uuid, help="List devices matching the specified UUID")
    _option(parser, "-v", "--verbose", help="Print additional information about the devices")
    parser.add_argument("-V", "--version", action="version", version=version, help="Print version information")
    return parser


def _define_options(define: argparse.ArgumentParser) -> None:
    _option(define, "-u", "--uuid", metavar="UUID", type=_uuid, help="Assign UUID to the device")
    _option(define, "-a", "--auto", help="Automatically start device on parent availability")
    _option(define, "-p", "--parent", metavar="PARENT", help="Specify the parent of the device")
    _option(define, "-t", "--type", dest="mdev_type", metavar="type", help="Specify the mdev type of the device")
    _option(define, "--jsonfile", metavar="JSONFILE", help="Specify device details in JSON format")


def _undefine_options(undefine: argparse.ArgumentParser) -> None:
    _option(undefine, "-u", "--uuid", metavar="UUID", type=_uuid, help="UUID of the device to be undefined")
    _option(undefine, "-p", "--parent", metavar="PARENT", help="Parent of the device to be undefined")


def _modify_options(modify: argparse.ArgumentParser) -> None:
    _option(modify, "-u", "--uuid", metavar="UUID", type=_uuid, help="UUID of the mdev to modify")
    _option(modify, "-p", "--parent", metavar="PARENT", help="Parent of the mdev to modify")
    _option(modify, "-t", "--type", dest="mdev_type", metavar="type", help="Modify the mdev type for this device")
    _option(modify, "--addattr", metavar="attr_name", help="add a new attribute")
    _option(modify, "--delattr", help="Delete an attribute")
    _option(modify, "-i", "--index", metavar="INDEX", type=_index, help="Index of the attribute to modify")
    _option(modify, "--value", metavar="attr_value", help="Value for the attribute specified by --addattr")
    _option(modify, "-a", "--auto", help="Device will be started automatically")
    _option(modify, "-m", "--manual", help="Device must be started manually")


def _start_options(start: argparse.ArgumentParser) -> None:
    _option(start, "-u", "--uuid", metavar="UUID", type=_uuid, help="UUID of the device to start")
    _option(start, "-p", "--parent", metavar="PARENT", help="Parent of the device to start")
    _option(start, "-t", "--type", dest="mdev_type", metavar="type", help="Mdev type of the device to start")
    _option(start, "--jsonfile", metavar="JSONFILE", help="Details of the device to be started, in JSON format")


def _stop_options(stop: argparse.ArgumentParser) -> None:
    _option(stop, "-u", "--uuid", metavar="UUID", type=_uuid, help="UUID of the device to stop")


def _types_options(types: argparse.ArgumentParser) -> None:
    _option(types, "-p", "--parent", metavar="PARENT", help="Show supported types for the specified parent")
    _option(types, "--dumpjson", help="Output mdev types list in JSON format")


# mdevctl's subcommands in its order: (name, about (None: hidden from the list), usage, options)
_COMMANDS: list[tuple[str, str | None, str, Callable[[argparse.ArgumentParser], object]]] = [
    ("define", "Define a persistent mediated device", "[OPTIONS]", _define_options),
    ("undefine", "Undefine a persistent mediated device", "[OPTIONS] --uuid <UUID>", _undefine_options),
    ("modify", "Modify the definition of a mediated device", "[OPTIONS] --uuid <UUID>", _modify_options),
    ("start", "Start a mediated device", "[OPTIONS]", _start_options),
    ("stop", "Stop a mediated device", "--uuid <UUID>", _stop_options),
    ("list", "List mediated devices", "[OPTIONS]", lambda p: _list_options(p, f"mdevctl-list {VERSION}")),
    ("types", "List available mediated device types", "[OPTIONS]", _types_options),
    ("start-parent-mdevs", None, "<PARENT>", lambda p: p.add_argument("parent", nargs="?", metavar="PARENT")),
    ("help", "Print this message or the help of the given subcommand(s)", "[OPTIONS]",
     lambda p: p.add_argument("topic", nargs="?")),
]


def _parsers(words: list[str]) -> tuple[_Parser, dict[str, argparse.ArgumentParser]]:
    """The top parser and its subcommands' parsers. When ``words`` start with a subcommand (other than
    help), only that one is built: argparse takes ~1 ms per subcommand, a tenth of a `list --dumpjson`."""
    top = _Parser(prog="mdevctl", usage="%(prog)s <SUBCOMMAND>",
                  description="A mediated device management utility for Linux")
    top.add_argument("-V", "--version", action="version", version=f"mdevctl {VERSION}",
                     help="Print version information")
    commands = top.add_subparsers(dest="command", metavar="<SUBCOMMAND>", parser_class=_Parser)
    only = words[0] if words and words[0] in {name for name, *_ in _COMMANDS} - {"help"} else None
    for name, about, usage, add_options in _COMMANDS:
        if only not in (None, name):
            continue
        prog, usage = f"mdevctl {name}", f"mdevctl {name} {usage}"
        parser: argparse.ArgumentParser = (
            commands.add_parser(name, prog=prog, usage=usage, help=about, description=about) if about
            else commands.add_parser(name, prog=prog, usage=usage))  # no help: hidden from the list
        parser.set_defaults(parser=parser)
        add_options(parser)
    return top, dict(commands.choices)


# What clap checks after parsing: required options, options that exclude or need each other.
_REQUIRED = {"undefine": ["uuid"], "modify": ["uuid"], "stop": ["uuid"], "start-parent-mdevs": ["parent"],
             "define": ["uuid|parent"], "start": ["uuid|parent"]}
_CONFLICTS = {"define": [("jsonfile", "mdev_type"), ("jsonfile", "auto")], "start": [("jsonfile", "mdev_type")],
              "modify": [("auto", "manual"), ("addattr", "delattr")]}
_SHOWN = {"uuid": "--uuid <UUID>", "parent": "--parent <PARENT>", "mdev_type": "--type <type>",
          "jsonfile": "--jsonfile <JSONFILE>", "auto": "--auto", "manual": "--manual",
          "addattr": "--addattr <attr_name>", "delattr": "--delattr", "value": "--value <attr_value>"}


def _check(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    given = {k for k, v in vars(args).items() if v not in (None, False)}
    for needed in _REQUIRED.get(args.command, []):
        if not given & set(needed.split("|")):
            shown = ["<PARENT>" if args.command == "start-parent-mdevs" else _SHOWN[n] for n in needed.split("|")]
            parser.error("The following required arguments were not provided:\n    " + "\n    ".join(shown))
    for a, b in _CONFLICTS.get(args.command, []):
        if {a, b} <= given:
            parser.error(f"The argument '{_SHOWN[a]}' cannot be used with '{_SHOWN[b]}'")
    if args.command == "modify" and "addattr" in given and "value" not in given:
        parser.error(f"The following required arguments were not provided:\n    {_SHOWN['value']}")
    # Joined into paths: a parent is one name, an attribute a path below its device; never '..'.
    if isinstance(getattr(args, "parent", None), str):
        path_name(args.parent, "parent")
    if isinstance(getattr(args, "addattr", None), str):
        relative_path(args.addattr, "attribute")


def _parse(argv: list[str]) -> argparse.Namespace:
    """The arguments as clap reads them; SystemExit for help, version and usage errors."""
    words = [re.sub(r"^(-[upti])=", r"\1", word) for word in argv[1:]]  # clap takes -u=UUID too
    if argv and os.path.basename(argv[0]) == "lsmdev":
        parser: argparse.ArgumentParser = _Parser(prog="lsmdev", usage="lsmdev [OPTIONS]",
                                                  description="List mediated devices")
        args, extra = _list_options(parser, f"lsmdev {VERSION}").parse_known_args(words)
        args.command = "list"
        if extra:
            parser.error(f"unrecognized arguments: {extra[0]}")
    else:
        top, commands = _parsers(words)
        args, extra = top.parse_known_args(words)
        parser = getattr(args, "parser", top)
        if extra:
            parser.error(f"unrecognized arguments: {extra[0]}")
        if args.command is None and not args.help:
            top.print_help(sys.stderr)
            raise SystemExit(2)
        if args.command is not None and {"-h", "--help"} & set(words[:words.index(args.command)]):
            parser = top  # `mdevctl --help list`: the top's help (the subcommand's default hid the flag)
            args.help = True
        if args.command == "help":
            if args.topic is not None and args.topic not in commands:
                top.error(f"The subcommand '{args.topic}' wasn't recognized")
            commands.get(args.topic or "", top).print_help()
            raise SystemExit(0)
    if args.help:
        parser.print_help()
        raise SystemExit(0)
    _check(parser, args)
    return args


def run_as_mdevctl(argv: list[str], root: HostRoot | None = None, state_dir: str | None = None) -> int:
    """Run mdevctl's command line ``argv`` (``argv[0]`` named mdevctl or lsmdev); the exit status."""
    try:
        args = _parse(argv)
        mdevctl = Mdevctl(root if root is not None else HostRoot.from_env(), StateDir.from_env(state_dir))
        status: int = getattr(mdevctl, "cmd_" + args.command.replace("-", "_"))(args)
        return status
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else 0 if e.code is None else 1
    except (MdevctlError, VgpuError) as e:
        said = _said(e)
        sys.stderr.write(f"Error: {said}\n" + (f"\nCaused by:\n    {said.cause}\n" if said.cause else ""))
    except OSError as e:  # the host refused a read: mdevctl says the io::Error
        sys.stderr.write(f"Error: {_io(e.errno, str(e))}\n")
    except Exception as e:  # anything else is a bug in vgpuctl, and is said to be one
        import traceback

        traceback.print_exc()
        sys.stderr.write(f"Error: internal error, a bug in vgpuctl's mdevctl ({type(e).__name__}: {e}); "
                         "please report it with the traceback above\n")
    return 1
