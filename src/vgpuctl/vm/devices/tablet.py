"""The input device: a USB tablet, an absolute pointer for VNC/SPICE/windows (on the USB controller)."""

from __future__ import annotations

from typing import Any

from vgpuctl.vm.devices import usb
from vgpuctl.vm.devices.base import QemuContext, XmlContext, no_check, spec_fields

QEMU_POSITION = 51
XML_POSITION = 50
TABLES: tuple[type[Any], ...] = ()


@spec_fields
class Fields:
    """No spec field: present with the USB controller."""


check = no_check  # nothing of its own to validate


def qemu_args(ctx: QemuContext) -> list[str]:
    return ["-device", "usb-tablet,id=input0,bus=usb.0"] if usb.present(ctx.spec) else []


def xml(ctx: XmlContext) -> None:
    if usb.present(ctx.spec):
        ctx.add(ctx.devices, "input", type="tablet", bus="usb")
