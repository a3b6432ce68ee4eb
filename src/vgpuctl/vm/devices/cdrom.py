"""The VM's CD-ROMs: an ISO image, and one with drivers (virtio-win for Windows), on the IDE bus (SATA on q35
in libvirt's XML), read-only."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from vgpuctl.vm.checks import absolute
from vgpuctl.vm.devices.base import QemuContext, XmlContext, qemu_value, spec_fields

if TYPE_CHECKING:
    from vgpuctl.vm.spec import VmSpec

QEMU_POSITION = 40
XML_POSITION = 20
TABLES: tuple[type[Any], ...] = ()


@spec_fields
class Fields:
    cdrom: str | None = None
    drivers_cdrom: str | None = None  # a second CD-ROM, e.g. virtio-win.iso (Windows' virtio drivers); not booted


def check(spec: VmSpec) -> None:
    absolute("cdrom", spec.cdrom)
    absolute("drivers_cdrom", spec.drivers_cdrom)


def _images(spec: VmSpec) -> list[tuple[str, str]]:
    """(ISO, libvirt's target) of each CD-ROM, in order."""
    return [(iso, target) for iso, target in ((spec.cdrom, "hdc"), (spec.drivers_cdrom, "hdd")) if iso]


def qemu_args(ctx: QemuContext) -> list[str]:
    return [arg for iso, _ in _images(ctx.spec)
            for arg in ("-drive", f"file={qemu_value(iso)},if=ide,media=cdrom,readonly=on")]


def xml(ctx: XmlContext) -> None:
    spec = ctx.spec
    for iso, target in _images(spec):
        element = ctx.add(ctx.devices, "disk", type="file", device="cdrom")
        ctx.add(element, "driver", name="qemu", type="raw")
        ctx.add(element, "source", file=iso)
        ctx.add(element, "target", dev=target, bus="ide" if spec.machine == "pc" else "sata")
        ctx.add(element, "readonly")
