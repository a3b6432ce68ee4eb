"""Re-exports GVT-g's capacity model, which lives in its backend (:mod:`vgpuctl.backends.gvt`)."""

from vgpuctl.backends.gvt import GvtCapacity, Pool, gvt_capacity

__all__ = ["GvtCapacity", "Pool", "gvt_capacity"]
