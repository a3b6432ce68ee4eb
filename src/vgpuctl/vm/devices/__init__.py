"""The VM's devices, one module per kind (as virt-manager's ``virtinst/devices``): each owns its spec fields
(``Fields``, a base of :class:`vgpuctl.vm.spec.VmSpec`), their validation and defaults, its QEMU arguments and
its libvirt XML (see :mod:`.base` for the protocol). A new kind is a new module and its ``Fields`` below.
"""

from __future__ import annotations

import sys
from typing import Any, cast

from vgpuctl.vm.devices import cdrom, disk, display, guest_agent, network, serial, tablet, tpm, usb, vgpu, video
from vgpuctl.vm.devices.base import DeviceKind, spec_fields


# Every kind's fields, last kind first: a dataclass lists its bases' fields from the last base on, so the
# spec (and its TOML file) lists them in KINDS' order, which is also the order their checks run in.
@spec_fields
class DeviceFields(
    tpm.Fields,
    guest_agent.Fields,
    vgpu.Fields,
    video.Fields,
    display.Fields,
    network.Fields,
    tablet.Fields,
    usb.Fields,
    cdrom.Fields,
    disk.Fields,
    serial.Fields,
):
    pass


KINDS: tuple[DeviceKind, ...] = tuple(cast(DeviceKind, sys.modules[base.__module__])
                                      for base in reversed(DeviceFields.__bases__))
TABLES: dict[str, type[Any]] = {table.__name__: table for kind in KINDS for table in kind.TABLES}
