"""``vgpuctl vfs restore``: every VF definition (:mod:`vgpuctl.backends.vf_definitions`) put back on the host, at
boot by ``vgpuctl-vfs.service`` (before the vGPUs' and the VMs' autostart units), idempotently: a PF already as
defined is left alone, so running it again (or after a killed run) only finishes what is missing.

Per PF, in sriov.md 2.6's order: wait for its driver (udev binds i915/xe/nvidia after the module loads), then
Intel: the provisioning (auto provisioning off, the quotas) while the VFs are off, then ``sriov_drivers_autoprobe=0``,
N written, each VF bound to vfio-pci (xe-vfio-pci) by ``driver_override``, autoprobe back on — the host's i915/xe
never grabs a VF (6 pain 7). NVIDIA: ``sriov-manage -e`` (its VFs stay on nvidia; types are set at VM start).
VFs or quotas on the host that vgpuctl did not make are left alone unless ``force``.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from vgpuctl.backends import sriov_intel, sriov_nvidia, vf_definitions
from vgpuctl.base.crash import crashpoint
from vgpuctl.base.errors import NotFound, NotOwned, VgpuError
from vgpuctl.base.state import StateDir
from vgpuctl.host import HostRoot, pci
from vgpuctl.host.units import HEADER, WANTED_BY, UnitFile

WAIT_S = 60.0  # how long the boot unit waits for a PF's driver to bind
POLL_S = 0.2


@dataclass(frozen=True)
class Restored:
    pf: str
    outcome: str  # "restored", "already", "failed", "skipped"
    detail: str

    @property
    def line(self) -> str:
        return f"{self.pf}: {self.outcome} ({self.detail})"


def restore(root: HostRoot, state: StateDir, *, force: bool = False, wait_s: float = 0.0,
            holders: dict[str, str] | None = None, sleep: Callable[[float], None] = time.sleep) -> list[Restored]:
    """Every definition applied, in PF order; one PF's failure does not stop the others. ``holders``: VF address ->
    the VM vgpuctl runs on it (a PF whose VFs must be turned off to change its quotas is refused while one runs)."""
    definitions, damaged = vf_definitions.load_all(state)
    results = [Restored(str(e.data.get("path", "?")), "failed", str(e)) for e in damaged]
    for definition in definitions:
        try:
            results.append(_restore_one(root, state, definition, force, wait_s, sleep, holders or {}))
        except VgpuError as e:
            results.append(Restored(definition.pf, "failed", str(e)))
        crashpoint("vfs-restore:pf-done")
    return results


def _wait_for_driver(root: HostRoot, definition: vf_definitions.VfDefinition, wait_s: float,
                     sleep: Callable[[float], None]) -> None:
    deadline = time.monotonic() + wait_s
    while True:
        present = root.exists(root.pci_device(definition.pf))
        driver = pci.read_function(root, definition.pf).driver if present else None
        if driver == definition.driver:
            return
        if time.monotonic() >= deadline:
            where = f"bound to {driver}" if driver else ("without a driver" if present else "not on this host")
            raise NotFound("{parent} is {where}, not {driver} as when its VFs were defined{waited}: load {driver} "
                           "(modules-load.d) or remove the definition with vgpuctl vfs disable {parent}", what="PF",
                           parent=definition.pf, where=where, driver=definition.driver,
                           waited=f" (waited {wait_s:g} s)" if wait_s else "")
        sleep(POLL_S)


def _restore_one(root: HostRoot, state: StateDir, definition: vf_definitions.VfDefinition, force: bool,
                 wait_s: float, sleep: Callable[[float], None], holders: dict[str, str]) -> Restored:
    _wait_for_driver(root, definition, wait_s, sleep)
    sriov_intel.settle(root, state)
    owned = sriov_intel.owned_configuration(state, definition.pf) is not None
    if definition.driver == "nvidia":
        pf = sriov_nvidia.require_pf(root, definition.pf)
        if pf.num_vfs and owned:
            return Restored(definition.pf, "already", f"{pf.num_vfs} VFs on nvidia")
        if pf.num_vfs and not force:
            raise NotOwned("its VFs are on, but not enabled by vgpuctl in this boot (another unit did it): left "
                           "alone; vgpuctl vfs restore --force takes them over", what="PF", parent=definition.pf)
        done = sriov_nvidia.enable(root, state, definition.pf, force=force)
        return Restored(definition.pf, "restored", f"{done.num_vfs} VFs on nvidia, by sriov-manage")
    return _restore_intel(root, state, definition, owned, force, holders)


def _restore_intel(root: HostRoot, state: StateDir, definition: vf_definitions.VfDefinition, owned: bool,
                   force: bool, holders: dict[str, str]) -> Restored:
    from vgpuctl.backends import sriov_intel_provision as provision

    pf = sriov_intel.intel_pf(root, definition.pf)
    count = pf.pf.num_vfs
    if count and not owned and not force:
        raise NotOwned("its VFs are on ({count}), but not enabled by vgpuctl in this boot (a boot script or "
                       "another tool did it): left alone; vgpuctl vfs restore --force replaces them", what="PF",
                       parent=definition.pf, count=count)
    done: list[str] = []
    if provision.differs(root, pf, definition):
        if count:  # quotas change only while the VFs are off (vgpuctl's, or forced); the definition stays
            sriov_intel.disable(root, state, definition.pf, force=force, holders=holders, persist=False)
            count = 0
        if provision.apply_defined(root, sriov_intel.intel_pf(root, definition.pf), definition, force=force):
            done.append("provisioned")
            crashpoint("vfs-restore:provisioned")
    if definition.count and (count != definition.count or not _bound(root, definition)):
        enabled = sriov_intel.enable(root, state, definition.pf, definition.count, force=force, holders=holders)
        done.append(f"{len(enabled.pf.vfs)} VFs on {enabled.vfio_driver}")
    if not done:
        return Restored(definition.pf, "already", f"{definition.count} VFs on {definition.vfio_driver}"
                        if definition.count else "provisioned, no VFs")
    return Restored(definition.pf, "restored", ", ".join(done))


def _bound(root: HostRoot, definition: vf_definitions.VfDefinition) -> bool:
    vfs = pci.read_pf(root, definition.pf).vfs
    return bool(vfs) and all(vf.driver == definition.vfio_driver for vf in vfs)


# ---------------------------------------------------------------------- the boot unit

def render_unit(program: str, before: tuple[str, ...]) -> str:
    return f"""{HEADER}
# Puts back the SR-IOV VFs vgpuctl made ('vgpuctl vfs enable' / 'vfs provision'; definitions in the state
# directory's vfs/) at boot: VFs are runtime state and vanish at every reboot. Intel VFs are provisioned,
# enabled with autoprobe off and bound to vfio-pci by driver_override, so the host's i915/xe never takes
# them; NVIDIA's through sriov-manage. Before the vGPUs' and the VMs' autostart, which need the VFs;
# after debugfs is mounted (xe's GGTT, contexts and doorbells quotas live only there).
[Unit]
Description=Restore SR-IOV VFs defined with vgpuctl
After=systemd-modules-load.service sys-kernel-debug.mount
Before={" ".join(before)} libvirtd.service virtqemud.service

[Service]
Type=oneshot
RemainAfterExit=yes
ExecStart={program} vfs restore --wait {WAIT_S:g}
TimeoutStartSec={int(WAIT_S * 3)}

[Install]
WantedBy={WANTED_BY}
"""


def unit_file(root: HostRoot, program: str, before: tuple[str, ...]) -> UnitFile:
    """The VF unit, enabled; ``before``: the units that need the VFs (the vGPUs' and the VMs' autostart)."""
    return UnitFile(f"{root.etc_systemd_system}/{vf_definitions.UNIT_NAME}", render_unit(program, before), WANTED_BY)
