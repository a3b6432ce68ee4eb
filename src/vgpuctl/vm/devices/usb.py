"""The USB (xHCI) controller, there for the tablet whenever the VM has a display."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from vgpuctl.vm.devices.base import QemuContext, XmlContext, no_check, spec_fields

if TYPE_CHECKING:
    from vgpuctl.vm.spec import VmSpec

QEMU_POSITION = 50
XML_POSITION = 30
TABLES: tuple[type[Any], ...] = ()


@spec_fields
class Fields:
    """No spec field: present with any display backend but "none"."""


def present(spec: VmSpec) -> bool:
    return spec.display.backend != "none"


check = no_check  # nothing of its own to validate


def qemu_args(ctx: QemuContext) -> list[str]:
    return ["-device", "qemu-xhci,id=usb"] if present(ctx.spec) else []


def xml(ctx: XmlContext) -> None:
    if present(ctx.spec):
        ctx.add(ctx.devices, "controller", type="usb", model="qemu-xhci")
