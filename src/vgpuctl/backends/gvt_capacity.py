"""GVT-g's capacity model: the three shared pools and the vGPU ids, and why a create does not fit. The kernel
only says ENOSPC. These numbers come from the same accounting GVT-g does (i915's gvt/aperture_gm.c and
gvt/vgpu.c), with the aperture read from the iGPU's BAR2 and each active vGPU's share read from its type's
description. Loaded only when capacity is asked for (not by a VM start on an existing vGPU).
"""

from __future__ import annotations

from dataclasses import dataclass

from vgpuctl.backends.gvt import BACKEND
from vgpuctl.backends.gvt_platforms import (
    DEFAULT_FENCES,
    DEFAULT_GGTT_MIB,
    HOST_FENCES,
    HOST_HIGH_GM_MIB,
    HOST_LOW_GM_MIB,
    MAX_VGPUS_PER_GPU,
    gvt_types,
)
from vgpuctl.host import HostRoot
from vgpuctl.mdev.sysfs import MdevType, active_devices, aperture_mib, read_types


@dataclass(frozen=True)
class Pool:
    name: str
    unit: str
    total: int  # what vGPUs may use (host reservation already taken off)
    used: int

    @property
    def free(self) -> int:
        return self.total - self.used


@dataclass(frozen=True)
class GvtCapacity:
    parent: str
    aperture_mib: int
    pools: list[Pool]

    def pool(self, name: str) -> Pool:
        return next(p for p in self.pools if p.name == name)

    def shortfalls(self, gvt_type: MdevType) -> dict[str, str]:
        """The pools that cannot hold one more vGPU of this type: name -> why, in words."""
        f = gvt_type.fields
        need = {"low GM (aperture)": f.get("low_gm_mib", 0), "high GM": f.get("high_gm_mib", 0),
                "fences": f.get("fences", 0), "vGPU ids": 1}
        short = {}
        for pool in self.pools:
            wanted = int(need.get(pool.name, 0))
            if pool.free < wanted:
                unit = f" {pool.unit}" if pool.unit else ""
                short[pool.name] = f"{pool.name}: {pool.free}{unit} free, {gvt_type.type_id} needs {wanted}"
        return short

    def advice(self) -> str:
        aperture = self.pool("low GM (aperture)")
        return "raise the BIOS aperture size" if aperture.free < aperture.total // 2 else ""


def pool_totals(aperture_mib: int) -> tuple[int, int, int]:
    """(low GM MiB, high GM MiB, fences) that vGPUs may share: the GGTT split at the aperture, minus what i915
    keeps for the host (gvt/aperture_gm.c)."""
    return (aperture_mib - HOST_LOW_GM_MIB, DEFAULT_GGTT_MIB - aperture_mib - HOST_HIGH_GM_MIB,
            DEFAULT_FENCES - HOST_FENCES)


def gvt_allows(aperture_mib: int, kernel: tuple[int, int] | None, graphics_ver: int) -> list[tuple[str, int]]:
    """The GVT-g types a fresh iGPU with this aperture registers, and how many of each fit (spec 2.1, 2.4)."""
    version = kernel or (6, 0)
    low, high, fences = pool_totals(aperture_mib)
    allowed = []
    for spec in gvt_types(version):
        if version >= (4, 11) and low // spec.low_gm_mib < 1:
            break  # registration stops at the first type whose low GM does not fit
        count = min(max(low, 0) // spec.low_gm_mib, max(high, 0) // spec.high_gm_mib, fences // spec.fences)
        if version < (4, 11):
            count = min(count, int(spec.suffix))  # 4.10: capped by the type's max_instance
        allowed.append((f"i915-{spec.name(graphics_ver)}", count))
    return allowed


def gvt_capacity(root: HostRoot, parent: str, types: list[MdevType] | None = None) -> GvtCapacity | None:
    """The GVT-g pools of parent, or None if it is not a GVT-g iGPU."""
    types = types if types is not None else read_types(root, parent)
    if not any(BACKEND.claims_type(t.type_id) for t in types):
        return None
    aperture = aperture_mib(root, parent) or 0
    by_id = {t.type_id: t.fields for t in types}
    low = high = fences = count = 0
    for device in active_devices(root):
        if device.parent != parent:
            continue
        f = by_id.get(device.type_id, {})
        low += int(f.get("low_gm_mib", 0))
        high += int(f.get("high_gm_mib", 0))
        fences += int(f.get("fences", 0))
        count += 1
    low_total, high_total, fences_total = pool_totals(aperture)
    pools = [
        Pool("low GM (aperture)", "MiB", low_total, low),
        Pool("high GM", "MiB", high_total, high),
        Pool("fences", "", fences_total, fences),
        Pool("vGPU ids", "", MAX_VGPUS_PER_GPU, count),
    ]
    return GvtCapacity(parent, aperture, pools)
