"""The input device: a USB tablet, an absolute pointer for VNC/SPICE/windows (on the USB controller)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from vgpuctl.vm.devices import usb
from vgpuctl.vm.devices.base import QemuContext, XmlContext, spec_fields

if TYPE_CHECKING:
    from vgpuctl.vm.spec import VmSpec

QEMU_POSITION = 51
XML_POSITION = 50
TABLES: tuple[type[Any], ...] = ()


@spec_fields
class Fields:
    """No spec field: present with the USB controller."""


def check(spec: VmSpec) -> None:
    pass


def qemu_args(ctx: QemuContext) -> list[str]:
    return ["-device", "usb-tablet,id=input0,bus=usb.0"] if usb.present(ctx.spec) else []


def xml(ctx: XmlContext) -> None:
    if usb.present(ctx.spec):
        ctx.add(ctx.devices, "input", type="tablet", bus="usb")
