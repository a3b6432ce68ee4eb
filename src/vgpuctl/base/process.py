"""Which process is which: a pid with its start time, so a pid the kernel reused is never taken for ours.

These are this machine's processes (vgpuctl's, QEMU's), never a simulated host's: read from the local
/proc, not through the host root.
"""

from __future__ import annotations

import os


def start_time(pid: int) -> int | None:
    """A live process's start time in clock ticks after boot (/proc/PID/stat field 22); None if there is no
    such process or it has ended (a zombie)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return None
    # The command name (field 2) is in parentheses and may itself hold spaces and ')': split after the last.
    fields = stat[stat.rfind(b")") + 2:].split()
    if len(fields) < 20 or fields[0] in (b"Z", b"X"):  # field 3, the state
        return None
    return int(fields[19])


def cmdline(pid: int) -> list[bytes]:
    """A process's argv (/proc/PID/cmdline split at NULs); [] if it is gone or a kernel thread."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().split(b"\0")
    except OSError:
        return []


def pids() -> list[int]:
    """Every process of this machine now (its /proc entries)."""
    return [int(entry) for entry in os.listdir("/proc") if entry.isdigit()]


def boot_id() -> str:
    """This boot's random id: it changes at every boot, never between."""
    with open("/proc/sys/kernel/random/boot_id") as f:
        return f.read().strip()


def identity(pid: int | None = None) -> dict[str, int]:
    """{"pid", "start"} of this (or another) process, as the journal records it."""
    pid = os.getpid() if pid is None else pid
    return {"pid": pid, "start": start_time(pid) or 0}


def is_alive(record: dict[str, int]) -> bool:
    """Whether the process of an :func:`identity` record still runs (the same one, not a reused pid)."""
    started = start_time(int(record.get("pid", 0)))
    return started is not None and started == record.get("start")


def started_at(pid: int) -> float | None:
    """When a live process started, in seconds since the epoch (its start time after /proc/stat's btime)."""
    ticks = start_time(pid)
    if ticks is None:
        return None
    with open("/proc/stat", "rb") as f:
        boot = next(int(line.split()[1]) for line in f if line.startswith(b"btime "))
    return boot + ticks / os.sysconf("SC_CLK_TCK")
