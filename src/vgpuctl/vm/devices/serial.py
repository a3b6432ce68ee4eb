"""The serial console every VM has: a unix socket to type on; all the guest writes there is also logged."""

from __future__ import annotations

from typing import Any

from vgpuctl.vm.devices.base import QemuContext, XmlContext, no_check, qemu_value, spec_fields

QEMU_POSITION = 10
XML_POSITION = 90
TABLES: tuple[type[Any], ...] = ()


@spec_fields
class Fields:
    """No spec field: every VM has it."""


check = no_check  # nothing of its own to validate


def qemu_args(ctx: QemuContext) -> list[str]:
    paths = ctx.paths
    return ["-chardev", f"socket,id=serial0,path={qemu_value(str(paths.serial_socket))},server=on,wait=off,"
                        f"logfile={qemu_value(str(paths.serial_log))}", "-serial", "chardev:serial0"]


def xml(ctx: XmlContext) -> None:
    if ctx.paths is None:  # libvirt chooses: a pty
        ctx.add(ctx.devices, "serial", type="pty")
        return
    serial = ctx.add(ctx.devices, "serial", type="unix")  # as vgpuctl's own: a socket, logged
    ctx.add(serial, "source", mode="bind", path=str(ctx.paths.serial_socket))
    ctx.add(serial, "log", file=str(ctx.paths.serial_log), append="off")
