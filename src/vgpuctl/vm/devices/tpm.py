"""A TPM 2.0 (CRB interface): QEMU's emulator backend on the socket of an swtpm the lifecycle starts with the VM."""

from __future__ import annotations

from dataclasses import field
from typing import Any

from vgpuctl.vm.devices.base import OMIT_DEFAULT, QemuContext, XmlContext, no_check, option, qemu_value, spec_fields

QEMU_POSITION = 92
XML_POSITION = 95
TABLES: tuple[type[Any], ...] = ()


@spec_fields
class Fields:
    tpm: bool = field(default=False, metadata=OMIT_DEFAULT | option(
        "--tpm/--no-tpm", "A TPM 2.0 (swtpm, started with the VM; Windows 11 needs it)."))


check = no_check  # nothing of its own to validate


def qemu_args(ctx: QemuContext) -> list[str]:
    if not ctx.spec.tpm:
        return []
    return ["-chardev", f"socket,id=chrtpm,path={qemu_value(str(ctx.paths.swtpm_socket))}",
            "-tpmdev", "emulator,id=tpm0,chardev=chrtpm", "-device", "tpm-crb,tpmdev=tpm0"]


def xml(ctx: XmlContext) -> None:
    if ctx.spec.tpm:  # libvirt starts its own swtpm
        ctx.add(ctx.add(ctx.devices, "tpm", model="tpm-crb"), "backend", type="emulator", version="2.0")
