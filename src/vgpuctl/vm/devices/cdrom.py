"""The VM's CD-ROM: an ISO image on the IDE bus (SATA on q35 in libvirt's XML), read-only."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from vgpuctl.vm.checks import absolute
from vgpuctl.vm.devices.base import QemuContext, XmlContext, qemu_value

if TYPE_CHECKING:
    from vgpuctl.vm.spec import VmSpec

QEMU_POSITION = 40
XML_POSITION = 20
TABLES: tuple[type[Any], ...] = ()


@dataclass
class Fields:
    cdrom: str | None = None


def check(spec: VmSpec) -> None:
    absolute("cdrom", spec.cdrom)


def qemu_args(ctx: QemuContext) -> list[str]:
    if not ctx.spec.cdrom:
        return []
    return ["-drive", f"file={qemu_value(ctx.spec.cdrom)},if=ide,media=cdrom,readonly=on"]


def xml(ctx: XmlContext) -> None:
    spec = ctx.spec
    if not spec.cdrom:
        return
    element = ctx.add(ctx.devices, "disk", type="file", device="cdrom")
    ctx.add(element, "driver", name="qemu", type="raw")
    ctx.add(element, "source", file=spec.cdrom)
    ctx.add(element, "target", dev="hdc", bus="ide" if spec.machine == "pc" else "sata")
    ctx.add(element, "readonly")
