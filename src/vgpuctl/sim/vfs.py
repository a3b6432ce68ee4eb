"""A tiny in-memory filesystem with sysfs-like nodes.

The simulated host is a tree of these nodes. Sysfs attributes are computed on read (``show``)
and act on write (``store``), with the kernel's errno on failure; plain files (``Blob``) back
writable storage such as ``/etc``. The same path operations serve in-process tests and the
FUSE adapter, so both see one behaviour.
"""

from __future__ import annotations

import errno
import os
import posixpath
import stat
import time
from collections.abc import Callable
from dataclasses import dataclass, field

Show = Callable[[], str]
Store = Callable[[str], None]

SYSFS_ATTR_SIZE = 4096  # what stat() reports for every sysfs attribute
MAX_SYMLINK_DEPTH = 40


def fail(code: int, detail: str = "") -> OSError:
    """An OSError carrying a kernel errno (what a write() to sysfs returns)."""
    return OSError(code, os.strerror(code) + (f": {detail}" if detail else ""))


@dataclass
class Node:
    mode: int
    mtime: float = field(default_factory=time.time, kw_only=True)


@dataclass
class Dir(Node):
    mode: int = 0o755
    children: dict[str, Node] = field(default_factory=dict)
    # Plain storage (e.g. /etc) allows mkdir/create/unlink/rename; sysfs directories do not.
    writable: bool = False


@dataclass
class Attr(Node):
    """A sysfs attribute. Its mode follows from which of show/store exist, as with __ATTR_RO/WO/RW."""

    show: Show | None = None
    store: Store | None = None
    mode: int = -1
    binary: bool = False

    def __post_init__(self) -> None:
        if self.mode == -1:
            self.mode = (0o444 if self.show else 0) | (0o200 if self.store else 0)


@dataclass
class Blob(Node):
    """A regular file with contents (plain storage)."""

    data: bytearray = field(default_factory=bytearray)
    mode: int = 0o644


@dataclass
class Link(Node):
    """A symlink to an absolute host path; readlink answers relative, as sysfs does.

    A link made by symlink(2) in plain storage keeps the text it was made with (``literal``),
    which readlink answers unchanged.
    """

    target: str = "/"
    mode: int = 0o777
    literal: str | None = None


@dataclass
class CharDev(Node):
    major: int = 0
    minor: int = 0
    mode: int = 0o600


def const(value: str) -> Show:
    return lambda: value


class Vfs:
    """Path operations over a node tree. Paths are absolute host paths ("/sys/...")."""

    def __init__(self) -> None:
        self.root = Dir()
        # Told about every path that vanishes or is replaced behind a client's back (not by its
        # own unlink/rename), so that a FUSE server can invalidate the kernel's caches.
        self.on_change: Callable[[str], None] | None = None

    # ---- building the tree (used by the simulator, never by clients) ----
    def mkdirs(self, path: str) -> Dir:
        node: Node = self.root
        for part in _parts(path):
            assert isinstance(node, Dir), path
            child = node.children.get(part)
            if child is None:
                child = node.children[part] = Dir()
            elif isinstance(child, Link):
                child = self._resolve(child.target, follow=True)
            node = child
        assert isinstance(node, Dir), path
        return node

    def put(self, path: str, node: Node) -> Node:
        parent, name = posixpath.split(path)
        children = self.mkdirs(parent).children
        replaced = children.get(name)
        children[name] = node
        if replaced is not None:
            self._changed(path, replaced)
        return node

    def drop(self, path: str) -> None:
        parent, name = posixpath.split(path)
        directory = self._resolve(parent, follow=True)
        if not isinstance(directory, Dir):
            return
        dropped = directory.children.pop(name, None)
        if dropped is not None:
            directory.mtime = time.time()
            self._changed(path, dropped)

    def _changed(self, path: str, old: Node) -> None:
        """Report ``path`` and everything that was below it: a kernel that still holds a child (say
        a device's ``mdev_type`` link) must not serve it when the same path comes back."""
        if self.on_change is None:
            return
        if isinstance(old, Dir):
            for name, child in old.children.items():
                self._changed(f"{path}/{name}", child)
        self.on_change(path)

    # ---- lookup ----
    def _resolve(self, path: str, follow: bool, depth: int = 0) -> Node:
        if depth > MAX_SYMLINK_DEPTH:
            raise fail(errno.ELOOP)
        node: Node = self.root
        parts = _parts(path)
        walked: list[str] = []
        for index, part in enumerate(parts):
            if not isinstance(node, Dir):
                raise fail(errno.ENOTDIR, path)
            if part == "..":
                walked = walked[:-1]
                node = self._resolve("/" + "/".join(walked), follow=True, depth=depth + 1)
                continue
            child = node.children.get(part)
            if child is None:
                raise fail(errno.ENOENT, path)
            last = index == len(parts) - 1
            if isinstance(child, Link) and (follow or not last):
                rest = "/".join(parts[index + 1 :])
                target = child.target + ("/" + rest if rest else "")
                return self._resolve(target, follow, depth + 1)
            walked.append(part)
            node = child
        return node

    def node(self, path: str) -> Node:
        """The node at path, following symlinks except the last component (like lstat)."""
        return self._resolve(path, follow=False)

    def _parent_dir(self, path: str) -> tuple[Dir, str]:
        parent, name = posixpath.split(posixpath.normpath(path))
        directory = self._resolve(parent, follow=True)
        if not isinstance(directory, Dir):
            raise fail(errno.ENOTDIR, path)
        return directory, name

    # ---- the operations a filesystem serves ----
    def listdir(self, path: str) -> list[str]:
        node = self._resolve(path, follow=True)
        if not isinstance(node, Dir):
            raise fail(errno.ENOTDIR, path)
        return sorted(node.children)

    def realpath(self, path: str, depth: int = 0) -> str:
        """The canonical path of an existing node, every symlink resolved."""
        if depth > MAX_SYMLINK_DEPTH:
            raise fail(errno.ELOOP)
        walked: list[str] = []
        node: Node = self.root
        parts = _parts(path)
        for index, part in enumerate(parts):
            if part == "..":
                walked = walked[:-1]
                node = self._resolve("/" + "/".join(walked), follow=True)
                continue
            child = node.children.get(part) if isinstance(node, Dir) else None
            if child is None:
                raise fail(errno.ENOENT, path)
            if isinstance(child, Link):
                rest = "/".join(parts[index + 1 :])
                return self.realpath(child.target + ("/" + rest if rest else ""), depth + 1)
            walked.append(part)
            node = child
        return "/" + "/".join(walked)

    def readlink(self, path: str) -> str:
        node = self.node(path)
        if not isinstance(node, Link):
            raise fail(errno.EINVAL, path)
        if node.literal is not None:
            return node.literal
        # Relative to where the link really is, as sysfs computes it.
        return posixpath.relpath(node.target, self.realpath(posixpath.dirname(posixpath.normpath(path))))

    def check_open(self, path: str, read: bool, write: bool) -> Node:
        """kernfs refuses to open an attribute for an access it has no handler for, even for root."""
        node = self._resolve(path, follow=True)
        if isinstance(node, Dir):
            if write:
                raise fail(errno.EISDIR, path)
            return node
        if isinstance(node, Attr) and (
            (read and (node.show is None or not node.mode & 0o444))
            or (write and (node.store is None or not node.mode & 0o222))
        ):
            raise fail(errno.EACCES, path)
        if isinstance(node, CharDev):
            raise fail(errno.ENXIO, path)  # a simulated device has no driver behind it
        return node

    def read(self, path: str, size: int = -1, offset: int = 0) -> bytes:
        node = self.check_open(path, read=True, write=False)
        if isinstance(node, Attr):
            assert node.show is not None
            data = node.show().encode("latin-1" if node.binary else "utf-8")  # binary: one char a byte
        elif isinstance(node, Blob):
            data = bytes(node.data)
        else:
            raise fail(errno.EISDIR, path)
        end = len(data) if size < 0 else offset + size
        return data[offset:end]

    def write(self, path: str, data: bytes, offset: int = 0) -> int:
        node = self.check_open(path, read=False, write=True)
        if isinstance(node, Attr):
            assert node.store is not None
            # One write() is one store() call with the whole buffer, whatever the offset.
            node.store(data.decode(errors="replace"))
            return len(data)
        if isinstance(node, Blob):
            if offset > len(node.data):
                node.data.extend(b"\0" * (offset - len(node.data)))
            node.data[offset : offset + len(data)] = data
            node.mtime = time.time()
            return len(data)
        raise fail(errno.EISDIR, path)

    def truncate(self, path: str, length: int) -> None:
        node = self._resolve(path, follow=True)
        if isinstance(node, Blob):
            del node.data[length:]
            node.data.extend(b"\0" * (length - len(node.data)))
            node.mtime = time.time()
        elif isinstance(node, Dir):
            raise fail(errno.EISDIR, path)
        # sysfs ignores O_TRUNC on attributes ("echo x > attr" truncates first).

    def stat(self, path: str, follow: bool = False) -> dict[str, int | float]:
        node = self._resolve(path, follow=follow)
        size = 0
        if isinstance(node, Dir):
            kind = stat.S_IFDIR
            nlink = 2 + sum(isinstance(c, Dir) for c in node.children.values())
        else:
            nlink = 1
            if isinstance(node, Link):
                kind = stat.S_IFLNK
                size = len(self.readlink(path))
            elif isinstance(node, CharDev):
                kind = stat.S_IFCHR
            elif isinstance(node, Blob):
                kind = stat.S_IFREG
                size = len(node.data)
            else:
                kind = stat.S_IFREG
                size = SYSFS_ATTR_SIZE
        result: dict[str, int | float] = {
            "st_mode": kind | node.mode,
            "st_nlink": nlink,
            "st_size": size,
            "st_uid": 0,
            "st_gid": 0,
            "st_mtime": node.mtime,
            "st_atime": node.mtime,
            "st_ctime": node.mtime,
        }
        if isinstance(node, CharDev):
            result["st_rdev"] = (node.major << 8) | node.minor
        return result

    # ---- plain storage: only inside writable directories ----
    def _storage_dir(self, path: str) -> tuple[Dir, str]:
        directory, name = self._parent_dir(path)
        if not directory.writable:
            raise fail(errno.EACCES if name in directory.children else errno.EPERM, path)
        return directory, name

    def create(self, path: str, mode: int) -> None:
        directory, name = self._storage_dir(path)
        if name not in directory.children:
            directory.children[name] = Blob(mode=mode & 0o7777)
            directory.mtime = time.time()

    def mkdir(self, path: str, mode: int) -> None:
        directory, name = self._storage_dir(path)
        if name in directory.children:
            raise fail(errno.EEXIST, path)
        directory.children[name] = Dir(mode=mode & 0o7777, writable=True)
        directory.mtime = time.time()

    def unlink(self, path: str) -> None:
        directory, name = self._storage_dir(path)
        node = directory.children.get(name)
        if node is None:
            raise fail(errno.ENOENT, path)
        if isinstance(node, Dir):
            raise fail(errno.EISDIR, path)
        del directory.children[name]
        directory.mtime = time.time()

    def symlink(self, path: str, target: str) -> None:
        """symlink(2) in plain storage; a relative target is resolved from the link's directory."""
        directory, name = self._storage_dir(path)
        if name in directory.children:
            raise fail(errno.EEXIST, path)
        absolute = posixpath.normpath(posixpath.join(posixpath.dirname(posixpath.normpath(path)), target))
        directory.children[name] = Link(target=absolute, literal=target)
        directory.mtime = time.time()

    def rmdir(self, path: str) -> None:
        directory, name = self._storage_dir(path)
        node = directory.children.get(name)
        if node is None:
            raise fail(errno.ENOENT, path)
        if not isinstance(node, Dir):
            raise fail(errno.ENOTDIR, path)
        if node.children:
            raise fail(errno.ENOTEMPTY, path)
        del directory.children[name]
        directory.mtime = time.time()

    def rename(self, old: str, new: str) -> None:
        old_dir, old_name = self._storage_dir(old)
        new_dir, new_name = self._storage_dir(new)
        node = old_dir.children.get(old_name)
        if node is None:
            raise fail(errno.ENOENT, old)
        existing = new_dir.children.get(new_name)
        if isinstance(existing, Dir) and (not isinstance(node, Dir) or existing.children):
            raise fail(errno.EISDIR if not isinstance(node, Dir) else errno.ENOTEMPTY, new)
        del old_dir.children[old_name]
        new_dir.children[new_name] = node  # atomic replace, as rename(2)
        old_dir.mtime = new_dir.mtime = time.time()

    def chmod(self, path: str, mode: int) -> None:
        node = self._resolve(path, follow=True)
        if isinstance(node, Blob | Dir) and (isinstance(node, Blob) or node.writable):
            node.mode = mode & 0o7777
            return
        raise fail(errno.EPERM, path)

    def utimens(self, path: str, mtime: float | None) -> None:
        node = self._resolve(path, follow=True)
        node.mtime = mtime if mtime is not None else time.time()


def _parts(path: str) -> list[str]:
    return [p for p in path.split("/") if p and p != "."]
