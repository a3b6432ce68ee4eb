"""The VM as libvirt domain XML (``vgpuctl vm xml``), valid under libvirt's schema (virt-xml-validate).

The vGPU is the mdev hostdev libvirt documents (peers.md §2.1)::

    <hostdev mode='subsystem' type='mdev' managed='no' model='vfio-pci' display='on' ramfb='on'>
      <source><address uuid='...'/></source>
    </hostdev>

``display='on'`` needs a graphics device (VNC, SPICE or egl-headless), and the vGPU as the display
means ``<video><model type='none'/></video>``. What libvirt has no XML for goes through its QEMU
namespace: ``x-igd-opregion`` and ``xres``/``yres`` as ``<qemu:override>`` properties of the
hostdev (libvirt >= 8.2), a gtk window, unknown CPU flags and the spec's extra arguments as
``<qemu:commandline>``. libvirt itself does not create the mdev: it must exist when the domain
starts (``vgpuctl start`` / mdevctl).
"""

from __future__ import annotations

import xml.etree.ElementTree as ET

from vgpuctl.vm.argv import GUEST_AGENT_CHANNEL, default_mac
from vgpuctl.vm.runtime import OVMF_CODE, OVMF_VARS_TEMPLATE, ResolvedVgpu, RuntimePaths
from vgpuctl.vm.spec import VmSpec, parse_resolution

QEMU_NS = "http://libvirt.org/schemas/domain/qemu/1.0"
HOSTDEV_ALIAS = "ua-hostdev0"  # user aliases must start with "ua-"
# Hyper-V CPU flags (QEMU -cpu spelling) and how libvirt says them.
_HYPERV = {"hv_relaxed": "relaxed", "hv-relaxed": "relaxed", "hv_vapic": "vapic", "hv-vapic": "vapic"}


def domain_xml(spec: VmSpec, vgpu: ResolvedVgpu | None, *, paths: RuntimePaths | None = None,
               emulator: str | None = None) -> str:
    """``<domain type='kvm'>`` for the spec.

    ``paths`` puts the VNC/SPICE sockets, the NVRAM and a serial log where vgpuctl keeps them; without
    it libvirt chooses (VNC on a local port, SPICE local-only, NVRAM under /var/lib/libvirt, a pty).
    """
    spec.validate()
    if (vgpu is None) != (spec.vgpu.kind == "none"):
        raise ValueError(f"VM {spec.name} asks for {spec.vgpu.describe()} but the vGPU given is {vgpu}")
    ET.register_namespace("qemu", QEMU_NS)
    domain = ET.Element("domain", type="kvm")
    commandline: list[str] = []
    _text(domain, "name", spec.name)
    _text(domain, "memory", str(spec.memory_mib), unit="MiB")
    _text(domain, "vcpu", str(spec.cpus))

    os_ = ET.SubElement(domain, "os")
    _text(os_, "type", "hvm", arch="x86_64", machine=spec.machine)
    if spec.firmware == "ovmf":
        _text(os_, "loader", OVMF_CODE, readonly="yes", type="pflash")
        nvram = ET.SubElement(os_, "nvram", template=OVMF_VARS_TEMPLATE)
        if paths is not None:
            nvram.text = str(paths.nvram)
    if spec.boot == "kernel" and spec.kernel:
        _text(os_, "kernel", spec.kernel)
        if spec.initrd:
            _text(os_, "initrd", spec.initrd)
        if spec.append:
            _text(os_, "cmdline", spec.append)
    elif spec.boot == "cdrom":
        ET.SubElement(os_, "boot", dev="cdrom")
        if spec.disks:
            ET.SubElement(os_, "boot", dev="hd")
    else:
        ET.SubElement(os_, "boot", dev="hd")
        if spec.cdrom:
            ET.SubElement(os_, "boot", dev="cdrom")
    if spec.fast_boot:
        ET.SubElement(os_, "bootmenu", enable="no")

    # CPU: the model, and the flags libvirt has elements for; anything else keeps QEMU's -cpu as is.
    model, *flags = (spec.cpu or "host").split(",")
    hyperv: list[tuple[str, dict[str, str]]] = []
    hidden = hypervclock = False
    unknown = []
    for flag in flags:
        if flag in _HYPERV:
            hyperv.append((_HYPERV[flag], {"state": "on"}))
        elif flag.replace("-", "_").startswith("hv_spinlocks="):
            hyperv.append(("spinlocks", {"state": "on", "retries": str(int(flag.split("=", 1)[1], 0))}))
        elif flag in ("hv_time", "hv-time"):
            hypervclock = True
        elif flag == "kvm=off":
            hidden = True
        else:
            unknown.append(flag)
    features = ET.SubElement(domain, "features")
    ET.SubElement(features, "acpi")
    ET.SubElement(features, "apic")
    if hyperv:
        hv = ET.SubElement(features, "hyperv", mode="custom")
        for name, attrs in hyperv:
            ET.SubElement(hv, name, attrs)
    if hidden:
        ET.SubElement(ET.SubElement(features, "kvm"), "hidden", state="on")
    if model == "host":
        ET.SubElement(domain, "cpu", mode="host-passthrough")
    elif model == "max":
        ET.SubElement(domain, "cpu", mode="maximum")
    else:
        _text(ET.SubElement(domain, "cpu", mode="custom", match="exact"), "model", model, fallback="forbid")
    if unknown:
        commandline += ["-cpu", spec.cpu or "host"]
    clock = ET.SubElement(domain, "clock", offset="localtime" if spec.rtc_localtime else "utc")
    if hypervclock:
        ET.SubElement(clock, "timer", name="hypervclock", present="yes")
    if vgpu is not None and not vgpu.backend.guest_sleep:  # e.g. Intel's GVT-g guides: no guest S3/S4
        pm = ET.SubElement(domain, "pm")
        ET.SubElement(pm, "suspend-to-mem", enabled="no")
        ET.SubElement(pm, "suspend-to-disk", enabled="no")

    devices = ET.SubElement(domain, "devices")
    if emulator:
        _text(devices, "emulator", emulator)
    for i, disk in enumerate(spec.disks):
        element = ET.SubElement(devices, "disk", type="file", device="disk")
        ET.SubElement(element, "driver", name="qemu", type=disk.format)
        ET.SubElement(element, "source", file=disk.path)
        ET.SubElement(element, "target", dev=f"vd{chr(ord('a') + i)}", bus="virtio")
    if spec.cdrom:
        element = ET.SubElement(devices, "disk", type="file", device="cdrom")
        ET.SubElement(element, "driver", name="qemu", type="raw")
        ET.SubElement(element, "source", file=spec.cdrom)
        ET.SubElement(element, "target", dev="hdc", bus="ide" if spec.machine == "pc" else "sata")
        ET.SubElement(element, "readonly")
    if spec.display.backend != "none":
        ET.SubElement(devices, "controller", type="usb", model="qemu-xhci")

    net = spec.network
    if net.mode != "none":
        kind = {"user": "user", "tap": "ethernet", "bridge": "bridge"}[net.mode]
        interface = ET.SubElement(devices, "interface", type=kind)
        ET.SubElement(interface, "mac", address=net.mac or default_mac(spec.name))
        if net.mode == "bridge":
            ET.SubElement(interface, "source", bridge=net.bridge or "")
        if net.mode == "tap" and net.ifname:
            ET.SubElement(interface, "target", dev=net.ifname, managed="no")
        ET.SubElement(interface, "model", type="virtio")
        if net.mode in ("tap", "bridge"):
            ET.SubElement(interface, "driver", name="vhost" if net.vhost else "qemu")
        if spec.fast_boot:
            ET.SubElement(interface, "rom", enabled="no")
    if spec.display.backend != "none":
        ET.SubElement(devices, "input", type="tablet", bus="usb")

    commandline += _graphics(devices, spec, paths)
    fixed = parse_resolution("display.resolution", spec.display.resolution) if spec.display.resolution else None
    video = ET.SubElement(devices, "video")
    if vgpu is not None and spec.vgpu_display:
        ET.SubElement(video, "model", type="none")
    else:
        model_element = ET.SubElement(video, "model", type="vga", vram="16384", heads="1", primary="yes")
        if fixed:
            ET.SubElement(model_element, "resolution", x=str(fixed[0]), y=str(fixed[1]))

    properties: list[tuple[str, str, str]] = []
    if vgpu is not None:
        attrs = {"mode": "subsystem", "type": "mdev", "managed": "no", "model": "vfio-pci",
                 "display": "on" if spec.vgpu_display else "off"}
        if spec.ramfb:
            attrs["ramfb"] = "on"
        hostdev = ET.SubElement(devices, "hostdev", attrs)
        ET.SubElement(ET.SubElement(hostdev, "source"), "address", uuid=vgpu.uuid)
        ET.SubElement(hostdev, "alias", name=HOSTDEV_ALIAS)
        if spec.igd_opregion if spec.igd_opregion is not None else vgpu.backend.igd_opregion:
            properties.append(("x-igd-opregion", "bool", "true"))
        if fixed and spec.vgpu_display:
            properties += [("xres", "unsigned", str(fixed[0])), ("yres", "unsigned", str(fixed[1]))]
    if paths is not None:
        serial = ET.SubElement(devices, "serial", type="unix")  # as vgpuctl's own: a socket, logged
        ET.SubElement(serial, "source", mode="bind", path=str(paths.serial_socket))
        ET.SubElement(serial, "log", file=str(paths.serial_log), append="off")
    else:
        ET.SubElement(devices, "serial", type="pty")
    if spec.guest_agent:  # without a source path libvirt makes the socket itself
        channel = ET.SubElement(devices, "channel", type="unix")
        if paths is not None:
            ET.SubElement(channel, "source", mode="bind", path=str(paths.agent_socket))
        ET.SubElement(channel, "target", type="virtio", name=GUEST_AGENT_CHANNEL)

    commandline += spec.extra_args
    if commandline:
        element = ET.SubElement(domain, f"{{{QEMU_NS}}}commandline")
        for arg in commandline:
            ET.SubElement(element, f"{{{QEMU_NS}}}arg", value=arg)
    if properties:
        override = ET.SubElement(domain, f"{{{QEMU_NS}}}override")
        device = ET.SubElement(override, f"{{{QEMU_NS}}}device", alias=HOSTDEV_ALIAS)
        frontend = ET.SubElement(device, f"{{{QEMU_NS}}}frontend")
        for name, kind, value in properties:
            ET.SubElement(frontend, f"{{{QEMU_NS}}}property", name=name, type=kind, value=value)
    ET.indent(domain)
    return ET.tostring(domain, encoding="unicode") + "\n"


def _text(parent: ET.Element, tag: str, text: str, **attrs: str) -> ET.Element:
    element = ET.SubElement(parent, tag, attrs)
    element.text = text
    return element


def _graphics(devices: ET.Element, spec: VmSpec, paths: RuntimePaths | None) -> list[str]:
    """The graphics elements for the backend; returns QEMU arguments libvirt has no element for."""
    display = spec.display
    backend = display.backend
    gl = spec.vgpu_display

    def gl_element(parent: ET.Element) -> None:
        attrs = {"enable": "yes"}
        if display.rendernode:
            attrs["rendernode"] = display.rendernode
        ET.SubElement(parent, "gl", attrs)

    if backend in ("vnc", "egl-headless"):
        if gl or backend == "egl-headless":
            egl = ET.SubElement(devices, "graphics", type="egl-headless")
            if display.rendernode:
                ET.SubElement(egl, "gl", rendernode=display.rendernode)
        vnc = ET.SubElement(devices, "graphics", type="vnc")
        socket = display.vnc_socket or (str(paths.vnc_socket) if paths else None)
        if socket:
            vnc.set("socket", socket)
        else:
            vnc.set("autoport", "yes")
            ET.SubElement(vnc, "listen", type="address", address="127.0.0.1")
        return []
    if backend == "spice":
        spice = ET.SubElement(devices, "graphics", type="spice")
        if paths:
            ET.SubElement(spice, "listen", type="socket", socket=str(paths.spice_socket))
        else:
            ET.SubElement(spice, "listen", type="none")
        if gl:
            gl_element(spice)
        return []
    if backend == "dbus":
        attrs = {"type": "dbus"}
        if "addr" not in display.options:
            attrs["p2p"] = "no" if display.options.get("p2p") == "no" else "yes"
        dbus = ET.SubElement(devices, "graphics", attrs)
        if gl:
            gl_element(dbus)
        return []
    if backend == "sdl":
        sdl = ET.SubElement(devices, "graphics", type="sdl")
        if gl:
            gl_element(sdl)
        return []
    if backend == "gtk":
        # libvirt has no gtk graphics. QEMU's own option goes last on the command line and wins over
        # libvirt's -display; the egl-headless element only satisfies libvirt's rule that display='on'
        # needs a graphics device.
        devices.append(ET.Comment(" gtk: passed to QEMU as -display gtk (qemu:commandline), which replaces "
                                  "the egl-headless display libvirt sets up "))
        if gl:
            ET.SubElement(devices, "graphics", type="egl-headless")
        return ["-display", "gtk" + (",gl=on" if gl else "")]
    return []
