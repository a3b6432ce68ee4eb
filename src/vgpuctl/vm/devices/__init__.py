"""The VM's devices, one module per kind (as virt-manager's ``virtinst/devices``): each owns its spec fields
(``Fields``, a base of :class:`vgpuctl.vm.spec.VmSpec`), their validation and defaults, its QEMU arguments and
its libvirt XML (see :mod:`.base` for the protocol). A new kind is a new module and its ``Fields`` below.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any, cast

from vgpuctl.vm.devices import cdrom, disk, display, guest_agent, network, serial, tablet, usb, vgpu, video
from vgpuctl.vm.devices.base import DeviceKind


# Every kind's fields. Their order is the order the checks run (and the spec's TOML lists them).
@dataclass
class DeviceFields(serial.Fields, disk.Fields, cdrom.Fields, usb.Fields, tablet.Fields, network.Fields,
                   display.Fields, video.Fields, vgpu.Fields, guest_agent.Fields):
    pass


KINDS: tuple[DeviceKind, ...] = tuple(cast(DeviceKind, sys.modules[base.__module__])
                                      for base in DeviceFields.__bases__)
TABLES: dict[str, type[Any]] = {table.__name__: table for kind in KINDS for table in kind.TABLES}
