"""Replacing files on a host safely: all or nothing, and durable once the call returns."""

from __future__ import annotations

import os
import time
from pathlib import Path

from vgpuctl.base import process
from vgpuctl.base.crash import crashpoint


def atomic_write(path: Path, data: bytes, mode: int = 0o644, *, durable: bool = True) -> None:
    """Temp file in the same directory, fsync, rename over, fsync the directory: all or nothing.

    ``durable=False`` leaves out the two fsyncs, for state about live processes (a VM's run record): the
    rename alone is atomic against a killed writer, and after a power loss no process it describes runs."""
    path.parent.mkdir(parents=True, exist_ok=True)
    clean_temp_files(path)
    # A unique name in the same directory (rename is atomic only within one filesystem); made
    # without the tempfile module, which costs milliseconds on every command's start.
    tmp = path.parent / f".{path.name}.{os.getpid()}.{time.monotonic_ns()}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.write(fd, data)
        os.fchmod(fd, mode)
        if durable:
            os.fsync(fd)
        os.close(fd)
        fd = -1
        crashpoint("atomic-write:before-rename")
        os.replace(tmp, path)
    except BaseException:
        if fd >= 0:
            os.close(fd)
        tmp.unlink(missing_ok=True)
        raise
    if durable:
        fsync_dir(path.parent)


def fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some filesystems refuse fsync on directories
    finally:
        os.close(fd)


def clean_temp_files(path: Path) -> None:
    """Remove the temp files that writers of ``path`` killed mid-way left (``.NAME.PID.*.tmp``, PID gone).

    Never visible as ``path`` itself (the rename is what publishes a write), they are only litter: each
    write of ``path`` sweeps them, so they never pile up.
    """
    try:
        candidates = list(path.parent.glob(f".{path.name}.*.tmp"))
    except OSError:
        return
    for stale in candidates:
        pid = stale.name[len(path.name) + 2:].split(".")[0]
        if not pid.isdigit() or (int(pid) != os.getpid() and process.start_time(int(pid)) is None):
            stale.unlink(missing_ok=True)
