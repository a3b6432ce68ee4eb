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
FUSE_CAP_CACHE_SYMLINKS = 1 << 23  # libfuse3 fuse_common.h
# No flush or release handlers, as kernfs has none: libfuse answers FLUSH with ENOSYS once, and
# from then on the kernel no longer sends one at every close() (a synchronous round trip saved).
_LIBFUSE = mfusepy._libfuse  # the libfuse3 that mfusepy loaded: fuse_invalidate_path() is not wrapped
_LIBFUSE.fuse_invalidate_path.argtypes = (ctypes.c_void_p, ctypes.c_char_p)
_LIBFUSE.fuse_invalidate_path.restype = ctypes.c_int


class SimFs(mfusepy.Operations):  # type: ignore[misc]
    use_ns = True

    def __init__(self, host: SimHost, on_ready: Callable[[], None] | None = None) -> None:
        self.host = host
        self.on_ready = on_ready
        self.fuse = ctypes.c_void_p()
        self.stale: list[str] = []  # paths the model changed, for the kernel to forget (forget_stale)

    def init_with_config(self, conn_info: Any, config: Any) -> None:
        # Entries, attributes and symlink targets are cached by the kernel (see serve()); a sysfs
        # listing follows a symlink per device, and without the cache each is a round trip (~60 us).
        # When the model drops or replaces a path by itself (a vGPU removed, a reboot), the kernel
        # is told to forget it: that invalidates its attributes and its cached link target alike.
        if conn_info is not None:
            conn_info.want |= conn_info.capable & FUSE_CAP_CACHE_SYMLINKS
        self.fuse = ctypes.c_void_p(_LIBFUSE.fuse_get_context().contents.fuse)
        self.host.vfs.on_change = self.stale.append
        if self.on_ready:
            self.on_ready()

    def forget_stale(self) -> None:
        """Invalidate what the model changed, once its lock is released: the kernel may have to wait
        for a cached link's page, locked by a READLINK that itself waits for the model's lock. Done
        before the request that changed the model returns, so its caller sees the change at once."""
        while True:
            try:
                path = self.stale.pop()  # atomic: another request's thread may be emptying it too
            except IndexError:
                return
            _LIBFUSE.fuse_invalidate_path(self.fuse, path.encode())

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
        try:  # the model changes on writes alone (create, remove, the control file)
            return self.host.write(path, data, offset)
        finally:
            self.forget_stale()

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

    def fsync(self, path: str, datasync: int, fh: int) -> int:
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
