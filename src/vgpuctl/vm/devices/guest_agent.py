"""The QEMU guest agent's channel: a virtio-serial port org.qemu.guest_agent.0 on <vm dir>/qga.sock."""

from __future__ import annotations

from dataclasses import field
from typing import Any

from vgpuctl.vm.devices.base import OMIT_DEFAULT, QemuContext, XmlContext, no_check, option, qemu_value, spec_fields

QEMU_POSITION = 90
XML_POSITION = 100
TABLES: tuple[type[Any], ...] = ()
CHANNEL = "org.qemu.guest_agent.0"  # the name QEMU's guest agent (and libvirt) look for


@spec_fields
class Fields:
    guest_agent: bool = field(default=False, metadata=OMIT_DEFAULT | option(
        "--guest-agent/--no-guest-agent",
        "A channel for the QEMU guest agent: vm status shows what runs inside, vm stop asks it."))


check = no_check  # nothing of its own to validate


def qemu_args(ctx: QemuContext) -> list[str]:
    if not ctx.spec.guest_agent:
        return []
    return ["-chardev", f"socket,id=qga0,path={qemu_value(str(ctx.paths.agent_socket))},server=on,wait=off",
            "-device", "virtio-serial-pci,id=virtio-serial0",
            "-device", f"virtserialport,bus=virtio-serial0.0,chardev=qga0,name={CHANNEL}"]


def xml(ctx: XmlContext) -> None:
    if not ctx.spec.guest_agent:
        return
    channel = ctx.add(ctx.devices, "channel", type="unix")
    if ctx.paths is not None:  # without a source path libvirt makes the socket itself
        ctx.add(channel, "source", mode="bind", path=str(ctx.paths.agent_socket))
    ctx.add(channel, "target", type="virtio", name=CHANNEL)
