"""Simulated mdev vendor drivers: Intel GVT-g, the kernel's samples (mtty, mdpy, mbochs), NVIDIA.

Each parent knows its types, computes ``available_instances`` and commits or releases resources
on create/remove, raising the errno its real driver returns. The mdev core around them (UUIDs,
links, IOMMU groups) is in :mod:`vgpuctl.sim.host`.
"""

from __future__ import annotations

import errno
from dataclasses import dataclass, field
from typing import ClassVar

from vgpuctl.backends.gvt_platforms import (
    HOST_FENCES,
    HOST_HIGH_GM_MIB,
    HOST_LOW_GM_MIB,
    MAX_VGPUS_PER_GPU,
    GvtTypeSpec,
    gvt_description,
    gvt_types,
)
from vgpuctl.sim.kernel import Kernel
from vgpuctl.sim.vfs import Attr, Node, const, fail


@dataclass(frozen=True)
class SimType:
    """A registered mdev type as sysfs shows it."""

    type_id: str  # directory name, "<driver>-<sysfs_name>"
    name: str | None  # None: no ``name`` file (GVT-g before 5.19)
    description: str | None  # None: no ``description`` file (mtty)
    device_api: str = "vfio-pci"


@dataclass
class Parent:
    """An mdev parent device: where it sits in sysfs and what its driver does."""

    name: str  # sysfs name: "0000:00:02.0", "mtty"
    device_path: str  # canonical sysfs directory
    kernel: Kernel
    vendor_driver: str  # the mdev driver's name on 5.19+
    device_types: dict[str, str] = field(default_factory=dict)  # uuid -> type_id

    def types(self) -> list[SimType]:
        raise NotImplementedError

    def available(self, type_id: str) -> int:
        raise NotImplementedError

    def allocate(self, uuid: str, type_id: str) -> dict[str, Node]:
        """Commit resources for a new device; return its vendor-specific sysfs nodes."""
        raise NotImplementedError

    def release(self, uuid: str) -> None:
        self.device_types.pop(uuid, None)

    def count(self, type_id: str) -> int:
        return sum(1 for t in self.device_types.values() if t == type_id)


# ---------------------------------------------------------------- Intel GVT-g


@dataclass
class GvtParent(Parent):
    """GVT-g on an Intel iGPU: three shared pools (low GM, high GM, fences) and ids 1..7."""

    graphics_ver: int = 9
    aperture_mib: int = 256
    ggtt_mib: int = 4096
    fences: int = 32
    vgpu_ids: dict[str, int] = field(default_factory=dict)
    # 4.11-6.0 cached available_instances, recomputed after create/destroy; 6.1+ computes per read.
    _cached: dict[str, int] | None = None

    def __post_init__(self) -> None:
        self.specs: dict[str, GvtTypeSpec] = {}
        low_room = self.aperture_mib - HOST_LOW_GM_MIB
        for spec in gvt_types(self.kernel.version):
            # Registration stops at the first type whose low GM does not fit (only that term).
            if self.kernel.at_least(4, 11) and low_room // spec.low_gm_mib < 1:
                break
            self.specs[f"i915-{spec.name(self.graphics_ver)}"] = spec
        if not self.kernel.core_attributes:
            self._cached = {t: self._compute(t, with_fences=False) for t in self.specs}

    def types(self) -> list[SimType]:
        name_file = self.kernel.gvt_has_name
        return [
            SimType(type_id, type_id.removeprefix("i915-") if name_file else None, gvt_description(spec))
            for type_id, spec in self.specs.items()
        ]

    # The three pools after what existing vGPUs hold.
    def low_free(self) -> int:
        used = sum(self.specs[t].low_gm_mib for t in self.device_types.values())
        return self.aperture_mib - HOST_LOW_GM_MIB - used

    def high_free(self) -> int:
        used = sum(self.specs[t].high_gm_mib for t in self.device_types.values())
        return self.ggtt_mib - self.aperture_mib - HOST_HIGH_GM_MIB - used

    def fences_free(self) -> int:
        used = sum(self.specs[t].fences for t in self.device_types.values())
        return self.fences - HOST_FENCES - used

    def _compute(self, type_id: str, with_fences: bool = True) -> int:
        spec = self.specs[type_id]
        counts = [
            max(self.low_free(), 0) // spec.low_gm_mib,
            max(self.high_free(), 0) // spec.high_gm_mib,
        ]
        if with_fences:
            counts.append(max(self.fences_free(), 0) // spec.fences)
        if not self.kernel.at_least(4, 11):
            counts.append(int(spec.suffix))  # 4.10: capped by the type's max_instance
        return min(counts)

    def available(self, type_id: str) -> int:
        if self._cached is not None:
            return self._cached[type_id]
        return self._compute(type_id)

    def allocate(self, uuid: str, type_id: str) -> dict[str, Node]:
        spec = self.specs[type_id]
        free_ids = [i for i in range(1, MAX_VGPUS_PER_GPU + 1) if i not in self.vgpu_ids.values()]
        if not free_ids:
            raise fail(errno.ENOSPC, "GVT: no free vGPU id")
        for pool, free, need in (
            ("low GM space", self.low_free(), spec.low_gm_mib),
            ("high GM space", self.high_free(), spec.high_gm_mib),
            ("fence", self.fences_free(), spec.fences),
        ):
            if free < need:
                raise fail(errno.ENOSPC, f"GVT: not enough {pool}")
        vgpu_id = free_ids[0]
        self.device_types[uuid] = type_id
        self.vgpu_ids[uuid] = vgpu_id
        self._refresh()
        return {"intel_vgpu/vgpu_id": Attr(show=const(f"{vgpu_id}\n"))}

    def release(self, uuid: str) -> None:
        super().release(uuid)
        self.vgpu_ids.pop(uuid, None)
        self._refresh()

    def _refresh(self) -> None:
        if self._cached is not None:
            self._cached = {t: self._compute(t) for t in self.specs}


# ---------------------------------------------------------------- kernel samples


@dataclass
class MttyParent(Parent):
    """samples/vfio-mdev/mtty.c: 24 serial ports shared by 1- and 2-port devices."""

    total_ports: int = 24
    PORTS: ClassVar[dict[str, int]] = {"mtty-1": 1, "mtty-2": 2}

    def types(self) -> list[SimType]:
        return [SimType("mtty-1", "Single port serial", None), SimType("mtty-2", "Dual port serial", None)]

    def free_ports(self) -> int:
        return self.total_ports - sum(self.PORTS[t] for t in self.device_types.values())

    def available(self, type_id: str) -> int:
        return self.free_ports() // self.PORTS[type_id]

    def allocate(self, uuid: str, type_id: str) -> dict[str, Node]:
        if self.free_ports() < self.PORTS[type_id]:
            raise fail(errno.ENOSPC, "mtty: not enough ports")
        self.device_types[uuid] = type_id
        return {"vendor/sample_mdev_dev": Attr(show=const(f"This is MDEV {uuid}\n"))}


@dataclass
class MdpyParent(Parent):
    """samples/vfio-mdev/mdpy.c: ``count`` displays shared by all types."""

    max_devices: int = 4
    MODES: ClassVar[dict[str, str]] = {"mdpy-vga": "640x480", "mdpy-xga": "1024x768", "mdpy-hd": "1920x1080"}

    def types(self) -> list[SimType]:
        return [
            SimType(type_id, type_id, f"virtual display, {mode} framebuffer")
            for type_id, mode in self.MODES.items()
        ]

    def available(self, type_id: str) -> int:
        return self.max_devices - len(self.device_types)

    def allocate(self, uuid: str, type_id: str) -> dict[str, Node]:
        if len(self.device_types) >= self.max_devices:
            # 6.1+: the core's per-parent counter (no get_available) says EUSERS; before, probe ENOMEM.
            raise fail(errno.EUSERS if self.kernel.core_attributes else errno.ENOMEM, "mdpy: count reached")
        self.device_types[uuid] = type_id
        return {"vendor/resolution": Attr(show=const(f"{self.MODES[type_id]}\n"))}


@dataclass
class MbochsParent(Parent):
    """samples/vfio-mdev/mbochs.c: 256 MB of video memory shared by all devices."""

    total_mb: int = 256
    MBYTES: ClassVar[dict[str, int]] = {"mbochs-small": 4, "mbochs-medium": 16, "mbochs-large": 64}

    def types(self) -> list[SimType]:
        return [
            SimType(type_id, type_id, f"virtual display, {mb} MB video memory")
            for type_id, mb in self.MBYTES.items()
        ]

    def free_mb(self) -> int:
        return self.total_mb - sum(self.MBYTES[t] for t in self.device_types.values())

    def available(self, type_id: str) -> int:
        return self.free_mb() // self.MBYTES[type_id]

    def allocate(self, uuid: str, type_id: str) -> dict[str, Node]:
        if self.free_mb() < self.MBYTES[type_id]:
            raise fail(errno.ENOSPC, "mbochs: not enough memory")
        self.device_types[uuid] = type_id
        return {}


# ---------------------------------------------------------------- NVIDIA (time-sliced, homogeneous)


@dataclass(frozen=True)
class NvidiaProfile:
    type_number: int
    name: str
    heads: int
    frl: int
    framebuffer_mb: int
    max_resolution: str
    max_instance: int

    def description(self) -> str:
        return (
            f"num_heads={self.heads}, frl_config={self.frl}, framebuffer={self.framebuffer_mb}M, "
            f"max_resolution={self.max_resolution}, max_instance={self.max_instance}"
        )


def tesla_t4_profiles() -> list[NvidiaProfile]:
    """GRID T4 (16 GB) profiles; type numbers as seen on GRID 11-era drivers (231=2Q, 234=16Q)."""
    profiles: list[NvidiaProfile] = []

    def add(number: int, suffix: str, gb: int, heads: int, frl: int, resolution: str) -> None:
        profiles.append(NvidiaProfile(number, f"GRID T4-{suffix}", heads, frl, gb * 1024, resolution, 16 // gb))

    add(222, "1B", 1, 4, 45, "5120x2880")
    add(223, "2B", 2, 4, 45, "5120x2880")
    add(224, "2B4", 2, 4, 45, "5120x2880")
    for number, gb in zip(range(225, 230), (1, 2, 4, 8, 16), strict=True):
        add(number, f"{gb}A", gb, 1, 60, "1280x1024")
    add(230, "1Q", 1, 4, 60, "5120x2880")
    for number, gb in zip(range(231, 235), (2, 4, 8, 16), strict=True):
        add(number, f"{gb}Q", gb, 4, 60, "7680x4320")
    for number, gb in zip((319, 320, 321), (4, 8, 16), strict=True):
        add(number, f"{gb}C", gb, 1, 60, "4096x2160")
    return profiles


@dataclass
class NvidiaParent(Parent):
    """A time-sliced NVIDIA vGPU: once one type is in use, the other types show 0."""

    profiles: list[NvidiaProfile] = field(default_factory=tesla_t4_profiles)

    def __post_init__(self) -> None:
        self.by_type = {f"nvidia-{p.type_number}": p for p in self.profiles}

    def types(self) -> list[SimType]:
        return [SimType(t, p.name, p.description()) for t, p in self.by_type.items()]

    def available(self, type_id: str) -> int:
        in_use = set(self.device_types.values())
        if in_use and type_id not in in_use:
            return 0
        return self.by_type[type_id].max_instance - self.count(type_id)

    def allocate(self, uuid: str, type_id: str) -> dict[str, Node]:
        if self.available(type_id) < 1:
            raise fail(errno.ENOSPC, "nvidia: no capacity for this type")  # errno [U]
        self.device_types[uuid] = type_id
        return {}
