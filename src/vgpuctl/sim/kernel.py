"""Kernel eras: what changes in the mdev/GVT-g ABI with the kernel version (spec 1.6, 2.2, 4.2)."""

from __future__ import annotations

import re
from dataclasses import dataclass

DEFAULT_KERNEL = "6.8.0"


@dataclass(frozen=True)
class Kernel:
    """A kernel release string and the ABI behaviours that follow from its version."""

    release: str

    @property
    def version(self) -> tuple[int, int]:
        match = re.match(r"(\d+)\.(\d+)", self.release)
        if not match:
            raise ValueError(f"not a kernel release: {self.release!r} (expected e.g. 6.8.0 or 4.10.10)")
        return int(match[1]), int(match[2])

    def at_least(self, major: int, minor: int) -> bool:
        return self.version >= (major, minor)

    @property
    def global_uuid_check(self) -> bool:
        """EEXIST for a UUID used on any parent (4.10 checked per parent; switch ~4.17 [U])."""
        return self.at_least(4, 17)

    @property
    def gvt_has_name(self) -> bool:
        """GVT-g had no ``name`` attribute until a vendor name_show (seen by 5.19 [V]) and the 6.1 core."""
        return self.at_least(5, 19)

    @property
    def core_attributes(self) -> bool:
        """6.1+: the mdev core implements name/available_instances/description (EUSERS for mdpy)."""
        return self.at_least(6, 1)

    @property
    def has_vfio_mdev_module(self) -> bool:
        """vfio_mdev.ko existed as its own module up to 5.13."""
        return not self.at_least(5, 14)

    @property
    def has_mdpy_mbochs(self) -> bool:
        """The mdpy and mbochs samples came with 4.18 [U]; mtty exists since 4.10."""
        return self.at_least(4, 18)

    @property
    def gvt_in_kvmgt(self) -> bool:
        """5.19+: all GVT code lives in kvmgt.ko, which loads even when GVT cannot start."""
        return self.at_least(5, 19)

    def mdev_driver(self, vendor_driver: str) -> str:
        """The driver an mdev is bound to: the vfio_mdev shim up to 5.18, the vendor's own after."""
        return vendor_driver if self.at_least(5, 19) else "vfio_mdev"

    @property
    def required_modules(self) -> list[str]:
        """Modules a working GVT-g host has loaded in this era (spec 4.2)."""
        modules = ["i915", "kvmgt", "mdev", "vfio", "vfio_iommu_type1", "kvm", "kvm_intel"]
        if self.has_vfio_mdev_module:
            modules.insert(3, "vfio_mdev")
        return modules
