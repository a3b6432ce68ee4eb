"""Serve a :class:`SimHost` as a real filesystem over FUSE (mfusepy on libfuse3).

Every operation maps 1:1 to a path operation of the in-process model, so the mounted host and
the in-process one cannot disagree. Errors are the model's errno; anything unexpected becomes
EINVAL for that call (mfusepy catches it) and never stops the server.
"""

from __future__ import annotations

import ctypes
import errno
import os
from collections.abc import Callable
from typing import Any

import mfusepy

from vgpuctl.sim.host import SimHost

FSTYPE = "vgpuctl-sim"  # mounts show as "fuse.vgpuctl-sim" in /proc/self/mountinfo
CACHE_SECONDS = 60
_LIBFUSE = mfusepy._libfuse  # the libfuse3 that mfusepy loaded: fuse_invalidate_path() is not wrapped
_LIBFUSE.fuse_invalidate_path.argtypes = (ctypes.c_void_p, ctypes.c_char_p)
_LIBFUSE.fuse_invalidate_path.restype = ctypes.c_int


class SimFs(mfusepy.Operations):  # type: ignore[misc]
    use_ns = True

    def __init__(self, host: SimHost, on_ready: Callable[[], None] | None = None) -> None:
        self.host = host
        self.on_ready = on_ready

    def init(self, path: str) -> None:
        # Entries and attributes are cached by the kernel (see serve()); when the model drops or
        # replaces a path by itself (a vGPU removed, a reboot), tell the kernel to forget it.
        fuse = ctypes.c_void_p(_LIBFUSE.fuse_get_context().contents.fuse)
        self.host.vfs.on_change = lambda changed: _LIBFUSE.fuse_invalidate_path(fuse, changed.encode())
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

    def symlink(self, target: str, source: str) -> int:
        # mfusepy passes (link path, its contents), as FUSE's symlink(const char *to, const char *from)
        with self.host.lock:
            self.host.vfs.symlink(target, source)
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
        # Cache lookups and attributes (a path walk would otherwise cost a request per component,
        # ~1.5 ms per sysfs read); vanished paths are invalidated explicitly (SimFs.init). New
        # entries are never cached as missing, so created devices appear at once.
        entry_timeout=CACHE_SECONDS,
        attr_timeout=CACHE_SECONDS,
        negative_timeout=0,
    )
