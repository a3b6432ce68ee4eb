"""SR-IOV PFs whichever vendor's they are: turning their VFs on and off by the PF's own backend (NVIDIA's through
``sriov-manage``, every VF at once; Intel's a count, each VF given to its VFIO driver). The one place that tells the
two apart, for ``vgpuctl vfs`` and the API alike."""

from __future__ import annotations

from collections.abc import Collection
from typing import NamedTuple

from vgpuctl.base.errors import InvalidInput
from vgpuctl.base.state import StateDir
from vgpuctl.host import HostRoot, pci


class Enabled(NamedTuple):
    address: str
    vfs: list[str]  # the VFs' addresses
    driver: str  # what they are bound to
    by: str  # how: "sriov-manage" (NVIDIA) or "sysfs" (Intel: sriov_numvfs, then driver_override)


class VfChoice(NamedTuple):
    """The VF a VM gets: its address, its PF, the type it has or will have, "active" (as it is) or "new" (given the
    type at start: NVIDIA), and why this one."""

    vf: str
    pf: str
    type_id: str
    state: str
    reason: str


def choose_vf(root: HostRoot, address: str, taken: Collection[str] = (), type_id: str | None = None) -> VfChoice:
    """The VF ``address`` names: that VF, or a free VF of that PF (NVIDIA: one that can take ``type_id``)."""
    from vgpuctl.backends import NVIDIA_VENDOR_ID

    function = pci.read_function(root, address)
    if function.vendor == NVIDIA_VENDOR_ID:
        from vgpuctl.backends import sriov_nvidia

        return sriov_nvidia.choose_vf(root, function, taken, type_id)
    from vgpuctl.backends import sriov_intel

    return sriov_intel.choose_vf(root, function, taken, type_id)


def enable(root: HostRoot, state: StateDir, address: str, count: int | None, *, force: bool = False,
           holders: dict[str, str] | None = None) -> Enabled:
    """``count`` VFs on (Intel), or every VF (NVIDIA: give no count, or the PF's total)."""
    from vgpuctl.backends import sriov_nvidia

    found = sriov_nvidia.nvidia_pf(root, address)
    if found is not None:
        if count is not None and count != found.total_vfs:
            raise InvalidInput("sriov-manage enables every VF of an NVIDIA GPU ({total} here): give no count",
                               what="count", total=found.total_vfs, count=count)
        nv = sriov_nvidia.enable(root, state, address, force=force)
        return Enabled(nv.address, [vf.address for vf in nv.vfs], "nvidia", "sriov-manage")
    from vgpuctl.backends import sriov_intel

    if count is None:
        raise InvalidInput("give a count: how many VFs (each gets a fair share, or the quotas of vfs provision)",
                           what="count")
    intel = sriov_intel.enable(root, state, address, count, force=force, holders=holders)
    return Enabled(intel.address, [vf.address for vf in intel.pf.vfs], intel.vfio_driver, "sysfs")


def disable(root: HostRoot, state: StateDir, address: str, *, force: bool = False,
            holders: dict[str, str] | None = None, timeout_s: float = pci.NUMVFS_TIMEOUT_S) -> tuple[str, str]:
    """Every VF of the PF off (refused while a VM holds one, or when vgpuctl did not enable them, unless force);
    the PF's address and how: "sriov-manage" or "sysfs"."""
    from vgpuctl.backends import sriov_nvidia

    if sriov_nvidia.nvidia_pf(root, address) is not None:
        return sriov_nvidia.disable(root, state, address, force=force, holders=holders).address, "sriov-manage"
    from vgpuctl.backends import sriov_intel

    return sriov_intel.disable(root, state, address, force=force, holders=holders, timeout_s=timeout_s).address, "sysfs"
