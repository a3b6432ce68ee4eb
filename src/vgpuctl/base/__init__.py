"""What every layer shares: the error hierarchy, crash points, the identity of a process.

Imports nothing of vgpuctl: ``host``, the vGPU code, ``vm``, ``service`` and ``cli`` all build on it.
"""
