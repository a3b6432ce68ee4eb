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

from vgpuctl.vm import machine
from vgpuctl.vm.devices import KINDS
from vgpuctl.vm.devices.base import XmlContext
from vgpuctl.vm.devices.vgpu import HOSTDEV_ALIAS
from vgpuctl.vm.runtime import ResolvedVgpu, RuntimePaths
from vgpuctl.vm.spec import VmSpec

QEMU_NS = "http://libvirt.org/schemas/domain/qemu/1.0"
# Hyper-V CPU flags (QEMU -cpu spelling) and how libvirt says them.
_HYPERV = {f"hv{sep}{name}": name for sep in "_-" for name in ("relaxed", "vapic", "vpindex", "runtime", "synic",
                                                                  "stimer", "frequencies")}


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

    os_ = ET.SubElement(domain, "os", firmware="efi") if spec.secure_boot else ET.SubElement(domain, "os")
    _text(os_, "type", "hvm", arch="x86_64", machine=spec.machine)
    if spec.firmware == "ovmf":
        code, template = machine.ovmf(spec)
        secure = {"secure": "yes"} if spec.secure_boot else {}
        _text(os_, "loader", code, readonly="yes", **secure, type="pflash")
        nvram = ET.SubElement(os_, "nvram", template=template)
        if paths is not None:
            nvram.text = str(machine.nvram(spec, paths))
    if spec.boot == "kernel" and spec.kernel:
        _text(os_, "kernel", spec.kernel)
        if spec.initrd:
            _text(os_, "initrd", spec.initrd)
        if spec.append:
            _text(os_, "cmdline", spec.append)
    for boot_device in machine.boot_order(spec):
        ET.SubElement(os_, "boot", dev={"disk": "hd", "cdrom": "cdrom"}[boot_device])
    if spec.fast_boot:
        ET.SubElement(os_, "bootmenu", enable="no")

    # CPU: the model, and the flags libvirt has elements for; anything else keeps QEMU's -cpu as is.
    cpu = machine.cpu(spec, "kvm")  # a KVM domain
    model, *flags = cpu.split(",")
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
    if spec.secure_boot:
        ET.SubElement(features, "smm", state="on")
    if model == "host":
        ET.SubElement(domain, "cpu", mode="host-passthrough")
    elif model == "max":
        ET.SubElement(domain, "cpu", mode="maximum")
    else:
        _text(ET.SubElement(domain, "cpu", mode="custom", match="exact"), "model", model, fallback="forbid")
    if unknown:
        commandline += ["-cpu", cpu]
    clock = ET.SubElement(domain, "clock", offset="localtime" if spec.rtc_localtime else "utc")
    if hypervclock:
        ET.SubElement(clock, "timer", name="hypervclock", present="yes")
    if not machine.guest_may_sleep(vgpu):
        pm = ET.SubElement(domain, "pm")
        ET.SubElement(pm, "suspend-to-mem", enabled="no")
        ET.SubElement(pm, "suspend-to-disk", enabled="no")

    devices = ET.SubElement(domain, "devices")
    if emulator:
        _text(devices, "emulator", emulator)
    ctx = XmlContext(spec, vgpu, paths, devices, commandline)
    for device_kind in sorted(KINDS, key=lambda k: k.XML_POSITION):
        device_kind.xml(ctx)

    commandline += spec.extra_args
    if commandline:
        element = ET.SubElement(domain, f"{{{QEMU_NS}}}commandline")
        for arg in commandline:
            ET.SubElement(element, f"{{{QEMU_NS}}}arg", value=arg)
    if ctx.overrides:
        override = ET.SubElement(domain, f"{{{QEMU_NS}}}override")
        device = ET.SubElement(override, f"{{{QEMU_NS}}}device", alias=HOSTDEV_ALIAS)
        frontend = ET.SubElement(device, f"{{{QEMU_NS}}}frontend")
        for name, kind, value in ctx.overrides:
            ET.SubElement(frontend, f"{{{QEMU_NS}}}property", name=name, type=kind, value=value)
    ET.indent(domain)
    return ET.tostring(domain, encoding="unicode") + "\n"


def _text(parent: ET.Element, tag: str, text: str, **attrs: str) -> ET.Element:
    element = ET.SubElement(parent, tag, attrs)
    element.text = text
    return element
