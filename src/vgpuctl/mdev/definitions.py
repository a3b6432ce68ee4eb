"""Persistent vGPU definitions in mdevctl's own on-disk format.

One file per device, ``/etc/mdevctl.d/<parent>/<uuid>``: serde_json's pretty print (2-space
indent) of ``{"mdev_type", "start", "attrs"}`` in that order, ``attrs`` always present, no
trailing newline (mdevctl src/mdev.rs). Files are replaced atomically.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any

from vgpuctl.base.errors import InvalidInput
from vgpuctl.host import HostRoot
from vgpuctl.host.files import atomic_write as atomic_write  # re-exported: it lived here first
from vgpuctl.host.files import fsync_dir as fsync_dir

START_MODES = ("auto", "manual")


@dataclass
class Definition:
    """One persistent vGPU as mdevctl stores it in /etc/mdevctl.d/<parent>/<uuid>."""

    uuid: str
    parent: str
    mdev_type: str
    start: str = "manual"
    attrs: list[tuple[str, str]] = field(default_factory=list)

    def to_json(self, indent: int | None = 2) -> str:
        """mdevctl's text: pretty with 2 spaces (files), or compact (libvirt's stdin form)."""
        body = {"mdev_type": self.mdev_type, "start": self.start, "attrs": [{k: v} for k, v in self.attrs]}
        separators = (",", ": ") if indent else (",", ":")
        return json.dumps(body, indent=indent, separators=separators, ensure_ascii=False)

    def config(self) -> dict[str, Any]:
        return {"mdev_type": self.mdev_type, "start": self.start, "attrs": [{k: v} for k, v in self.attrs]}


def parse_config(text: str, uuid: str, parent: str, where: str) -> Definition:
    """Load a config the way mdevctl does: mdev_type and start required; attrs optional, one key each."""
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as e:
        raise InvalidInput(f"{where}: invalid json ({e.msg} at line {e.lineno}); fix or remove the file") from None
    if not isinstance(raw, dict) or not isinstance(raw.get("mdev_type"), str) or "start" not in raw:
        raise InvalidInput(f"{where}: invalid json: needs \"mdev_type\" and \"start\"")
    if raw["start"] not in START_MODES:
        raise InvalidInput(f"{where}: start must be \"auto\" or \"manual\", not {raw['start']!r}")
    attrs: list[tuple[str, str]] = []
    for item in raw.get("attrs") or []:
        if not isinstance(item, dict) or len(item) != 1:
            raise InvalidInput(f"{where}: invalid JSON format for attribute: too many fields")
        ((key, value),) = item.items()
        if not isinstance(value, str):
            raise InvalidInput(f"{where}: attribute {key!r} value must be of type str")
        attrs.append((key, value))
    return Definition(uuid=uuid, parent=parent, mdev_type=raw["mdev_type"], start=raw["start"], attrs=attrs)


def canonical_uuid(text: str) -> str:
    """A UUID in the lower-case hyphenated form sysfs and mdevctl use (the same forms uuid.UUID reads)."""
    digits = text.strip().lower().removeprefix("urn:uuid:").strip("{}").replace("-", "")
    if len(digits) != 32 or any(c not in "0123456789abcdef" for c in digits):
        raise InvalidInput(f"{text!r} is not a UUID (expected e.g. {new_uuid()})")
    return f"{digits[:8]}-{digits[8:12]}-{digits[12:16]}-{digits[16:20]}-{digits[20:]}"


def new_uuid() -> str:
    import uuid  # imported on use: the uuid module is slow to import, and most commands never need it

    return str(uuid.uuid4())


def is_uuid(name: str) -> bool:
    """Exactly a canonical UUID (a file name mdevctl would accept as a definition)."""
    try:
        return canonical_uuid(name) == name
    except InvalidInput:
        return False


def definition_path(root: HostRoot, parent: str, uuid: str) -> str:
    return f"{root.etc_mdevctl_d}/{parent}/{uuid}"


@dataclass(frozen=True)
class BadFile:
    """A definition file that cannot be read: reported with its path, while every other definition works."""

    path: str
    parent: str
    error: str

    def to_json(self) -> dict[str, str]:
        return {"path": self.path, "parent": self.parent, "error": self.error}


def scan(root: HostRoot) -> tuple[list[Definition], list[BadFile]]:
    """Every definition, sorted by parent then UUID, and the files that could not be read.

    Unlike mdevctl, where one bad file fails every listing and the boot's autostart, a bad file
    here is set aside and reported (the mdevctl stand-in keeps mdevctl's behaviour).
    """
    base = root.etc_mdevctl_d
    if not root.exists(base):
        return [], []
    found, bad = [], []
    for parent in root.listdir(base):
        parent_dir = root.path(f"{base}/{parent}")
        if not parent_dir.is_dir() or parent == "scripts.d":
            continue
        for name in sorted(os.listdir(parent_dir)):
            path = parent_dir / name
            if not path.is_file() or not is_uuid(name):
                continue  # mdevctl warns "Can't determine uuid for file" and skips; so do temp files
            try:
                found.append(parse_config(path.read_text(), name, parent, str(path)))
            except (InvalidInput, OSError, UnicodeDecodeError) as e:
                host_path = definition_path(root, parent, name)
                bad.append(BadFile(host_path, parent, str(e).removeprefix(f"{path}: ")))
    return found, bad


def load_all(root: HostRoot) -> list[Definition]:
    """Every definition that can be read (:func:`scan` also says which files cannot)."""
    return scan(root)[0]


def find(root: HostRoot, uuid: str, parent: str | None = None) -> list[Definition]:
    return [d for d in load_all(root) if d.uuid == uuid and (parent is None or d.parent == parent)]


def write(root: HostRoot, definition: Definition) -> None:
    """Replace the definition file atomically (callers hold the parent's lock)."""
    atomic_write(root.path(definition_path(root, definition.parent, definition.uuid)), definition.to_json().encode())


def delete(root: HostRoot, definition: Definition) -> None:
    path = root.path(definition_path(root, definition.parent, definition.uuid))
    path.unlink()
    fsync_dir(path.parent)  # the empty parent directory stays, as mdevctl leaves it
