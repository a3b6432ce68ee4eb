"""What a VM is: a :class:`VmSpec`, stored as TOML in ``<state-dir>/vms/<name>.toml``.

A spec only records what the user asked for. Nothing here touches the host: disks are created
(``qemu-img create``) by the lifecycle when the VM starts, the vGPU request is resolved then
(:mod:`vgpuctl.vm.runtime`), and the QEMU command line is built from both (:mod:`vgpuctl.vm.argv`).

Every check names the field it refuses, e.g.
``/var/lib/vgpuctl/vms/x.toml: memory_mib must be a positive integer (MiB), got 'lots'``.
Unknown fields are refused too, so that a typo never silently does nothing.
"""

from __future__ import annotations

import re
from dataclasses import MISSING, field, fields, is_dataclass
from pathlib import Path
from typing import Any

from vgpuctl.base.errors import Conflict, InvalidInput, NotFound
from vgpuctl.base.problems import UnreadableFile
from vgpuctl.base.state import StateDir
from vgpuctl.host.files import atomic_write
from vgpuctl.vm.checks import MAX_MEMORY_MIB, absolute, describe, one_of, parse_resolution, positive
from vgpuctl.vm.devices import KINDS, TABLES, DeviceFields
from vgpuctl.vm.devices.base import OMIT_DEFAULT, Record, spec_fields, spec_record
from vgpuctl.vm.devices.disk import DISK_FORMATS, Disk
from vgpuctl.vm.devices.display import BACKENDS, DISPLAY_OPTIONS, GL_BACKENDS, Display
from vgpuctl.vm.devices.network import NETWORK_MODES, Network, default_mac
from vgpuctl.vm.devices.vgpu import VgpuRequest

__all__ = ["BACKENDS", "DISK_FORMATS", "DISPLAY_OPTIONS", "GL_BACKENDS", "MAX_MEMORY_MIB", "NETWORK_MODES",
           "Disk", "Display", "Network", "VgpuRequest", "VmSpec", "default_mac", "parse_resolution"]

NAME_PATTERN = r"[a-z0-9][a-z0-9-]{0,62}"
FIRMWARES = ("seabios", "ovmf")
MACHINES = ("pc", "q35")
BOOTS = ("disk", "cdrom", "kernel")
OS_NAMES = ("windows10", "windows11")  # the guest OSes vgpuctl.vm.profiles.os_settings knows
PROFILE_NAMES = ("streaming", "gaming", "automotive")  # = vgpuctl.vm.profiles.PROFILES' keys (a test checks);
# not imported from there: every VM start validates its spec, and importing the profiles costs it ~1 ms.
_REQUIREMENT = r"([a-z0-9_]+)\.([a-z0-9_]+)=(\S+)"
MAX_CPUS = 255
MAX_ORDER = 9999


def check_name(name: str) -> str:
    if not isinstance(name, str) or not re.fullmatch(NAME_PATTERN, name):
        raise InvalidInput(f"VM name must be 1-63 characters of a-z, 0-9 and '-', starting with a letter or "
                           f"digit, got {name!r}")
    return name


@spec_fields
class Machine:
    """The machine's settings: what is not a device's (those are in :mod:`vgpuctl.vm.devices`)."""

    name: str
    profile: str | None = None
    # The guest OS whose settings the VM was given (profiles.os_settings); the VM's preflight warns for it.
    os: str | None = field(default=None, metadata={"choices": OS_NAMES})
    memory_mib: int = 2048
    cpus: int = 2
    cpu: str | None = None  # QEMU -cpu; default "host" under KVM, "max" under TCG
    hyperv: bool = field(default=False, metadata=OMIT_DEFAULT)  # Hyper-V enlightenments added to the CPU
    machine: str = field(default="pc", metadata={"choices": MACHINES})  # pc (i440fx, as Intel's GVT-g guides) | q35
    firmware: str = field(default="seabios", metadata={"choices": FIRMWARES})
    secure_boot: bool = field(default=False, metadata=OMIT_DEFAULT)  # OVMF with Secure Boot (and SMM): q35
    # disk (then cdrom) | cdrom (then disk) | kernel (direct: kernel/initrd/append)
    boot: str = field(default="disk", metadata={"choices": BOOTS})
    fast_boot: bool = False  # -boot menu=off and no option ROM on the NIC (no PXE)
    order: int | None = None  # start order among VMs (lower first); None: unordered
    autostart: bool = False  # started by 'vgpuctl vm autostart' (e.g. at boot), in 'order'
    rtc_localtime: bool = False  # Windows guests keep the RTC in local time
    kernel: str | None = None
    initrd: str | None = None
    append: str | None = None
    requires: list[str] = field(default_factory=list)  # host settings checked at start: "kvm.ignore_msrs=1"
    extra_args: list[str] = field(default_factory=list)  # appended to QEMU's command line as given


@spec_record
class VmSpec(DeviceFields, Machine, Record):
    """A VM as stored in <state-dir>/vms/<name>.toml: the machine's settings, then each device's ``Fields``,
    all at the top level of the file."""

    # ------------------------------------------------------------------ checks
    def validate(self, where: str | None = None) -> VmSpec:
        """Refuse a spec that can never work, naming the field; returns self."""
        try:
            _check(self)
        except InvalidInput as e:
            raise InvalidInput(f"{where or 'vm ' + str(self.name)}: {e}") from None
        return self

    def warnings(self) -> list[str]:
        """What may not work as the user expects, but is not wrong."""
        found = []
        if self.boot == "disk" and not self.disks and not self.cdrom:
            found.append("no disk or cdrom to boot from (add --disk PATH[:SIZE], --cdrom ISO or --kernel)")
        if self.firmware == "ovmf" and self.igd_opregion:
            found.append("x-igd-opregion with OVMF needs a firmware with IgdAssignmentDxe (unmodified OVMF "
                         "ignores the OpRegion); SeaBIOS handles it")
        if self.vgpu.kind == "none" and (self.ramfb or self.vgpu_display):
            found.append("vgpu_display/ramfb have no effect without a vGPU")
        return found

    # ------------------------------------------------------------------ TOML
    def to_dict(self) -> dict[str, Any]:
        """Plain data for TOML/JSON: None values left out (TOML has no null)."""
        return _plain(self)  # type: ignore[no-any-return]

    def to_toml(self) -> str:
        import tomli_w

        return tomli_w.dumps(self.to_dict())

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str) -> VmSpec:
        try:
            spec: VmSpec = _read(cls, data, "")
        except InvalidInput as e:
            raise InvalidInput(f"{where}: {e}") from None
        return spec.validate(where)

    @classmethod
    def from_toml(cls, text: str, where: str) -> VmSpec:
        import tomllib

        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as e:
            raise InvalidInput(f"{where}: not valid TOML ({e}); fix or remove the file") from None
        return cls.from_dict(data, where)


# ---------------------------------------------------------------------- storage


def vms_dir(state: StateDir) -> Path:
    return state.path / "vms"


def spec_path(state: StateDir, name: str) -> Path:
    return vms_dir(state) / f"{check_name(name)}.toml"


def exists(state: StateDir, name: str) -> bool:
    return spec_path(state, name).is_file()


def load(state: StateDir, name: str) -> VmSpec:
    path = spec_path(state, name)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise NotFound(f"no VM {name!r}; 'vgpuctl vm list' shows the VMs, 'vgpuctl vm create' makes one") from None
    except (OSError, UnicodeDecodeError) as e:  # a directory, unreadable, not text
        raise InvalidInput(f"{path}: cannot be read as a spec ({e}); fix or remove it") from None
    spec = VmSpec.from_toml(text, str(path))
    if spec.name != name:
        raise InvalidInput(f"{path}: name is {spec.name!r} but the file is named for {name!r}; make them agree")
    return spec


def save(state: StateDir, spec: VmSpec, *, new: bool = False) -> Path:
    """Write the spec atomically (validated first); ``new`` refuses to replace an existing VM.

    A new VM with a network gets its MAC written into the spec (as libvirt writes it into the domain):
    the guest's NIC keeps its address whatever later versions derive, and ``vm show`` shows it.
    """
    path = spec_path(state, spec.name)
    spec.validate(str(path))
    if new and path.exists():
        raise Conflict(f"VM {spec.name!r} already exists; change it with 'vgpuctl vm edit' or pick another name")
    if new and spec.network.mode != "none" and spec.network.mac is None:
        spec.network.mac = default_mac(spec.name)
    atomic_write(path, spec.to_toml().encode())  # (it also sweeps the temp files of killed writes)
    return path


def names(state: StateDir) -> list[str]:
    directory = vms_dir(state)
    if not directory.is_dir():
        return []
    return sorted(p.stem for p in directory.glob("*.toml") if re.fullmatch(NAME_PATTERN, p.stem))


def load_each(state: StateDir) -> tuple[list[VmSpec], list[UnreadableFile]]:
    """Every VM, and a problem for each ``*.toml`` that is not one (bad TOML or field, a directory, a
    name that is not a VM name): one bad file never hides the others."""
    directory = vms_dir(state)
    good: list[VmSpec] = []
    problems: list[UnreadableFile] = []
    if not directory.is_dir():
        return good, problems
    for path in sorted(directory.glob("*.toml")):
        if not re.fullmatch(NAME_PATTERN, path.stem):
            problems.append(UnreadableFile("vm_spec", str(path), f"{path}: {path.stem!r} is not a VM name "
                                                "(a-z, 0-9 and '-'); rename or remove the file", path.stem))
            continue
        try:
            good.append(load(state, path.stem))
        except (InvalidInput, NotFound) as e:
            problems.append(UnreadableFile("vm_spec", str(path), str(e), path.stem))
    return good, problems


def remove(state: StateDir, name: str) -> None:
    spec_path(state, name).unlink()


# ---------------------------------------------------------------------- changing


def plain_fields(value: Any) -> Any:
    """A field's value in the spec's TOML form, None kept (for :func:`merge`: a None removes the setting)."""
    if is_dataclass(value) and not isinstance(value, type):
        return {f.name: plain_fields(getattr(value, f.name)) for f in fields(value)}
    if isinstance(value, list):
        return [plain_fields(v) for v in value]
    return value


def merge(spec: VmSpec, changes: dict[str, Any], where: str) -> VmSpec:
    """The spec with ``changes`` (fields in their TOML form) on top: how both ``vm create/edit`` and the API
    change a spec. A guest ``os`` first brings its settings (:func:`vgpuctl.vm.profiles.os_settings`). A None
    removes a setting; a merged table (display, network) is merged into the spec's,
    any other value replaces it. Then what follows from a change: ``kernel`` implies ``boot = "kernel"``
    and removing it boots from disk again; a display backend without a VNC socket drops the socket;
    no vGPU turns the vGPU display off, and no vGPU display turns ramfb off. Not validated: the caller does."""
    known = {f.name: f for f in fields(VmSpec)}
    unknown = [k for k in changes if k not in known or k == "name"]
    if unknown:
        raise InvalidInput(f"{where}: unknown field {unknown[0]!r} (known: {', '.join(list(known)[1:])})")
    data = spec.to_dict()
    if changes.get("os"):
        from vgpuctl.vm.profiles import os_settings

        data.update(plain_fields(os_settings(changes["os"], spec)))  # the OS's defaults, then the changes
    for key, value in changes.items():
        current = data.get(key)
        if known[key].metadata.get("merge") and isinstance(value, dict) and isinstance(current, dict):
            value = {**current, **value}
        data[key] = value
    if changes.get("kernel") and "boot" not in changes:
        data["boot"] = "kernel"
    if "kernel" in changes and not changes["kernel"] and spec.boot == "kernel" and "boot" not in changes:
        data["boot"] = "disk"
    display = data.get("display")
    if isinstance(display, dict) and display.get("backend") not in ("vnc", "egl-headless") \
            and "vnc_socket" not in (changes.get("display") or {}):
        display.pop("vnc_socket", None)
    if "vgpu" in changes and "vgpu_display" not in changes \
            and _read(VgpuRequest, _without_nulls(data.get("vgpu") or {}), "vgpu.").kind == "none":
        data["vgpu_display"] = False
    if data.get("vgpu_display") is False and "ramfb" not in changes:
        data["ramfb"] = False
    try:
        merged: VmSpec = _read(VmSpec, _without_nulls(data), "")
    except InvalidInput as e:
        raise InvalidInput(f"{where}: {e}") from None
    return merged


def _without_nulls(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _without_nulls(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_without_nulls(v) for v in value]
    return value


# ---------------------------------------------------------------------- reading and checking


def _read(cls: type[Any], data: Any, prefix: str) -> Any:
    """Build dataclass ``cls`` from TOML data, checking each field's type by its annotation."""
    if not isinstance(data, dict):
        raise InvalidInput(f"{prefix.rstrip('.') or 'the spec'} must be a table")
    known = {f.name: f for f in fields(cls)}
    for key in data:
        if key not in known:
            raise InvalidInput(f"unknown field '{prefix}{key}' (known: {', '.join(known)})")
    values: dict[str, Any] = {}
    for name, f in known.items():
        if name not in data:
            if f.default is MISSING and f.default_factory is MISSING:
                raise InvalidInput(f"{prefix}{name} is missing")
            continue
        value, label, kind = data[name], prefix + name, str(f.type)
        item = kind[len("list["):-1] if kind.startswith("list[") else None
        if kind in TABLES:
            values[name] = _read(TABLES[kind], value, label + ".")
        elif item in TABLES:
            if not isinstance(value, list):
                names = ", ".join(g.name for g in fields(TABLES[item]))
                raise InvalidInput(f"{label} must be a list of tables ({names})")
            values[name] = [_read(TABLES[item], v, f"{label}[{i}].") for i, v in enumerate(value)]
        elif kind == "list[str]":
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                raise InvalidInput(f"{label} must be a list of strings, got {describe(value)}")
            values[name] = list(value)
        elif kind == "dict[str, str]":
            if not isinstance(value, dict) or not all(isinstance(v, str) for v in value.values()):
                raise InvalidInput(f"{label} must be a table of strings, got {describe(value)}")
            values[name] = dict(value)
        elif kind.startswith("bool"):
            if not isinstance(value, bool):
                raise InvalidInput(f"{label} must be true or false, got {describe(value)}")
            values[name] = value
        elif kind.startswith("int"):
            values[name] = value  # checked with its unit and range by _check
        else:  # str or str | None
            if not isinstance(value, str):
                raise InvalidInput(f"{label} must be a string, got {describe(value)}")
            values[name] = value
    return cls(**values)


def _plain(value: Any) -> Any:
    if is_dataclass(value) and not isinstance(value, type):
        data = {f.name: _plain(getattr(value, f.name)) for f in fields(value)
                if not (f.metadata.get("omit_default") and getattr(value, f.name) == f.default)}
        return {k: v for k, v in data.items() if v is not None and v != {}}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def _check(spec: VmSpec) -> None:
    check_name(spec.name)
    if spec.profile is not None:
        one_of("profile", spec.profile, PROFILE_NAMES)
    positive("memory_mib", spec.memory_mib, "MiB", maximum=MAX_MEMORY_MIB)
    positive("cpus", spec.cpus, maximum=MAX_CPUS)
    if spec.cpu is not None and not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.,=+-]*", spec.cpu):
        raise InvalidInput(f"cpu must be a QEMU -cpu value such as 'host' or 'host,hv_relaxed', got {spec.cpu!r}")
    one_of("machine", spec.machine, MACHINES)
    one_of("firmware", spec.firmware, FIRMWARES)
    if spec.os is not None:
        one_of("os", spec.os, OS_NAMES)
    if spec.secure_boot and (spec.firmware != "ovmf" or spec.machine != "q35"):
        raise InvalidInput("secure_boot = true needs firmware = 'ovmf' and machine = 'q35' (OVMF's Secure Boot "
                           "build needs SMM)")
    one_of("boot", spec.boot, BOOTS)
    if spec.order is not None and (not isinstance(spec.order, int) or isinstance(spec.order, bool)
                                   or not 0 <= spec.order <= MAX_ORDER):
        raise InvalidInput(f"order must be an integer from 0 to {MAX_ORDER}, got {describe(spec.order)}")
    for kind in KINDS:
        kind.check(spec)
    for label in ("kernel", "initrd"):
        absolute(label, getattr(spec, label))
    if spec.boot == "kernel" and not spec.kernel:
        raise InvalidInput("boot = 'kernel' needs kernel (a kernel image path)")
    if spec.boot == "cdrom" and not spec.cdrom:
        raise InvalidInput("boot = 'cdrom' needs cdrom (an ISO path)")
    if (spec.initrd or spec.append) and not spec.kernel:
        raise InvalidInput("initrd and append need kernel (direct kernel boot)")
    for i, requirement in enumerate(spec.requires):
        if not re.fullmatch(_REQUIREMENT, requirement):
            raise InvalidInput(f"requires[{i}] must look like MODULE.PARAMETER=VALUE (e.g. kvm.ignore_msrs=1), "
                               f"got {requirement!r}")
