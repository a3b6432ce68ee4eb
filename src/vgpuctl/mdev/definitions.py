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

from vgpuctl.base.errors import InvalidInput, KernelError
from vgpuctl.base.problems import UnreadableFile
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


def parse_config(text: str, uuid: str, parent: str, where: str, strict: bool = True) -> Definition:
    """Load a config the way mdevctl does (its load_from_json): mdev_type and start required; attrs
    optional, a list of one-key objects with string values. ``strict`` (vgpuctl) also wants start to be
    "auto" or "manual"; mdevctl reads any other start as manual.

    Errors are InvalidInput with ``what="definition"``, ``path=where`` and a ``problem``: json (with
    json_error, line, column, and input_end, the (line, length) where the text ends, when it ran out),
    fields, attrs, attr, attr_fields, attr_value (with key and value), start.
    """
    def bad(template: str, problem: str, **data: Any) -> InvalidInput:
        return InvalidInput("{path}: " + template, what="definition", path=where, uuid=uuid, parent=parent,
                            problem=problem, **data)

    try:
        raw = json.loads(text)
    except json.JSONDecodeError as e:
        lines = text.split("\n")
        end = (len(lines), len(lines[-1])) if not text[e.pos:].strip() else None
        raise bad("invalid json ({json_error} at line {line}); fix or remove the file", "json", json_error=e.msg,
                  line=e.lineno, column=e.colno, input_end=end) from None
    if not isinstance(raw, dict) or raw.get("mdev_type") is None or raw.get("start") is None \
            or not isinstance(raw["mdev_type"], str):
        raise bad('invalid json: needs "mdev_type" and "start"', "fields")
    attrs: list[tuple[str, str]] = []
    if raw.get("attrs") is not None and not isinstance(raw["attrs"], list):
        raise bad("attrs is not a list", "attrs")
    for item in raw.get("attrs") or []:
        if not isinstance(item, dict):
            raise bad("invalid JSON format for attribute: not an object", "attr")
        if len(item) != 1:
            raise bad("invalid JSON format for attribute: too many fields", "attr_fields")
        ((key, value),) = item.items()
        if not isinstance(value, str):
            raise bad("attribute {key!r} value must be of type str", "attr_value", key=key, value=value)
        attrs.append((key, value))
    start = raw["start"]
    if strict and start not in START_MODES:
        raise bad('start must be "auto" or "manual", not {start!r}', "start", start=start)
    return Definition(uuid=uuid, parent=parent, mdev_type=raw["mdev_type"],
                      start="auto" if start == "auto" else "manual", attrs=attrs)


def canonical_uuid(text: str) -> str:
    """A UUID in the lower-case hyphenated form sysfs and mdevctl use (the same forms uuid.UUID reads)."""
    digits = text.strip().lower().removeprefix("urn:uuid:").strip("{}").replace("-", "")
    if len(digits) != 32 or any(c not in "0123456789abcdef" for c in digits):
        raise InvalidInput("{value!r} is not a UUID (expected e.g. {example})", what="uuid", value=text,
                           example=new_uuid())
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


def files(root: HostRoot) -> list[tuple[str, str]]:
    """(parent, name) of every regular file in /etc/mdevctl.d/<parent>/, by parent then name: what mdevctl
    reads as definitions (names that are no UUID too: it warns about those)."""
    base = root.etc_mdevctl_d
    if not root.path(base).is_dir():
        return []
    found = []
    for parent in sorted(root.listdir(base)):
        parent_dir = root.path(f"{base}/{parent}")
        if parent_dir.is_dir():
            found += [(parent, name) for name in sorted(os.listdir(parent_dir)) if (parent_dir / name).is_file()]
    return found


def read(root: HostRoot, parent: str, uuid: str, strict: bool = True) -> Definition:
    """One definition file (InvalidInput when it is bad, OSError when it cannot be read)."""
    local = root.path(definition_path(root, parent, uuid))
    try:
        text = local.read_text()
    except UnicodeDecodeError:
        raise InvalidInput("{path}: not UTF-8 text; fix or remove the file", what="definition", path=str(local),
                           uuid=uuid, parent=parent, problem="utf-8") from None
    return parse_config(text, uuid, parent, str(local), strict)


def scan(root: HostRoot) -> tuple[list[Definition], list[UnreadableFile]]:
    """Every definition, sorted by parent then UUID, and the files that could not be read.

    Unlike mdevctl, where one bad file fails every listing and the boot's autostart, a bad file
    here is set aside and reported (the mdevctl stand-in keeps mdevctl's behaviour).
    """
    found, bad = [], []
    for parent, name in files(root):
        if parent == "scripts.d" or not is_uuid(name):
            continue  # mdevctl warns "Can't determine uuid for file" and skips; so do temp files
        try:
            found.append(read(root, parent, name))
        except (InvalidInput, OSError) as e:
            local = root.path(definition_path(root, parent, name))
            bad.append(UnreadableFile("definition", definition_path(root, parent, name),
                                      str(e).removeprefix(f"{local}: "), parent))
    return found, bad


def load_all(root: HostRoot) -> list[Definition]:
    """Every definition that can be read (:func:`scan` also says which files cannot)."""
    return scan(root)[0]


def find(root: HostRoot, uuid: str, parent: str | None = None) -> list[Definition]:
    return [d for d in load_all(root) if d.uuid == uuid and (parent is None or d.parent == parent)]


def write(root: HostRoot, definition: Definition) -> None:
    """Replace the definition file atomically (callers hold the parent's lock)."""
    host_path = definition_path(root, definition.parent, definition.uuid)
    try:
        atomic_write(root.path(host_path), definition.to_json().encode())
    except OSError as e:
        raise _failed("writing", e, host_path, definition) from None


def delete(root: HostRoot, definition: Definition) -> None:
    host_path = definition_path(root, definition.parent, definition.uuid)
    path = root.path(host_path)
    try:
        path.unlink()
    except OSError as e:
        raise _failed("removing", e, host_path, definition) from None
    fsync_dir(path.parent)  # the empty parent directory stays, as mdevctl leaves it


def _failed(doing: str, error: OSError, host_path: str, definition: Definition) -> KernelError:
    return KernelError("{doing} {path} failed: {strerror}", what="definition", doing=doing, errno=error.errno,
                       path=host_path, parent=definition.parent, uuid=definition.uuid)
