"""The QEMU command line for a VM, as libvirt emits it (spec/peers.md §2.1), built without running anything.

``build_command(spec, vgpu, qemu=..., accel=..., runtime_dir=..., simulated=...)`` returns the argv,
the notes a user should see (``vm argv``, ``vm status``) and the VM's :class:`RuntimePaths`;
``build_argv`` is its argv alone. The caller decides everything that needs a probe: the
accelerator (``kvm`` or ``tcg``), whether the host has ``/dev/vhost-net``, whether the host is
simulated, and which vGPU the VM gets (:func:`vgpuctl.vm.runtime.resolve_vgpu`). QEMU is not
daemonized: the lifecycle starts it detached and reads ``paths.pidfile``/``paths.qmp_socket``.

The vGPU (peers.md §2.1, qemu-streaming.md §1):

* ``-device vfio-pci,id=hostdev0,sysfsdev=/sys/bus/mdev/devices/<uuid>,display=on|off`` — display
  always explicit, as libvirt does; with ``ramfb`` the non-hotpluggable driver
  ``vfio-pci-nohotplug,...,display=on,ramfb=on``; ``x-igd-opregion=on`` for GVT-g types (i915-*);
  ``xres``/``yres`` when the spec fixes a resolution (EDID).
* ``sysfsdev`` is the host's real ``/sys`` path: an argument QEMU opens on the host, never a path
  vgpuctl reads, so it is not put under the host root.
* The vGPU as the display: ``-vga none`` and an OpenGL UI (egl-headless, spice ``gl=on``, dbus
  ``gl=on``, gtk/sdl ``gl=on``); GVT-g hands QEMU dma-bufs that only an OpenGL UI can import.
* GVT-g guests get ``-global PIIX4_PM.disable_s3=1 -global PIIX4_PM.disable_s4=1`` (ICH9-LPC on
  q35), as in all of Intel's examples.

On a simulated host QEMU cannot open the simulated vGPU, so the same VM is started with the vGPU's
device replaced by an emulated display adapter at the vGPU type's resolution (``VGA`` as the
primary display when the vGPU is the display, else a secondary ``bochs-display``; both take
``xres``/``yres`` in Debian's QEMU 7.2), without OpenGL (the emulated adapter needs none, and a
host without a GPU has no render node); a note says so.
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass, field
from pathlib import Path

from vgpuctl.vm.runtime import OVMF_CODE, ResolvedVgpu, RuntimePaths
from vgpuctl.vm.spec import VmSpec, default_mac, parse_resolution

ACCELERATORS = ("kvm", "tcg")
BRIDGE_HELPER = "/usr/lib/qemu/qemu-bridge-helper"  # Debian's qemu-system-common
VGPU_ID = "hostdev0"
FALLBACK_RESOLUTION = (1024, 768)
GUEST_AGENT_CHANNEL = "org.qemu.guest_agent.0"

__all__ = ["ACCELERATORS", "QemuCommand", "RuntimePaths", "build_argv", "build_command", "default_mac"]


@dataclass
class QemuCommand:
    """The QEMU command line of a VM, the files it uses, and notes on choices made for it."""

    argv: list[str]
    paths: RuntimePaths
    notes: list[str] = field(default_factory=list)
    # Simulated host: the vGPU was replaced by an emulated adapter at this resolution.
    replaced_vgpu: tuple[int, int] | None = None

    def shell(self) -> str:
        return shlex.join(self.argv)


def qemu_value(text: str) -> str:
    """A value inside QEMU's key=value,... option syntax (a comma is written twice)."""
    return text.replace(",", ",,")


def options(first: str, **props: str | None) -> str:
    """``first,k=v,...`` with None values left out."""
    parts = [first] + [f"{k}={v}" for k, v in props.items() if v is not None]
    return ",".join(parts)


def build_argv(spec: VmSpec, vgpu: ResolvedVgpu | None, *, qemu: str, accel: str, runtime_dir: Path,
               simulated: bool, vhost_net: bool = False) -> list[str]:
    return build_command(spec, vgpu, qemu=qemu, accel=accel, runtime_dir=runtime_dir, simulated=simulated,
                         vhost_net=vhost_net).argv


def build_command(spec: VmSpec, vgpu: ResolvedVgpu | None, *, qemu: str, accel: str, runtime_dir: Path,
                  simulated: bool, vhost_net: bool = False) -> QemuCommand:
    """The whole command line. ``vgpu`` must be given exactly when the spec asks for one."""
    spec.validate()
    if accel not in ACCELERATORS:
        raise ValueError(f"accelerator must be one of {', '.join(ACCELERATORS)}, got {accel!r}")
    if (vgpu is None) != (spec.vgpu.kind == "none"):
        raise ValueError(f"VM {spec.name} asks for {spec.vgpu.describe()} but the vGPU given is {vgpu}")
    paths = RuntimePaths(Path(runtime_dir))
    command = QemuCommand([qemu], paths)
    argv, notes = command.argv, command.notes
    backend = vgpu.backend if vgpu is not None else None

    argv += ["-name", f"guest={spec.name},debug-threads=on"]
    argv += ["-machine", spec.machine, "-accel", accel]
    cpu = spec.cpu or ("host" if accel == "kvm" else "max")
    model, _, flags = cpu.partition(",")
    if accel == "tcg" and model == "host":
        cpu = "max" + (f",{flags}" if flags else "")
        notes.append(f"TCG has no 'host' CPU model: -cpu {cpu} instead of {spec.cpu or 'host'}")
    argv += ["-cpu", cpu, "-m", str(spec.memory_mib), "-smp", str(spec.cpus)]
    if spec.firmware == "ovmf":
        argv += ["-drive", f"if=pflash,format=raw,unit=0,readonly=on,file={qemu_value(OVMF_CODE)}",
                 "-drive", f"if=pflash,format=raw,unit=1,file={qemu_value(str(paths.nvram))}"]
    argv += ["-no-user-config", "-nodefaults", "-msg", "timestamp=on"]
    argv += ["-qmp", f"unix:{qemu_value(str(paths.qmp_socket))},server=on,wait=off"]
    argv += ["-pidfile", str(paths.pidfile)]
    # The serial console: a socket to type on, and all the guest writes there also in serial.log.
    argv += ["-chardev", f"socket,id=serial0,path={qemu_value(str(paths.serial_socket))},server=on,wait=off,"
                         f"logfile={qemu_value(str(paths.serial_log))}", "-serial", "chardev:serial0"]
    if spec.rtc_localtime:
        argv += ["-rtc", "base=localtime"]
    if backend is not None and not backend.guest_sleep:  # e.g. Intel's GVT-g guides disable guest S3/S4
        pm = "PIIX4_PM" if spec.machine == "pc" else "ICH9-LPC"
        argv += ["-global", f"{pm}.disable_s3=1", "-global", f"{pm}.disable_s4=1"]

    # Boot: BIOS order (a fresh empty disk falls through to the cdrom), or the kernel directly.
    boot: list[str] = []
    if spec.boot == "disk":
        boot.append("order=cd" if spec.cdrom else "order=c")
    elif spec.boot == "cdrom":
        boot.append("order=dc" if spec.disks else "order=d")
    if spec.fast_boot:
        boot.append("menu=off")
    if boot:
        argv += ["-boot", ",".join(boot)]
    if spec.boot == "kernel" and spec.kernel:
        argv += ["-kernel", spec.kernel]
        if spec.initrd:
            argv += ["-initrd", spec.initrd]
        if spec.append:
            argv += ["-append", spec.append]

    for disk in spec.disks:
        argv += ["-drive", f"file={qemu_value(disk.path)},if=virtio,format={disk.format}"]
    if spec.cdrom:
        argv += ["-drive", f"file={qemu_value(spec.cdrom)},if=ide,media=cdrom,readonly=on"]

    if spec.display.backend != "none":  # an absolute pointer for VNC/SPICE/windows
        argv += ["-device", "qemu-xhci,id=usb", "-device", "usb-tablet,id=input0,bus=usb.0"]

    net = spec.network
    if net.mode != "none":
        vhost = None
        if net.mode in ("tap", "bridge") and net.vhost:
            if vhost_net:
                vhost = "on"
            else:
                notes.append("no /dev/vhost-net on this host: networking without vhost-net (slower)")
        if net.mode == "user":
            argv += ["-netdev", "user,id=n0"]
        elif net.mode == "tap":
            argv += ["-netdev", options("tap,id=n0", ifname=net.ifname, script="no", downscript="no", vhost=vhost)]
        else:
            argv += ["-netdev", options("tap,id=n0", br=net.bridge, helper=BRIDGE_HELPER, vhost=vhost)]
        nic = options("virtio-net-pci,netdev=n0", mac=net.mac or default_mac(spec.name))
        argv += ["-device", nic + (",romfile=" if spec.fast_boot else "")]

    # The display adapter and the vGPU.
    fixed = parse_resolution("display.resolution", spec.display.resolution) if spec.display.resolution else None
    gl = spec.vgpu_display and not simulated
    if vgpu is None or not spec.vgpu_display:
        argv += ["-device", options("VGA,id=video0", **_xy(fixed))]  # the display: at the fixed resolution
    if vgpu is not None and simulated:
        size = (fixed if spec.vgpu_display else None) or vgpu.resolution
        if size is None:
            size = FALLBACK_RESOLUTION
            notes.append(f"type {vgpu.type_id} gives no resolution: the emulated adapter uses "
                         f"{size[0]}x{size[1]}")
        adapter = "VGA" if spec.vgpu_display else "bochs-display"
        if spec.vgpu_display:
            argv += ["-vga", "none"]
        argv += ["-device", options(f"{adapter},id={VGPU_ID}", **_xy(size))]
        command.replaced_vgpu = size
        notes.append(f"simulated host: QEMU cannot open the simulated vGPU {vgpu.uuid} ({vgpu.type_id} on "
                     f"{vgpu.parent}), so it is replaced by an emulated display adapter ({adapter}) at "
                     f"{size[0]}x{size[1]}" + (" without OpenGL" if spec.vgpu_display else ""))
    elif vgpu is not None:
        if spec.vgpu_display:
            argv += ["-vga", "none"]
        opregion = spec.igd_opregion if spec.igd_opregion is not None else bool(backend and backend.igd_opregion)
        driver = "vfio-pci-nohotplug" if spec.ramfb else "vfio-pci"
        device = options(f"{driver},id={VGPU_ID}", sysfsdev=vgpu.sysfs_path,
                         display="on" if spec.vgpu_display else "off",
                         ramfb="on" if spec.ramfb else None,
                         **{"x-igd-opregion": "on" if opregion else None},
                         **_xy(fixed if spec.vgpu_display else None))
        argv += ["-device", device]
        if backend is not None and backend.without_kvm and accel != "kvm":
            notes.append(backend.without_kvm)
        if opregion and spec.firmware == "ovmf":
            notes.append("x-igd-opregion with unmodified OVMF: the guest sees no OpRegion (SeaBIOS handles it)")

    if spec.guest_agent:  # the channel name QEMU's guest agent (and libvirt) look for
        argv += ["-chardev", f"socket,id=qga0,path={qemu_value(str(paths.agent_socket))},server=on,wait=off",
                 "-device", "virtio-serial-pci,id=virtio-serial0",
                 "-device", f"virtserialport,bus=virtio-serial0.0,chardev=qga0,name={GUEST_AGENT_CHANNEL}"]
    argv += _display_args(spec, paths, gl=gl, simulated=simulated, notes=notes)
    argv += spec.extra_args
    notes += paths.socket_problems()
    return command


def _xy(size: tuple[int, int] | None) -> dict[str, str | None]:
    return {"xres": str(size[0]), "yres": str(size[1])} if size else {}


def _display_args(spec: VmSpec, paths: RuntimePaths, *, gl: bool, simulated: bool, notes: list[str]) -> list[str]:
    display = spec.display
    backend = display.backend
    extra = "".join(f",{k}={v}" for k, v in display.options.items())
    render = f",rendernode={qemu_value(display.rendernode)}" if display.rendernode and gl else ""
    if backend in ("vnc", "egl-headless"):
        # egl-headless imports the dma-buf with OpenGL and copies it back for the VNC server.
        vnc = f"unix:{qemu_value(display.vnc_socket or str(paths.vnc_socket))}"
        egl = not simulated and (gl or backend == "egl-headless")
        if backend == "egl-headless" and simulated:
            notes.append("simulated host: no egl-headless (no render node, nothing to import): VNC alone")
        if display.rendernode and egl:
            render = f",rendernode={qemu_value(display.rendernode)}"
        head = f"egl-headless{render}" if egl else "none"
        if backend == "egl-headless":
            return ["-display", head + (extra if egl else ""), "-vnc", vnc]
        return ["-display", head, "-vnc", vnc + extra]
    if backend == "spice":
        spice = f"unix=on,addr={qemu_value(str(paths.spice_socket))},disable-ticketing=on"
        return ["-display", "none", "-spice", spice + (",gl=on" if gl else "") + render + extra]
    if backend == "dbus":
        p2p = "" if "p2p" in display.options else ",p2p=yes"
        return ["-display", f"dbus{p2p}" + (",gl=on" if gl else "") + render + extra]
    if backend in ("gtk", "sdl"):
        return ["-display", backend + (",gl=on" if gl else "") + extra]
    return ["-display", "none" + extra]
