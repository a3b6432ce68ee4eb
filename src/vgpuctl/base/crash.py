"""Crash points: named steps of every command that changes a host, where the crash tests kill it.

``VGPUCTL_CRASH_AT=NAME`` kills the process with SIGKILL the first time it reaches ``NAME``
(``NAME#N``: the N-th time); ``VGPUCTL_CRASH_TRACE=FILE`` appends every point reached, a line each
(its name and time.monotonic(), which is system-wide), so that a harness learns a command's steps and
when they happen. Both are read at each call: free when unset.
"""

from __future__ import annotations

import os
import signal
import time

CRASH_AT_ENV = "VGPUCTL_CRASH_AT"
CRASH_TRACE_ENV = "VGPUCTL_CRASH_TRACE"
_reached: dict[str, int] = {}


def crashpoint(name: str) -> None:
    trace = os.environ.get(CRASH_TRACE_ENV)
    target = os.environ.get(CRASH_AT_ENV)
    if not trace and not target:
        return
    _reached[name] = _reached.get(name, 0) + 1
    if trace:
        with open(trace, "a") as f:
            f.write(f"{name} {time.monotonic():.6f}\n")
    if target and target in (name, f"{name}#{_reached[name]}"):
        os.kill(os.getpid(), signal.SIGKILL)
