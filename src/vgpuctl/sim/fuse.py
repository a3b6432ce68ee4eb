"""Serve a :class:`SimHost` as a real filesystem over FUSE (mfusepy on libfuse3).

Every operation maps 1:1 to a path operation of the in-process model, so the mounted host and
the in-process one cannot disagree. Errors are the model's errno; anything unexpected becomes
EINVAL for that call (mfusepy catches it) and never stops the server.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Callable
from typing import Any

import mfusepy

from vgpuctl.sim.host import SimHost

FSTYPE = "vgpuctl-sim"  # mounts show as "fuse.vgpuctl-sim" in /proc/self/mountinfo


class SimFs(mfusepy.Operations):  # type: ignore[misc]
    use_ns = True

    def __init__(self, host: SimHost, on_ready: Callable[[], None] | None = None) -> None:
        self.host = host
        self.on_ready = on_ready

    def init(self, path: str) -> None:
        if self.on_ready:
            self.on_ready()

    def getattr(self, path: str, fh: int | None = None) -> dict[str, Any]:
        with self.host.lock:
            return self.host.vfs.stat(path)

    def readdir(self, path: str, fh: int) -> list[str]:
        return [".", "..", *self.host.listdir(path)]

    def readlink(self, path: str) -> str:
        return self.host.readlink(path)

    def open(self, path: str, flags: int) -> int:
        access = flags & os.O_ACCMODE
        with self.host.lock:
            self.host.vfs.check_open(path, read=access in (os.O_RDONLY, os.O_RDWR),
                                     write=access in (os.O_WRONLY, os.O_RDWR))
            if flags & os.O_TRUNC:
                self.host.vfs.truncate(path, 0)
        return 0

    def read(self, path: str, size: int, offset: int, fh: int) -> bytes:
        return self.host.read(path, size, offset)

    def write(self, path: str, data: bytes, offset: int, fh: int) -> int:
        return self.host.write(path, data, offset)

    def truncate(self, path: str, length: int, fh: int | None = None) -> int:
        with self.host.lock:
            self.host.vfs.truncate(path, length)
        return 0

    def create(self, path: str, mode: int, fi: Any = None) -> int:
        with self.host.lock:
            self.host.vfs.create(path, mode)
        return 0

    def mkdir(self, path: str, mode: int) -> int:
        with self.host.lock:
            self.host.vfs.mkdir(path, mode)
        return 0

    def unlink(self, path: str) -> int:
        with self.host.lock:
            self.host.vfs.unlink(path)
        return 0

    def rmdir(self, path: str) -> int:
        with self.host.lock:
            self.host.vfs.rmdir(path)
        return 0

    def rename(self, old: str, new: str) -> int:
        with self.host.lock:
            self.host.vfs.rename(old, new)
        return 0

    def chmod(self, path: str, mode: int) -> int:
        with self.host.lock:
            self.host.vfs.chmod(path, mode)
        return 0

    def chown(self, path: str, uid: int, gid: int) -> int:
        raise mfusepy.FuseOSError(errno.EPERM)  # everything here belongs to root

    def utimens(self, path: str, times: tuple[int, int] | None = None) -> int:
        with self.host.lock:
            self.host.vfs.utimens(path, times[1] / 1e9 if times else None)
        return 0

    def flush(self, path: str, fh: int) -> int:
        return 0

    def fsync(self, path: str, datasync: int, fh: int) -> int:
        return 0

    def release(self, path: str, fh: int) -> int:
        return 0

    def statfs(self, path: str) -> dict[str, int]:
        return {"f_bsize": 4096, "f_frsize": 4096, "f_blocks": 0, "f_bfree": 0, "f_bavail": 0,
                "f_files": 0, "f_ffree": 0, "f_namemax": 255}


def serve(host: SimHost, mountpoint: str, on_ready: Callable[[], None] | None = None) -> None:
    """Mount and serve until unmounted or SIGTERM/SIGINT (libfuse unmounts on those)."""
    mfusepy.FUSE(
        SimFs(host, on_ready),
        mountpoint,
        foreground=True,
        allow_other=True,
        default_permissions=True,  # the kernel checks modes for non-root users, as on sysfs
        nodev=True,  # simulated /dev nodes must never reach real devices
        fsname=FSTYPE,
        subtype=FSTYPE,
        direct_io=True,  # attributes are computed per read: no page cache
        entry_timeout=0,
        attr_timeout=0,
        negative_timeout=0,
    )
