"""The VM's disk images: virtio drives, created (qemu-img) by the lifecycle when missing at start."""

from __future__ import annotations

import re
from dataclasses import field
from typing import TYPE_CHECKING, Any

from vgpuctl.base.errors import InvalidInput
from vgpuctl.vm.checks import absolute, one_of
from vgpuctl.vm.devices.base import QemuContext, Record, XmlContext, qemu_value, spec_fields, spec_record

if TYPE_CHECKING:
    from vgpuctl.vm.spec import VmSpec

QEMU_POSITION = 30
XML_POSITION = 10
DISK_FORMATS = ("qcow2", "raw")
_SIZE = r"[1-9][0-9]*[KMGT]?"


@spec_record
class Disk(Record):
    """A disk image of the VM."""

    path: str
    size: str | None = None  # qemu-img size (e.g. "20G"); used only to create a missing image at start
    format: str = field(default="qcow2", metadata={"choices": DISK_FORMATS})


TABLES: tuple[type[Any], ...] = (Disk,)


@spec_fields
class Fields:
    disks: list[Disk] = field(default_factory=list)


def check(spec: VmSpec) -> None:
    for i, disk in enumerate(spec.disks):
        absolute(f"disks[{i}].path", disk.path)
        one_of(f"disks[{i}].format", disk.format, DISK_FORMATS)
        if disk.size is not None and not re.fullmatch(_SIZE, disk.size):
            raise InvalidInput(f"disks[{i}].size must be a size such as 20G or 512M, got {disk.size!r}")
    paths = [d.path for d in spec.disks]
    duplicate = next((p for p in paths if paths.count(p) > 1), None)
    if duplicate:
        raise InvalidInput(f"disks: {duplicate} is given twice")


def qemu_args(ctx: QemuContext) -> list[str]:
    return [arg for disk in ctx.spec.disks
            for arg in ("-drive", f"file={qemu_value(disk.path)},if=virtio,format={disk.format}")]


def xml(ctx: XmlContext) -> None:
    for i, disk in enumerate(ctx.spec.disks):
        element = ctx.add(ctx.devices, "disk", type="file", device="disk")
        ctx.add(element, "driver", name="qemu", type=disk.format)
        ctx.add(element, "source", file=disk.path)
        ctx.add(element, "target", dev=f"vd{chr(ord('a') + i)}", bus="virtio")
