"""vgpuctl's errors, re-exported from :mod:`vgpuctl.base.errors`, where they now live (so that ``host``
can raise them too)."""

from vgpuctl.base.errors import (
    CapacityError,
    Conflict,
    InvalidInput,
    KernelError,
    NotFound,
    NotOwned,
    StateDamaged,
    VgpuError,
)

__all__ = ["CapacityError", "Conflict", "InvalidInput", "KernelError", "NotFound", "NotOwned", "StateDamaged",
           "VgpuError"]
