"""The systemd unit that starts the VMs marked autostart at boot, installed by ``vgpuctl install-units``
(with the vGPUs' autostart unit, :mod:`vgpuctl.mdev.units`) through :mod:`vgpuctl.host.units`."""

from __future__ import annotations

from vgpuctl.backends.vf_definitions import UNIT_NAME as VF_UNIT_NAME
from vgpuctl.host import HostRoot
from vgpuctl.host.units import HEADER, WANTED_BY, UnitFile
from vgpuctl.mdev.units import UNIT_NAME

VM_UNIT_NAME = "vgpuctl-vms.service"
VM_STOP_TIMEOUT_S = 300  # the VMs are powered down one after the other, each given up to 30 s


def render_vm_unit(program: str) -> str:
    return f"""{HEADER}
# Starts the VMs marked autostart ('vgpuctl vm edit NAME --autostart'), one after the other in their
# order, once the SR-IOV VFs and the vGPUs defined to start automatically are there; at shutdown it
# powers them down in the reverse order (ACPI power button, then quit after 30 s), before their vGPUs
# go away.
[Unit]
Description=Start the VMs marked autostart (vgpuctl), in their order
After={VF_UNIT_NAME} {UNIT_NAME} network-online.target
Wants={VF_UNIT_NAME} {UNIT_NAME} network-online.target

[Service]
Type=oneshot
RemainAfterExit=yes
ExecStart={program} vm autostart
ExecStop={program} vm autostart --stop
TimeoutStopSec={VM_STOP_TIMEOUT_S}

[Install]
WantedBy={WANTED_BY}
"""


def vm_unit_file(root: HostRoot, program: str) -> UnitFile:
    """The VM unit, enabled."""
    return UnitFile(f"{root.etc_systemd_system}/{VM_UNIT_NAME}", render_vm_unit(program), WANTED_BY)
