"""What an Intel SR-IOV VF was given (read only): its provisioning quotas, and the "type" its VFs offer for the
chooser and the listings.

Where the quotas are is provisioning's knowledge (:mod:`vgpuctl.backends.sriov_intel_provision`: i915-sriov-dkms'
``prelim_iov``, xe's debugfs and ``sriov_admin``); what the driver does not show is None.

A VF's memory, as the chooser compares it with other vGPUs': its local memory (LMEM/VRAM) quota on a discrete
GPU, else its GGTT quota — on an iGPU the GGTT slice is what GVT-g's types count as graphics memory (their
low+high GM are GGTT ranges), and there is no LMEM.
"""

from __future__ import annotations

from collections.abc import Collection
from typing import TYPE_CHECKING, NamedTuple

from vgpuctl.host import HostRoot

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


def vf_quotas(root: HostRoot, pf: IntelPf) -> list[VfQuota]:
    """The quotas of each enabled VF of the PF (empty when none is enabled), read where provisioning writes them
    (:func:`vgpuctl.backends.sriov_intel_provision.interface`); None for what the driver does not show."""
    from vgpuctl.backends.sriov_intel_provision import quotas_of

    count = len(pf.pf.vfs)
    quotas = (quotas_of(root, pf) or {}) if count else {}
    return [VfQuota(n, q.get("ggtt"), q.get("vram"), q.get("contexts"), q.get("doorbells"))
            for n in range(1, count + 1) for q in [quotas.get(n, {})]]


def offers(pf: IntelPf) -> bool:
    """Whether the PF has a type row: it can make VFs, or has some."""
    return pf.problem is None or bool(pf.pf.vfs)


def free_vfs(root: HostRoot, pf: IntelPf, held: Collection[str], openers: Collection[str] | None = None) -> list[str]:
    """The PF's VFs on its VFIO driver that no VM holds or has open (``held``: those VMs run on; ``openers``: the
    VFs someone has open, when the caller has read them)."""
    from vgpuctl.backends.sriov_intel import VFIO_DRIVERS
    from vgpuctl.host.pci import vf_openers

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
