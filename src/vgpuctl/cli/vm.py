"""VM commands: ``vgpuctl vm create|edit|rm|list|show|argv|xml``.

A VM is a spec in ``<state-dir>/vms/<name>.toml``; these commands write and read it, and show the
QEMU command line and libvirt XML it becomes, without starting anything.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from dataclasses import fields, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import click

from vgpuctl.base.errors import InvalidInput
from vgpuctl.cli.app import State, print_json, reports_errors, say
from vgpuctl.vm.devices import KINDS
from vgpuctl.vm.spec import BACKENDS, BOOTS, FIRMWARES, MACHINES, OS_NAMES, PROFILE_NAMES

if TYPE_CHECKING:
    from vgpuctl.base.state import StateDir
    from vgpuctl.vm.argv import QemuCommand
    from vgpuctl.vm.runtime import ResolvedVgpu
    from vgpuctl.vm.spec import VmSpec

F = TypeVar("F", bound=Callable[..., Any])
NONE = "none"  # clears an optional value in 'vm edit' (--cdrom none, --kernel none, ...)


def state_dir() -> StateDir:
    from vgpuctl.base.state import StateDir

    return StateDir.from_env(State.state_dir)


@click.group("vm")
def vm() -> None:
    """Virtual machines: specs and profiles, and the QEMU command line and libvirt XML they become."""


# ---------------------------------------------------------------------- the options create and edit share

# The options that set a spec field as given (click's parameter name -> the field). The others are read by
# apply_options; tests/test_vm_spec.py checks that every spec field has an option.
OPTION_FIELDS = {"os": "os", "hyperv": "hyperv", "secure_boot": "secure_boot",
                 "memory": "memory_mib", "cpus": "cpus", "cpu": "cpu", "machine": "machine", "firmware": "firmware",
                 "boot": "boot", "order": "order", "autostart": "autostart", "fast_boot": "fast_boot",
                 "localtime": "rtc_localtime"}
# The options the devices declare for their own fields (their metadata's "option" and "help").
DEVICE_OPTIONS = {f.name: click.option(f.metadata["option"], f.name, default=None, help=f.metadata["help"])
                  for kind in KINDS for f in fields(kind.Fields) if "option" in f.metadata}
OPTION_FIELDS.update({name: name for name in DEVICE_OPTIONS})
# What the other options set (the spec field, or a table's field), for the same check.
OTHER_OPTION_FIELDS = {"disks": ("disks",), "cdrom": ("cdrom",), "drivers_cdrom": ("drivers_cdrom",),
                       "kernel": ("kernel",), "initrd": ("initrd",),
                       "append": ("append",), "qemu_args": ("extra_args",), "vgpu_uuid": ("vgpu.uuid",),
                       "vf": ("vgpu.vf",), "vgpu_rom": ("vgpu.rom",), "type_id": ("vgpu.type",),
                       "parent": ("vgpu.parent",),
                       "resolution": ("vgpu.resolution",),
                       "min_memory": ("vgpu.min_memory_mib",), "weight": ("vgpu.weight",),
                       "largest": ("vgpu.largest",), "keep_vgpu": ("vgpu.keep",), "no_vgpu": ("vgpu",),
                       "backend": ("display.backend",), "vnc_socket": ("display.vnc_socket",),
                       "rendernode": ("display.rendernode",), "screen": ("display.resolution",),
                       "display_options": ("display.options",),
                       "network": ("network.mode", "network.bridge", "network.ifname"),
                       "vhost_net": ("network.vhost",), "mac": ("network.mac",)}
NO_OPTION_FIELDS = ("requires",)  # set by a profile (vm show lists it), not on the command line

_SPEC_OPTIONS: list[Callable[[Any], Any]] = [
    click.option("--profile", type=click.Choice(PROFILE_NAMES),
                 help="Start from a profile's defaults (edit: switch profile; disks, network and boot stay)."),
    click.option("--os", type=click.Choice(OS_NAMES),
                 help="Give the VM what this guest OS needs (the other options still override): windows10 = "
                      "Hyper-V enlightenments and the RTC in local time; windows11 = also a TPM 2.0, Secure Boot "
                      "(q35, OVMF) and >= 4096 MiB. Add the virtio-win ISO with --drivers-cdrom; the host "
                      "needs kvm.ignore_msrs=1 ('vgpuctl setup')."),
    click.option("--memory", type=int, metavar="MiB", help="Guest memory in MiB."),
    click.option("--cpus", type=int, metavar="N", help="Virtual CPUs."),
    click.option("--cpu", metavar="MODEL[,FLAGS]", help="QEMU -cpu (default host under KVM, max under TCG)."),
    click.option("--machine", type=click.Choice(MACHINES), help="Machine type (default pc)."),
    click.option("--firmware", type=click.Choice(FIRMWARES), help="Firmware (default seabios)."),
    click.option("--secure-boot/--no-secure-boot", default=None,
                 help="UEFI Secure Boot (OVMF with Microsoft's keys; needs --machine q35 --firmware ovmf)."),
    click.option("--hyperv/--no-hyperv", default=None, help="Hyper-V enlightenments for Windows guests."),
    click.option("--boot", type=click.Choice(BOOTS),
                 help="Boot from disk (then cdrom), cdrom (then disk), or the --kernel directly."),
    click.option("--disk", "disks", multiple=True, metavar="PATH[:SIZE[:FORMAT]]",
                 help="A disk image, repeatable (edit: replaces the list; --disk none removes all); SIZE "
                      "(e.g. 20G) creates it at start when missing; FORMAT qcow2 (default) or raw."),
    click.option("--cdrom", metavar="ISO", help="An ISO image ('none' removes it)."),
    click.option("--drivers-cdrom", metavar="ISO",
                 help="A second CD-ROM with drivers, e.g. virtio-win.iso for Windows ('none' removes it)."),
    click.option("--kernel", metavar="FILE", help="Boot this kernel directly (implies --boot kernel)."),
    click.option("--initrd", metavar="FILE", help="Initial ramdisk for --kernel."),
    click.option("--append", metavar="CMDLINE", help="Kernel command line for --kernel."),
    click.option("--vgpu", "vgpu_uuid", metavar="UUID", help="Use this existing or defined vGPU."),
    click.option("--vf", metavar="PCI", help="Use this SR-IOV VF, or a free VF of this PF (vgpuctl vfs list)."),
    click.option("--vgpu-rom", metavar="FILE", help="The VF's option ROM (Windows on an Intel VF; 'none' removes it)."),
    click.option("-t", "--type", "type_id", metavar="TYPE", help="Create a vGPU of this type at start."),
    click.option("-p", "--parent", metavar="PARENT", help="The parent for --type or the requirements."),
    click.option("--resolution", metavar="WxH", help="Create the smallest vGPU giving at least this resolution."),
    click.option("--min-memory", type=int, metavar="MiB", help="... with at least this much graphics memory."),
    click.option("--weight", type=int, help="... with at least this scheduler weight (GVT-g)."),
    click.option("--largest", is_flag=True, help="Create the largest vGPU type that fits."),
    click.option("--no-vgpu", is_flag=True, help="No vGPU (also turns the vGPU display and ramfb off)."),
    click.option("--keep-vgpu/--release-vgpu", default=None,
                 help="Keep the vGPU vgpuctl made when QEMU ends, for the next start (default), or remove it."),
    click.option("--display", "backend", type=click.Choice(BACKENDS),
                 help="Display backend (vnc and egl-headless on a unix socket; spice local, with OpenGL)."),
    click.option("--vnc-socket", metavar="PATH", help="VNC unix socket (default in the VM's runtime directory)."),
    click.option("--rendernode", metavar="PATH", help="DRM render node for OpenGL (e.g. /dev/dri/renderD128)."),
    click.option("--screen", metavar="WxH", help="Fixed screen resolution (EDID xres/yres); 'none' removes it."),
    click.option("--display-option", "display_options", multiple=True, metavar="KEY=VALUE",
                 help="Extra option for the backend's QEMU argument, repeatable (edit: replaces them); only "
                      "options that open no listener or file (gl, lossy, show-cursor, ...)."),
    click.option("--network", metavar="MODE", help="user, none, tap, tap:IFNAME or bridge:NAME."),
    click.option("--vhost-net/--no-vhost-net", default=None, help="Use vhost-net for tap/bridge when present."),
    click.option("--mac", help="MAC address (default derived from the name)."),
    click.option("--order", type=int, help="Start order among VMs (lower first)."),
    click.option("--autostart/--no-autostart", default=None, help="Started by 'vgpuctl vm autostart' (at boot)."),
    click.option("--fast-boot/--no-fast-boot", default=None, help="No boot menu, no PXE ROM."),
    click.option("--localtime/--utc", "localtime", default=None, help="Guest RTC in local time (Windows)."),
    click.option("--qemu-arg", "qemu_args", multiple=True, metavar="ARG",
                 help="Extra QEMU argument, repeatable, e.g. --qemu-arg=-S (edit: replaces them)."),
    *DEVICE_OPTIONS.values(),
]


def spec_options(command: F) -> F:
    for option in reversed(_SPEC_OPTIONS):
        command = option(command)
    return command


def _path(text: str) -> str:
    return os.path.abspath(os.path.expanduser(text))


def _optional_path(text: str | None, current: str | None) -> str | None:
    if text is None:
        return current
    return None if text == NONE else _path(text)


def apply_options(spec: VmSpec, o: dict[str, Any]) -> VmSpec:
    """The spec with the command line's options on top (``o`` holds click's parameters), merged as the API's
    fields are (:func:`vgpuctl.vm.spec.merge`)."""
    from vgpuctl.vm import spec as specs
    from vgpuctl.vm.profiles import apply_profile
    from vgpuctl.vm.spec import NETWORK_MODES, Disk, Display, Network, VgpuRequest

    if o["profile"] is not None:
        spec = apply_profile(spec, o["profile"])
    changes: dict[str, Any] = {name: o[option] for option, name in OPTION_FIELDS.items() if o[option] is not None}
    if o["disks"]:
        disks = []
        for item in o["disks"]:
            if item == NONE:
                continue
            path, _, rest = item.partition(":")
            size, _, fmt = rest.partition(":")
            disks.append(Disk(_path(path), size or None, fmt or ("raw" if path.endswith((".raw", ".img"))
                                                                  else "qcow2")))
        changes["disks"] = disks
    for name in ("cdrom", "drivers_cdrom", "kernel", "initrd"):
        if o[name] is not None:
            changes[name] = _optional_path(o[name], None)
    if o["append"] is not None:
        changes["append"] = None if o["append"] == NONE else o["append"]

    from vgpuctl.host.pci import check_address

    vgpu = spec.vgpu
    wanted = {"uuid": o["vgpu_uuid"], "vf": o["vf"] and check_address(o["vf"]), "type": o["type_id"],
              "resolution": o["resolution"],
              "min_memory_mib": o["min_memory"], "weight": o["weight"], "largest": True if o["largest"] else None}
    if o["no_vgpu"]:
        if any(v is not None for v in wanted.values()):
            raise InvalidInput("--no-vgpu cannot be combined with --vgpu/--vf/--type/--resolution/--min-memory/"
                               "--weight/--largest")
        vgpu = VgpuRequest()
    elif any(v is not None for v in wanted.values()):
        if o["vgpu_uuid"]:
            from vgpuctl.mdev.definitions import canonical_uuid

            wanted["uuid"] = canonical_uuid(o["vgpu_uuid"])
        vgpu = VgpuRequest(parent=o["parent"], **{k: v for k, v in wanted.items() if v is not None})
    elif o["parent"] is not None:
        vgpu = replace(vgpu, parent=o["parent"])
    if o["keep_vgpu"] is not None:
        vgpu = replace(vgpu, keep=o["keep_vgpu"])
    if o["vgpu_rom"] is not None:
        vgpu = replace(vgpu, rom=None if o["vgpu_rom"] == NONE else o["vgpu_rom"])
    if vgpu != spec.vgpu or o["no_vgpu"]:
        changes["vgpu"] = vgpu

    display: Display = spec.display
    if o["backend"] is not None:
        display = replace(display, backend=o["backend"])
    if o["vnc_socket"] is not None:
        display = replace(display, vnc_socket=_optional_path(o["vnc_socket"], None))
    if o["rendernode"] is not None:
        display = replace(display, rendernode=_optional_path(o["rendernode"], None))
    if o["screen"] is not None:
        display = replace(display, resolution=None if o["screen"] == NONE else o["screen"])
    if o["display_options"]:
        pairs = {}
        for item in o["display_options"]:
            key, sep, value = item.partition("=")
            if not sep or not key:
                raise InvalidInput("--display-option must look like KEY=VALUE, got {value!r}", what="display-option",
                                   value=item)
            pairs[key] = value
        display = replace(display, options=pairs)
    if display != spec.display:
        changes["display"] = {k: v for k, v in specs.plain_fields(display).items()
                              if v != getattr(spec.display, k)}

    network: Network = spec.network
    if o["network"] is not None:
        mode, _, arg = o["network"].partition(":")
        if mode not in NETWORK_MODES or (mode == "bridge" and not arg) \
                or (mode in ("user", "none") and arg):
            raise InvalidInput("--network must be user, none, tap, tap:IFNAME or bridge:NAME, got {value!r}",
                               what="network", value=o["network"])
        network = replace(network, mode=mode, bridge=arg if mode == "bridge" else None,
                          ifname=(arg or None) if mode == "tap" else None)
    if o["vhost_net"] is not None:
        network = replace(network, vhost=o["vhost_net"])
    if o["mac"] is not None:
        network = replace(network, mac=None if o["mac"] == NONE else o["mac"].lower())
    if network != spec.network:
        changes["network"] = network
    if o["qemu_args"]:
        changes["extra_args"] = [a for a in o["qemu_args"] if a != NONE]
    return specs.merge(spec, {k: specs.plain_fields(v) for k, v in changes.items()}, f"vm {spec.name}")


# ---------------------------------------------------------------------- create / edit / rm


def _report_saved(spec: VmSpec, path: Path, verb: str) -> None:
    profile = f" (profile {spec.profile})" if spec.profile else ""
    say(f"{verb} VM {spec.name}{profile}: {path}")
    for warning in spec.warnings():
        say(f"warning: {warning}")
    if spec.requires:
        say(f"requires (checked when it starts): {', '.join(spec.requires)}")


@vm.command("create")
@click.argument("name")
@spec_options
@reports_errors
def create(name: str, **options: Any) -> None:
    """Create a VM from a profile's defaults (or vgpuctl's) and the options given."""
    from vgpuctl.vm import spec as specs
    from vgpuctl.vm.profiles import new_spec

    specs.check_name(name)
    state = state_dir()
    if specs.exists(state, name):
        from vgpuctl.base.errors import Conflict

        raise Conflict(f"VM {name!r} already exists; change it with 'vgpuctl vm edit' or pick another name")
    spec = apply_options(new_spec(name), options)
    _report_saved(spec, specs.save(state, spec, new=True), "created")


@vm.command("edit")
@click.argument("name")
@spec_options
@reports_errors
def edit(name: str, **options: Any) -> None:
    """Change a VM's spec (takes effect at its next start)."""
    from vgpuctl.vm import spec as specs
    from vgpuctl.vm.runtime import is_running

    state = state_dir()
    spec = apply_options(specs.load(state, name), options)
    _report_saved(spec, specs.save(state, spec), "changed")
    if is_running(state, name):
        say("the VM is running: the change takes effect when it next starts")


@vm.command("rm")
@click.argument("name")
@reports_errors
def rm(name: str) -> None:
    """Remove a stopped VM: its spec and runtime directory (disk images stay)."""
    from vgpuctl.vm.inventory import remove

    kept = remove(State.root, state_dir(), name)
    say(f"removed VM {name}" + (f"; disk images kept: {', '.join(kept)}" if kept else ""))


# ---------------------------------------------------------------------- list / show


def _vgpu_summary(spec: VmSpec) -> str:
    if spec.vgpu.kind == "none":
        return "-"
    flags = [f for f, on in (("display", spec.vgpu_display), ("ramfb", spec.ramfb)) if on]
    return spec.vgpu.describe() + (f" [{', '.join(flags)}]" if flags else "")


@vm.command("list")
@click.option("--json", "json_output", is_flag=True, help="Machine-readable output.")
@reports_errors
def list_command(json_output: bool) -> None:
    """Every VM with its profile, size, vGPU request, display and whether it runs.

    A spec file that cannot be read is listed with its error (in --json as {"name", "file", "error"});
    the others are listed all the same, and the exit status stays 0."""
    from vgpuctl.vm import spec as specs
    from vgpuctl.vm.inventory import bad_spec_row, vm_row
    from vgpuctl.vm.runtime import running_vms

    state = state_dir()
    good, problems = specs.load_each(state)
    running = running_vms(state)
    rows: list[dict[str, Any]] = [{**vm_row(state, spec, running), "_vgpu": _vgpu_summary(spec)} for spec in good]
    if json_output:
        listed = [{k: v for k, v in r.items() if not k.startswith("_")} for r in rows]
        print_json(sorted(listed + [bad_spec_row(p) for p in problems], key=lambda r: str(r["name"])))
        return
    if not rows and not problems:
        say("no VMs; 'vgpuctl vm create NAME --profile streaming|gaming|automotive' makes one")
        return
    from rich.markup import escape
    from rich.table import Table

    from vgpuctl.cli.app import out

    table = Table("name", "profile", "state", "memory", "cpus", "vGPU", "display", "order")
    for r in rows:
        table.add_row(r["name"], r["profile"] or "-", "running" if r["running"] else "stopped",
                      f"{r['memory_mib']} MiB", str(r["cpus"]), escape(r["_vgpu"]), r["display"],
                      "-" if r["order"] is None else str(r["order"]))
    for p in problems:
        table.add_row(escape(p.owner), "-", "bad spec", "-", "-", "-", "-", "-")
    out().print(table)
    for p in problems:
        click.echo(f"error: {p.error}", err=True)


@vm.command("show")
@click.argument("name")
@click.option("--json", "json_output", is_flag=True, help="Machine-readable output.")
@reports_errors
def show(name: str, json_output: bool) -> None:
    """A VM's whole spec, its files, host requirements (checked at start) and warnings."""
    from vgpuctl.vm import spec as specs
    from vgpuctl.vm.argv import default_mac
    from vgpuctl.vm.profiles import PROFILES
    from vgpuctl.vm.runtime import RuntimePaths, check_requirements, is_running

    state = state_dir()
    if json_output:
        from vgpuctl.vm.inventory import vm_detail

        print_json(vm_detail(State.root, state, name))
        return
    spec = specs.load(state, name)
    paths = RuntimePaths.for_vm(state, name)
    requirements = check_requirements(State.root, spec)
    running = is_running(state, name)
    rows: list[tuple[str, str]] = [
        ("name", spec.name),
        ("profile", f"{spec.profile}: {PROFILES[spec.profile].summary}" if spec.profile else "-"),
        ("file", str(specs.spec_path(state, name))),
        ("state", "running" if running else "stopped"),
        ("memory", f"{spec.memory_mib} MiB"),
        ("cpus", f"{spec.cpus}" + (f" (-cpu {spec.cpu})" if spec.cpu else "")),
        ("machine", f"{spec.machine}, {spec.firmware}"),
        ("boot", spec.boot + (", fast" if spec.fast_boot else "")
         + (f", order {spec.order}" if spec.order is not None else "")),
    ]
    for disk in spec.disks:
        rows.append(("disk", f"{disk.path} ({disk.format}" + (f", {disk.size} if created)" if disk.size else ")")))
    for label in ("cdrom", "kernel", "initrd", "append"):
        if getattr(spec, label):
            rows.append((label, str(getattr(spec, label))))
    net = spec.network
    where = f" {net.bridge}" if net.bridge else f" {net.ifname}" if net.ifname else ""
    rows.append(("network", net.mode + where + ("" if net.mode == "none" else
                                                  f", mac {net.mac or default_mac(spec.name)}")
                 + (", vhost-net" if net.mode in ("tap", "bridge") and net.vhost else "")))
    rows.append(("vgpu", spec.vgpu.describe()))
    if spec.vgpu.kind != "none":
        shown = "shown by QEMU (display=on, -vga none)" if spec.vgpu_display else "not shown by QEMU (display=off)"
        opregion = {None: "x-igd-opregion for GVT-g types", True: "x-igd-opregion on",
                    False: "x-igd-opregion off"}[spec.igd_opregion]
        rows.append(("vgpu display", shown + (", ramfb boot display" if spec.ramfb else "") + f"; {opregion}"))
    display = spec.display
    detail = display.backend
    if display.backend in ("vnc", "egl-headless"):
        detail += f", VNC on {display.vnc_socket or paths.vnc_socket}"
    if display.backend == "spice":
        detail += f", SPICE on {paths.spice_socket}"
    if display.resolution:
        detail += f", fixed {display.resolution}"
    if display.options:
        detail += ", " + ",".join(f"{k}={v}" for k, v in display.options.items())
    rows.append(("display", detail))
    if spec.rtc_localtime:
        rows.append(("clock", "local time"))
    for arg in spec.extra_args:
        rows.append(("qemu arg", arg))
    for r in requirements:
        rows.append(("requires", f"{r.describe()} — checked when the VM starts"))
    rows.append(("runtime", str(paths.directory)))
    for warning in spec.warnings():
        rows.append(("warning", warning))
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        say(f"{key:<{width}}  {value}")


# ---------------------------------------------------------------------- argv / xml


def _resolve(spec: VmSpec) -> ResolvedVgpu | None:
    from vgpuctl.vm.runtime import resolve_vgpu

    return resolve_vgpu(State.root, spec)


def _default_qemu() -> str:
    from vgpuctl.vm.lifecycle import default_qemu

    return default_qemu()


def build(name: str, accel: str, qemu: str | None) -> tuple[VmSpec, ResolvedVgpu | None, QemuCommand, list[str]]:
    from vgpuctl.vm.lifecycle import prepare

    prepared = prepare(State.root, state_dir(), name, accel=accel, qemu=qemu)
    return prepared.spec, prepared.vgpu, prepared.command, prepared.notes


@vm.command("argv")
@click.argument("name")
@click.option("--accel", type=click.Choice(["auto", "kvm", "tcg"]), default="auto", show_default=True,
              help="Accelerator; auto runs the KVM probe (a tiny guest) and falls back to tcg.")
@click.option("--qemu", "qemu", metavar="PATH", help="QEMU binary (default: found as 'vgpuctl doctor' does).")
@click.option("--json", "json_output", is_flag=True, help="Machine-readable output.")
@reports_errors
def argv_command(name: str, accel: str, qemu: str | None, json_output: bool) -> None:
    """The exact QEMU command line the VM starts with (shell-quoted), notes as # comments above it."""
    _, vgpu, command, notes = build(name, accel, qemu)
    if json_output:
        print_json({"argv": command.argv, "notes": notes, "vgpu": vgpu.to_json() if vgpu else None,
                    "accel": command.argv[command.argv.index("-accel") + 1],
                    "simulated_replacement": "x".join(map(str, command.replaced_vgpu))
                    if command.replaced_vgpu else None,
                    "paths": command.paths.to_json()})
        return
    for note in notes:
        say(f"# {note}")
    say(command.shell())


@vm.command("xml")
@click.argument("name")
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path), help="Write to FILE.")
@reports_errors
def xml_command(name: str, output: Path | None) -> None:
    """The VM as libvirt domain XML (for virsh define); the vGPU must exist when libvirt starts it."""
    from vgpuctl.vm import spec as specs
    from vgpuctl.vm.libvirt import domain_xml

    spec = specs.load(state_dir(), name)
    vgpu = _resolve(spec)
    qemu = _default_qemu()
    text = domain_xml(spec, vgpu, emulator=qemu if qemu.startswith("/") else None)
    notes = []
    if vgpu is not None and vgpu.state != "active":
        notes.append(f"vGPU {vgpu.uuid} ({vgpu.type_id} on {vgpu.parent}) does not exist yet: create it first "
                     f"(vgpuctl create -p {vgpu.parent} -t {vgpu.type_id} -u {vgpu.uuid}); libvirt does not")
    if State.root.is_simulated and vgpu is not None:
        notes.append("simulated host: the XML names the vGPU as libvirt on a real host would")
    if output:
        from vgpuctl.host.files import atomic_write

        atomic_write(output.absolute(), text.encode())
        say(f"wrote {output}")
        for note in notes:
            say(f"note: {note}")
    else:
        for note in notes:
            click.echo(f"note: {note}", err=True)
        click.echo(text, nl=False)


# ---------------------------------------------------------------------- running VMs

accel_option = click.option("--accel", type=click.Choice(["auto", "kvm", "tcg"]), default="auto", show_default=True,
                            help="Accelerator; auto: KVM when a probe guest really runs under it, else TCG.")


def _print_status(status: Any, json_output: bool) -> None:
    if json_output:
        print_json(status.to_json())
        return
    line = f"{status.name}: {status.state}"
    if status.pid:
        line += f" (pid {status.pid}, {status.accel or '?'})"
    if status.detail:
        line += f" - {status.detail}"
    say(line)
    if status.vgpu:
        say(f"  vGPU       {status.vgpu}")
    if status.simulated_display:
        say(f"  display    {status.simulated_display} in place of the vGPU (simulated host)")
    if status.uptime_s is not None:
        say(f"  uptime     {status.uptime_s:.0f} s")
    if status.guest is not None:
        if status.guest.get("agent"):
            say(f"  guest      {status.guest.get('os') or '?'} (kernel {status.guest.get('kernel') or '?'})")
            say(f"  addresses  {', '.join(status.guest.get('ip_addresses') or []) or 'none'}")
        else:
            say(f"  guest      {status.guest.get('detail')}")
    for kind, where in status.console.items():
        say(f"  {kind:<10} {where}")
    for line in status.log_tail:
        say(f"  | {line}")


@vm.command("start")
@click.argument("name")
@accel_option
@click.option("--qemu", metavar="PATH", help="QEMU binary.")
@click.option("--json", "json_output", is_flag=True, help="Machine-readable output.")
@reports_errors
def start(name: str, accel: str, qemu: str | None, json_output: bool) -> None:
    """Start the VM: preflight, its vGPU (created on demand, then reused), QEMU until QMP says running."""
    from vgpuctl.vm import lifecycle

    _print_status(lifecycle.start(State.root, state_dir(), name, accel=accel, qemu=qemu), json_output)


@vm.command("autostart")
@accel_option
@click.option("--stop", "stop_them", is_flag=True,
              help="Stop the running autostart VMs instead, in the reverse order (at shutdown).")
@click.option("--json", "json_output", is_flag=True, help="Machine-readable output.")
@reports_errors
def autostart(accel: str, stop_them: bool, json_output: bool) -> None:
    """Start every VM marked autostart, in their order, each until it runs (e.g. at boot).

    A VM that already runs counts as started; one that fails is reported and the next one still
    starts; the exit status is 1 if any failed. 'vgpuctl install-units' runs this at boot."""
    from vgpuctl.vm import lifecycle

    if stop_them:
        results = lifecycle.autostop(State.root, state_dir())
    else:
        results = lifecycle.autostart(State.root, state_dir(), accel=accel)
    if json_output:
        print_json([r.to_json() for r in results])
    else:
        if not results:
            say("no running VM is marked autostart" if stop_them
                else "no VM is marked autostart ('vgpuctl vm edit NAME --autostart')")
        for r in results:
            say(f"{r.name}: {r.outcome}" + (f" - {r.detail}" if r.detail else ""))
    if any(r.outcome == "failed" for r in results):
        raise SystemExit(1)


@vm.command("stop")
@click.argument("name")
@click.option("--timeout", type=float, default=30.0, show_default=True, help="Seconds to wait for the guest.")
@reports_errors
def stop(name: str, timeout: float) -> None:
    """ACPI power button; quit QEMU if the guest has not powered off in time."""
    from vgpuctl.vm import lifecycle

    _print_status(lifecycle.stop(State.root, state_dir(), name, timeout_s=timeout), False)


@vm.command("kill")
@click.argument("name")
@reports_errors
def kill(name: str) -> None:
    """Kill QEMU at once (the guest gets no chance to shut down)."""
    from vgpuctl.vm import lifecycle

    _print_status(lifecycle.kill(State.root, state_dir(), name), False)


@vm.command("status")
@click.argument("name")
@click.option("--json", "json_output", is_flag=True, help="Machine-readable output.")
@reports_errors
def status_command(name: str, json_output: bool) -> None:
    """Running, paused, stopped or crashed (with the tail of QEMU's log); the accelerator; where to connect."""
    from vgpuctl.vm import lifecycle

    _print_status(lifecycle.status(State.root, state_dir(), name, guest=True), json_output)


@vm.command("console")
@click.argument("name")
@click.option("--attach", is_flag=True, help="Connect this terminal to the guest's serial console (Ctrl-] leaves).")
@reports_errors
def console(name: str, attach: bool) -> None:
    """Where to connect to the VM's display and consoles; with --attach, its serial console here."""
    from vgpuctl.vm import lifecycle

    status = lifecycle.status(State.root, state_dir(), name)
    if not status.console:
        raise InvalidInput("VM {name} is {state}: nothing to connect to", what="vm", name=name, state=status.state)
    if attach:
        serial = status.console.get("serial")
        if serial is None:
            raise InvalidInput("VM {name} has no serial console socket (started before vgpuctl had one: restart it)",
                               what="vm", name=name)
        _attach(serial.removeprefix("unix:"))
        return
    for kind, where in status.console.items():
        say(f"{kind:<10} {where}")


ESCAPE = b"\x1d"  # Ctrl-], as virsh console and telnet


def _attach(path: str) -> None:
    """Relay this terminal to a unix socket and back, raw, until Ctrl-] or the socket closes."""
    import contextlib
    import select
    import socket
    import termios
    import tty

    stdin, stdout = sys.stdin.fileno(), sys.stdout.fileno()
    with socket.socket(socket.AF_UNIX) as sock, contextlib.ExitStack() as restore:
        sock.connect(path)
        if os.isatty(stdin):
            saved = termios.tcgetattr(stdin)
            restore.callback(termios.tcsetattr, stdin, termios.TCSADRAIN, saved)
            tty.setraw(stdin)
            click.echo("connected to the serial console; Ctrl-] leaves\r", err=True)
        sources = [sock, stdin]
        while True:
            ready, _, _ = select.select(sources, [], [])
            if sock in ready:
                data = sock.recv(65536)
                if not data:
                    return  # QEMU closed it: the VM ended
                os.write(stdout, data)
            if stdin in ready:
                data = os.read(stdin, 4096)
                if not data:
                    sources.remove(stdin)  # input ended (a pipe): keep showing the guest's output
                    continue
                if ESCAPE in data:
                    sock.sendall(data.split(ESCAPE, 1)[0])
                    return
                sock.sendall(data)


@vm.command("screenshot")
@click.argument("name")
@click.argument("file", type=click.Path(dir_okay=False, path_type=Path))
@reports_errors
def screenshot(name: str, file: Path) -> None:
    """Save the VM's display as a PNG (QMP screendump)."""
    from vgpuctl.vm import lifecycle

    say(str(lifecycle.screenshot(State.root, state_dir(), name, file)))


@vm.command("release-vgpu")
@click.argument("name")
@reports_errors
def release_vgpu(name: str) -> None:
    """Remove the vGPU vgpuctl made for a stopped VM (it is otherwise kept and reused by the next start)."""
    from vgpuctl.vm import lifecycle

    uuid = lifecycle.release_vgpu(State.root, state_dir(), name)
    say(f"removed vGPU {uuid}" if uuid else f"VM {name} holds no vGPU")
