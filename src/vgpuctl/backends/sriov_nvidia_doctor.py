"""The doctor's checks for NVIDIA vGPUs on the vendor-specific VFIO framework (sriov.md 3): filled in next."""

from __future__ import annotations

from vgpuctl.host.doctor import CheckSpec

CHECKS: tuple[CheckSpec, ...] = ()
