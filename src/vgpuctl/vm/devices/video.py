"""The emulated display adapter (VGA): the VM's screen unless its vGPU is the display."""

from __future__ import annotations

from typing import Any

from vgpuctl.vm.devices.base import QemuContext, XmlContext, no_check, options, spec_fields, xy
from vgpuctl.vm.devices.display import fixed_resolution

QEMU_POSITION = 70
XML_POSITION = 70
TABLES: tuple[type[Any], ...] = ()


@spec_fields
class Fields:
    """No spec field of its own: display.resolution fixes its size."""


check = no_check  # nothing of its own to validate


def qemu_args(ctx: QemuContext) -> list[str]:
    if ctx.vgpu is not None and ctx.spec.vgpu_display:
        return []
    return ["-device", options("VGA,id=video0", **xy(fixed_resolution(ctx.spec)))]


def xml(ctx: XmlContext) -> None:
    video = ctx.add(ctx.devices, "video")
    if ctx.vgpu is not None and ctx.spec.vgpu_display:
        ctx.add(video, "model", type="none")
        return
    model = ctx.add(video, "model", type="vga", vram="16384", heads="1", primary="yes")
    fixed = fixed_resolution(ctx.spec)
    if fixed:
        ctx.add(model, "resolution", x=str(fixed[0]), y=str(fixed[1]))
