"""The VM's vGPU: which one it asks for, and how QEMU and libvirt attach it (its backend says how).

QEMU: ``-device vfio-pci,id=hostdev0,<the backend's property>,display=on|off`` (display always explicit,
as libvirt does, except on a vGPU that has none: an Intel SR-IOV VF, ``host=BDF``, and libvirt's PCI
``<hostdev>`` of it); with ``ramfb`` the non-hotpluggable ``vfio-pci-nohotplug``; ``x-igd-opregion=on`` by
the backend's default (GVT-g) unless the spec says; ``xres``/``yres`` when the spec fixes a resolution
(EDID). libvirt: the backend's ``<hostdev>``, and what it has no XML for as ``<qemu:override>`` properties
of it (libvirt >= 8.2). On a simulated host QEMU cannot open the vGPU: an emulated adapter at the type's
resolution stands in (``VGA`` as the display, else a secondary ``bochs-display``), without OpenGL.
"""

from __future__ import annotations

from dataclasses import field
from typing import TYPE_CHECKING, Any

from vgpuctl.base.errors import InvalidInput
from vgpuctl.vm.checks import MAX_MEMORY_MIB, absolute, parse_resolution, positive
from vgpuctl.vm.devices.base import (
    OMIT_DEFAULT,
    QemuContext,
    Record,
    XmlContext,
    option,
    options,
    qemu_value,
    spec_fields,
    spec_record,
    xy,
)
from vgpuctl.vm.devices.display import GL_BACKENDS, fixed_resolution

if TYPE_CHECKING:
    from vgpuctl.mdev.choose import Request
    from vgpuctl.vm.runtime import ResolvedVgpu
    from vgpuctl.vm.spec import VmSpec

QEMU_POSITION = 80
XML_POSITION = 80
VGPU_ID = "hostdev0"
HOSTDEV_ALIAS = "ua-hostdev0"  # user aliases must start with "ua-"
FALLBACK_RESOLUTION = (1024, 768)


@spec_record
class VgpuRequest(Record):
    """Which vGPU the VM gets: one of a UUID, a type (on a parent), requirements for the chooser, an SR-IOV VF,
    or none."""

    uuid: str | None = None  # an existing vGPU or mdevctl definition
    vf: str | None = None  # an SR-IOV VF by its PCI address, or a PF's address: a free VF of it (vgpuctl vfs);
    # with type (NVIDIA vendor-specific VFIO): the numeric vGPU type id the VF is given at start
    parent: str | None = None  # with uuid: disambiguates; with type or requirements: restricts
    type: str | None = None
    resolution: str | None = None  # "1920x1200": at least this resolution
    min_memory_mib: int | None = None
    weight: int | None = None
    rom: str | None = None  # a VF's option ROM file (QEMU romfile=, libvirt <rom file>): Windows on an Intel VF
    largest: bool = field(default=False, metadata=OMIT_DEFAULT)  # the largest type that still fits
    keep: bool = field(default=True, metadata=OMIT_DEFAULT)  # keep the vGPU vgpuctl made when QEMU ends, for
    # the next start (GVT-g fragments its graphics memory when vGPUs come and go); false: remove it whenever
    # QEMU ends (stop, power-off, crash)

    @property
    def kind(self) -> str:
        """'uuid', 'vf', 'type', 'requirements' or 'none'."""
        if self.vf:
            return "vf"
        if self.uuid:
            return "uuid"
        if self.type:
            return "type"
        if self.resolution or self.min_memory_mib or self.weight or self.largest:
            return "requirements"
        return "none"

    def describe(self) -> str:
        on = f" on {self.parent}" if self.parent else ""
        if self.kind == "uuid":
            return f"vGPU {self.uuid}{on}"
        if self.kind == "vf":
            return f"SR-IOV VF {self.vf}" + (f" as vGPU type {self.type}" if self.type else "")
        if self.kind == "type":
            return f"a new {self.type}{on}"
        if self.kind == "requirements":
            parts = ["the largest type that fits"] if self.largest else []
            if self.resolution or self.min_memory_mib or self.weight:
                parts.append(self.requirements().describe())
            return f"a new vGPU{on}: {', '.join(parts)}"
        return "none"

    def requirements(self) -> Request:
        """What the chooser is asked for (the resolution checked and parsed)."""
        from vgpuctl.mdev.choose import Request  # the chooser (and sysfs) only when a VM's vGPU is resolved

        resolution = parse_resolution("vgpu.resolution", self.resolution) if self.resolution else None
        return Request(resolution, self.min_memory_mib, self.weight)


TABLES: tuple[type[Any], ...] = (VgpuRequest,)


@spec_fields
class Fields:
    vgpu: VgpuRequest = field(default_factory=VgpuRequest)
    vgpu_display: bool = field(default=False, metadata=option(  # QEMU display=on, -vga none
        "--vgpu-display/--no-vgpu-display", "Show the vGPU's own display (QEMU display=on, -vga none)."))
    ramfb: bool = field(default=False, metadata=option(  # vfio-pci-nohotplug ramfb=on
        "--ramfb/--no-ramfb", "Boot display on the vGPU's console (needs the display)."))
    igd_opregion: bool | None = field(default=None, metadata=option(  # None: the backend's default
        "--igd-opregion/--no-igd-opregion", "x-igd-opregion (default: on for GVT-g types)."))


def igd_opregion(spec: VmSpec, vgpu: ResolvedVgpu) -> bool:
    return spec.igd_opregion if spec.igd_opregion is not None else vgpu.backend.igd_opregion


def check(spec: VmSpec) -> None:
    vgpu = spec.vgpu
    if vgpu.uuid is not None:
        try:
            from vgpuctl.mdev.definitions import canonical_uuid

            canonical = canonical_uuid(vgpu.uuid)
        except InvalidInput:
            raise InvalidInput(f"vgpu.uuid must be a UUID, got {vgpu.uuid!r}") from None
        if canonical != vgpu.uuid:
            raise InvalidInput(f"vgpu.uuid must be written in lower case with hyphens: {canonical}")
    requirements = [k for k in ("resolution", "min_memory_mib", "weight") if getattr(vgpu, k) is not None]
    requirements += ["largest"] if vgpu.largest else []
    if vgpu.vf is not None:
        from vgpuctl.host.pci import check_address

        if check_address(vgpu.vf) != vgpu.vf:
            raise InvalidInput(f"vgpu.vf must be written as lspci -D shows it: {check_address(vgpu.vf)}")
        besides = [k for k in ("uuid", "parent") if getattr(vgpu, k)] + requirements  # (with type: an NVIDIA VF)
        if besides:
            raise InvalidInput(f"vgpu.vf names the whole vGPU (a VF, or a PF to take a free VF of): not with "
                               f"{', '.join(besides)}")
    if vgpu.rom is not None:
        if vgpu.vf is None:
            raise InvalidInput("vgpu.rom is a PCI function's option ROM: it goes with vgpu.vf (an SR-IOV VF), not "
                               "with an mdev vGPU")
        absolute("vgpu.rom", vgpu.rom)
    if vgpu.uuid and (vgpu.type or requirements):
        others = ", ".join((["type"] if vgpu.type else []) + requirements)
        raise InvalidInput(f"vgpu: give either uuid, or type, or requirements (resolution/min_memory_mib/weight/"
                           f"largest), not uuid with {others}")
    if vgpu.type and requirements:
        raise InvalidInput(f"vgpu: give either type or requirements, not type with {', '.join(requirements)}")
    if vgpu.resolution is not None:
        parse_resolution("vgpu.resolution", vgpu.resolution)
    if vgpu.min_memory_mib is not None:
        positive("vgpu.min_memory_mib", vgpu.min_memory_mib, "MiB", maximum=MAX_MEMORY_MIB)
    if vgpu.weight is not None:
        positive("vgpu.weight", vgpu.weight, maximum=16)
    if vgpu.parent is not None and vgpu.kind == "none":
        raise InvalidInput("vgpu.parent alone says nothing: add vgpu.type, vgpu.uuid or requirements")
    if spec.vgpu_display and vgpu.kind == "none":
        raise InvalidInput("vgpu_display = true needs a vGPU (vgpu.uuid, vgpu.type or requirements such as "
                           "vgpu.resolution)")
    if spec.vgpu_display and spec.display.backend not in GL_BACKENDS:
        raise InvalidInput(f"vgpu_display = true needs an OpenGL display backend ({', '.join(GL_BACKENDS)}); "
                           f"display.backend {spec.display.backend!r} cannot show a vGPU")
    if spec.ramfb and not spec.vgpu_display:
        raise InvalidInput("ramfb = true needs vgpu_display = true (QEMU: \"ramfb=on requires display=on\")")


def qemu_args(ctx: QemuContext) -> list[str]:
    spec, vgpu = ctx.spec, ctx.vgpu
    if vgpu is None:
        return []
    fixed = fixed_resolution(spec)
    argv = ["-vga", "none"] if spec.vgpu_display else []
    if ctx.simulated:
        size = (fixed if spec.vgpu_display else None) or vgpu.resolution
        if size is None:
            size = FALLBACK_RESOLUTION
            what = vgpu.describe() if vgpu.backend.pci_function else f"type {vgpu.type_id}"
            ctx.notes.append(f"{what} gives no resolution: the emulated adapter uses "
                             f"{size[0]}x{size[1]}")
        adapter = "VGA" if spec.vgpu_display else "bochs-display"
        ctx.replaced_vgpu = size
        ctx.notes.append(f"simulated host: QEMU cannot open the simulated {vgpu.describe()}, so it is replaced by "
                         f"an emulated display adapter ({adapter}) at "
                         f"{size[0]}x{size[1]}" + (" without OpenGL" if spec.vgpu_display else ""))
        return [*argv, "-device", options(f"{adapter},id={VGPU_ID}", **xy(size))]
    backend = vgpu.backend
    opregion = igd_opregion(spec, vgpu)
    name, value = backend.attachment(vgpu.uuid).qemu_property
    driver = "vfio-pci-nohotplug" if spec.ramfb else "vfio-pci"
    if backend.no_display:  # display=on fails on it; off is QEMU's default (and libvirt's PCI hostdev has none)
        ctx.notes.append(backend.no_display)
    device = options(f"{driver},id={VGPU_ID}", **{name: value},
                     display=None if backend.no_display else "on" if spec.vgpu_display else "off",
                     ramfb="on" if spec.ramfb else None, romfile=qemu_value(spec.vgpu.rom) if spec.vgpu.rom else None,
                     **{"x-igd-opregion": "on" if opregion else None},
                     **xy(fixed if spec.vgpu_display else None))
    if backend.windows_guest and spec.os and spec.os.startswith("windows") and not spec.vgpu.rom:
        ctx.notes.append(backend.windows_guest)
    if backend.without_kvm and ctx.accel != "kvm":
        ctx.notes.append(backend.without_kvm)
    if opregion and spec.firmware == "ovmf":
        ctx.notes.append("x-igd-opregion with unmodified OVMF: the guest sees no OpRegion (SeaBIOS handles it)")
    return [*argv, "-device", device]


def xml(ctx: XmlContext) -> None:
    spec, vgpu = ctx.spec, ctx.vgpu
    if vgpu is None:
        return
    attachment = vgpu.backend.attachment(vgpu.uuid)
    attrs = {"mode": "subsystem", **attachment.hostdev}
    if not vgpu.backend.no_display:
        attrs["display"] = "on" if spec.vgpu_display else "off"
    if spec.ramfb:
        attrs["ramfb"] = "on"
    hostdev = ctx.add(ctx.devices, "hostdev", **attrs)
    ctx.add(ctx.add(hostdev, "source"), "address", **attachment.address)
    if spec.vgpu.rom:
        ctx.add(hostdev, "rom", file=spec.vgpu.rom)
    ctx.add(hostdev, "alias", name=HOSTDEV_ALIAS)
    if igd_opregion(spec, vgpu):
        ctx.overrides.append(("x-igd-opregion", "bool", "true"))
    fixed = fixed_resolution(spec)
    if fixed and spec.vgpu_display:
        ctx.overrides += [("xres", "unsigned", str(fixed[0])), ("yres", "unsigned", str(fixed[1]))]
