"""Reading and writing a host (real or simulated) under one root directory."""

from vgpuctl.host.root import SIM_MARKER, HostRoot

__all__ = ["SIM_MARKER", "HostRoot"]
