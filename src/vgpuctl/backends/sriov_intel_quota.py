"""What an Intel SR-IOV VF was given (read only): its provisioning quotas, and the "type" its VFs offer for the
chooser and the listings.

Where the quotas are (sriov.md 2.4): i915-sriov-dkms, ``<PF>/drm/card<N>/prelim_iov/vf<N>/gt0/{ggtt_quota,
contexts_quota, doorbells_quota}`` (i915_sriov_sysfs.c, intel_iov_sysfs.c; bytes and counts); xe, debugfs
``dri/<BDF>/sriov/vf<N>/tile0/{ggtt_quota, vram_quota}`` and ``…/tile0/gt0/{contexts_quota, doorbells_quota}``
(xe_gt_sriov_pf_debugfs.c, xe_tile_sriov_pf_debugfs.c; root only), and from 7.0 also
``sriov_admin/vf<N>/profile/vram_quota`` (sysfs-driver-intel-xe-sriov). What cannot be read is None.

A VF's memory, as the chooser compares it with other vGPUs': its local memory (LMEM/VRAM) quota on a discrete
GPU, else its GGTT quota — on an iGPU the GGTT slice is what GVT-g's types count as graphics memory (their
low+high GM are GGTT ranges), and there is no LMEM.
"""

from __future__ import annotations

from collections.abc import Collection
from typing import TYPE_CHECKING, NamedTuple

from vgpuctl.host import HostRoot, facts

if TYPE_CHECKING:
    from vgpuctl.backends.sriov_intel import IntelPf
    from vgpuctl.mdev.sysfs import MdevType

MIB = 1 << 20


class VfQuota(NamedTuple):
    vf: int  # 1-based, as prelim_iov/vfN and sriov_admin/vfN count
    ggtt_bytes: int | None
    lmem_bytes: int | None
    contexts: int | None
    doorbells: int | None

    @property
    def memory_mib(self) -> int | None:
        """LMEM on a discrete GPU, else GGTT (see the module's doc)."""
        if self.lmem_bytes:
            return self.lmem_bytes // MIB
        return self.ggtt_bytes // MIB if self.ggtt_bytes else None

    @property
    def memory_source(self) -> str | None:
        return "lmem" if self.lmem_bytes else "ggtt" if self.ggtt_bytes else None

    def to_json(self) -> dict[str, int | str | None]:
        return {"vf": self.vf, "ggtt_mib": None if self.ggtt_bytes is None else self.ggtt_bytes // MIB,
                "lmem_mib": None if self.lmem_bytes is None else self.lmem_bytes // MIB,
                "contexts": self.contexts, "doorbells": self.doorbells, "memory_mib": self.memory_mib,
                "memory_from": self.memory_source}


def _number(root: HostRoot, path: str) -> int | None:
    try:
        return facts.as_int(root.read_value(path))
    except (OSError, ValueError):
        return None


def _prelim_iov(root: HostRoot, pf: str) -> str | None:
    drm = f"{root.pci_device(pf)}/drm"
    try:
        cards = sorted(n for n in root.listdir(drm) if n.startswith("card"))
    except OSError:
        return None
    return next((f"{drm}/{c}/prelim_iov" for c in cards if root.exists(f"{drm}/{c}/prelim_iov")), None)


def vf_quotas(root: HostRoot, pf: IntelPf) -> list[VfQuota]:
    """The quotas of each enabled VF of the PF (empty when none is enabled)."""
    count = len(pf.pf.vfs)
    if not count:
        return []
    found = []
    if pf.driver == "i915":
        prelim = _prelim_iov(root, pf.address)
        for index in range(1, count + 1):
            gt = f"{prelim}/vf{index}/gt0" if prelim else None
            found.append(VfQuota(index, _number(root, f"{gt}/ggtt_quota") if gt else None, None,
                                 _number(root, f"{gt}/contexts_quota") if gt else None,
                                 _number(root, f"{gt}/doorbells_quota") if gt else None))
        return found
    admin = f"{root.pci_device(pf.address)}/sriov_admin"
    debug = f"{root.debugfs_dri(pf.address)}/sriov"
    for index in range(1, count + 1):
        tile = f"{debug}/vf{index}/tile0"
        lmem = _number(root, f"{admin}/vf{index}/profile/vram_quota")
        if lmem is None:
            lmem = _number(root, f"{tile}/vram_quota")
        found.append(VfQuota(index, _number(root, f"{tile}/ggtt_quota"), lmem,
                             _number(root, f"{tile}/gt0/contexts_quota"), _number(root, f"{tile}/gt0/doorbells_quota")))
    return found


def offers(pf: IntelPf) -> bool:
    """Whether the PF has a type row: it can make VFs, or has some."""
    return pf.problem is None or bool(pf.pf.vfs)


def free_vfs(root: HostRoot, pf: IntelPf, held: Collection[str], openers: Collection[str] | None = None) -> list[str]:
    """The PF's VFs on its VFIO driver that no VM holds or has open (``held``: those VMs run on; ``openers``: the
    VFs someone has open, when the caller has read them)."""
    from vgpuctl.backends.sriov_intel import VFIO_DRIVERS, vf_openers

    openers = vf_openers(root, pf.pf.vfs) if openers is None else openers
    return [vf.address for vf in pf.pf.vfs
            if vf.driver in VFIO_DRIVERS and vf.address not in held and vf.address not in openers]


def offered_types(root: HostRoot, held: Collection[str]) -> list[MdevType]:
    """One row per PF that can make VFs: its free VFs as available_instances, the smallest memory a free VF has
    (fair shares are equal; custom ones may not be), and ``display=emulated``: a VF has none of its own, the
    VM's picture comes from an emulated adapter whose resolution the guest sets (sriov.md 2.5, 5.1)."""
    from vgpuctl.backends.sriov_intel import TYPE_ID, intel_pfs
    from vgpuctl.mdev.sysfs import MdevType

    rows = []
    for pf in intel_pfs(root):
        if not offers(pf):
            continue
        free = set(free_vfs(root, pf, held))
        quotas = {q.vf: q for q in vf_quotas(root, pf)}
        offered = [quotas[i + 1] for i, vf in enumerate(pf.pf.vfs) if vf.address in free and i + 1 in quotas]
        smallest = min(offered or list(quotas.values()), key=lambda q: q.memory_mib or 0, default=None)
        facts_ = [f"vfs={len(pf.pf.vfs)}"]
        if smallest is not None and smallest.memory_mib is not None:
            facts_.append(f"memory_mib={smallest.memory_mib}")
            facts_.append(f"memory_from={smallest.memory_source}")
            for name, value in (("ggtt_mib", smallest.ggtt_bytes and smallest.ggtt_bytes // MIB),
                                ("lmem_mib", smallest.lmem_bytes and smallest.lmem_bytes // MIB),
                                ("contexts", smallest.contexts), ("doorbells", smallest.doorbells)):
                if value:
                    facts_.append(f"{name}={value}")
        facts_.append("display=emulated")
        if not pf.pf.vfs:  # no colon or comma: the description is "k=v, ..."
            facts_.append("unavailable=no VFs enabled (vgpuctl vfs enable PF N)")
        name = f"Intel SR-IOV VF (1 of {len(pf.pf.vfs)})" if pf.pf.vfs else "Intel SR-IOV VF (none enabled)"
        rows.append(MdevType(pf.address, TYPE_ID, len(free), "vfio-pci", name, ", ".join(facts_)))
    return rows
