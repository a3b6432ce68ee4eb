"""Named crash points: where the crash tests kill vgpuctl between two steps of a VM command."""

from __future__ import annotations

import os
import signal


def crashpoint(name: str) -> None:
    """Fault injection for the crash tests: VGPUCTL_CRASH_AT=name kills this process here with SIGKILL;
    VGPUCTL_CRASH_TRACE=file appends each point reached (one name a line), so a harness learns the steps."""
    trace = os.environ.get("VGPUCTL_CRASH_TRACE")
    if trace:
        with open(trace, "a") as f:
            f.write(name + "\n")
    if os.environ.get("VGPUCTL_CRASH_AT") == name:
        os.kill(os.getpid(), signal.SIGKILL)
