"""vgpuctl's own records of the vGPUs and definitions it created, in its state directory
(:class:`vgpuctl.base.state.StateDir`), never inside mdevctl's files.

Ownership is a small journal, as a database keeps one (``owned.json``, replaced atomically):

* ``devices``: active vGPUs vgpuctl created (by UUID); ``definitions``: definition files vgpuctl
  wrote (by ``PARENT/UUID``). Two records, because starting someone else's definition makes the
  device ours but never the definition.
* ``vfs``: SR-IOV VF configurations vgpuctl made (by PF address: how many VFs, bound to which driver);
  written only once there is one.
* ``journal``: an *intent* is written before the host is changed (``claim`` before a create or a
  definition is written, ``release`` before a remove or an undefine), with the pid and start time
  of the process making the change, and settled after it. An intent whose process died (killed
  mid-way) is settled by the next command that reads the records: a claim becomes ownership if the
  object exists, a release forgets it if it is gone. A kill at any point thus leaves either nothing
  or something vgpuctl knows it owns, and never a claim on someone else's object.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from vgpuctl.base import process
from vgpuctl.base.crash import crashpoint
from vgpuctl.base.errors import StateDamaged
from vgpuctl.base.state import StateDir
from vgpuctl.host.files import atomic_write

OWNED_VERSION = 2

Kind = Literal["device", "definition", "vfs"]
KINDS: tuple[Kind, ...] = ("device", "definition", "vfs")


def definition_key(parent: str, uuid: str) -> str:
    return f"{parent}/{uuid}"


@dataclass
class Ownership:
    """What ``owned.json`` holds: owned devices, owned definitions and the unsettled intents."""

    devices: dict[str, dict[str, Any]] = field(default_factory=dict)
    definitions: dict[str, dict[str, Any]] = field(default_factory=dict)
    journal: list[dict[str, Any]] = field(default_factory=list)
    vfs: dict[str, dict[str, Any]] = field(default_factory=dict)  # SR-IOV VF configurations made, by PF address

    def records(self, kind: Kind) -> dict[str, dict[str, Any]]:
        return {"device": self.devices, "definition": self.definitions, "vfs": self.vfs}[kind]

    def owns_device(self, uuid: str, parent: str | None = None, type_id: str | None = None) -> bool:
        """Whether vgpuctl created the device; given its parent and type, only if they are the ones recorded
        (a device of that UUID made anew by another tool, before any vgpuctl command saw it gone, is not ours)."""
        record = self.devices.get(uuid)
        return record is not None and parent in (None, record.get("parent")) and type_id in (None, record.get("type"))

    def owns_definition(self, parent: str, uuid: str) -> bool:
        return definition_key(parent, uuid) in self.definitions

    def to_json(self) -> bytes:
        body = {"version": OWNED_VERSION, "devices": self.devices, "definitions": self.definitions,
                "journal": self.journal, **({"vfs": self.vfs} if self.vfs else {})}
        return json.dumps(body, indent=2, sort_keys=True).encode() + b"\n"

    @classmethod
    def parse(cls, text: str) -> Ownership:
        data = json.loads(text)
        if not isinstance(data, dict):
            raise TypeError("not an object")
        if "version" not in data:  # version 1: one record per UUID for device and definition alike
            return cls._from_v1(data["vgpus"])
        found = cls(dict(data["devices"]), dict(data["definitions"]), list(data["journal"]), dict(data.get("vfs", {})))
        for records in (found.devices, found.definitions, found.vfs):
            if not all(isinstance(r, dict) for r in records.values()):
                raise TypeError("a record is not an object")
        if not all(isinstance(i, dict) and i.get("kind") in KINDS for i in found.journal):
            raise TypeError("a journal entry is not an intent")
        return found

    @classmethod
    def _from_v1(cls, vgpus: dict[str, dict[str, Any]]) -> Ownership:
        # Version 1 cannot tell which of the two vgpuctl made: both, as version 1 itself assumed. The
        # next command's reconcile drops the device records whose device is gone.
        found = cls()
        for uuid, record in vgpus.items():
            found.devices[uuid] = dict(record)
            found.definitions[definition_key(record["parent"], uuid)] = {**record, "uuid": uuid}
        return found


@dataclass(frozen=True)
class Journal:
    """What vgpuctl owns, in its state directory's ``owned.json`` (see the module's docstring)."""

    state: StateDir

    @property
    def file(self) -> Path:
        return self.state.path / "owned.json"

    # ------------------------------------------------------------------ reading
    def ownership(self) -> Ownership:
        """The records as they are on disk (unsettled intents included: see :meth:`reconcile`)."""
        try:
            text = self.file.read_text()
        except FileNotFoundError:
            return Ownership()
        except OSError as e:
            raise self._damaged(e.strerror or str(e)) from None
        try:
            return Ownership.parse(text)
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise self._damaged(f"{type(e).__name__}: {e}") from None

    def _damaged(self, why: str) -> StateDamaged:
        return StateDamaged("{path} is damaged ({why}); vgpuctl changes nothing until it is repaired or moved away "
                            "(vgpuctl then owns nothing, and needs --force for what it made)",
                            what="state", path=str(self.file), why=why)

    def owns_device(self, uuid: str) -> bool:
        return self.ownership().owns_device(uuid)

    def owns_definition(self, parent: str, uuid: str) -> bool:
        return self.ownership().owns_definition(parent, uuid)

    # ------------------------------------------------------------------ changing, with intents
    def claiming(self, kind: Kind, key: str, record: dict[str, Any]) -> contextlib.AbstractContextManager[None]:
        """Around a change that makes an object (a create, a definition written): ours once it exists.

        The intent is on disk before the body runs; the body's success makes the record, its failure
        drops the intent; a kill leaves the intent for :meth:`reconcile`.
        """
        record = {**record, "since": time.strftime("%Y-%m-%dT%H:%M:%S%z")}

        def own(o: Ownership) -> None:
            o.records(kind)[key] = record

        return self._intent({"op": "claim", "kind": kind, "key": key, "record": record}, own)

    def releasing(self, kind: Kind, key: str) -> contextlib.AbstractContextManager[None]:
        """Around a change that removes an owned object (a remove, an undefine): forgotten once done.
        The record is kept when the body fails (the object is still there and still ours)."""

        def disown(o: Ownership) -> None:
            o.records(kind).pop(key, None)

        return self._intent({"op": "release", "kind": kind, "key": key}, disown)

    @contextlib.contextmanager
    def _intent(self, intent: dict[str, Any], settle: Callable[[Ownership], None]) -> Iterator[None]:
        intent = {**intent, "by": process.identity()}
        self._update(lambda o: o.journal.append(intent))
        crashpoint(f"state:{intent['op']}-written")
        try:
            yield
        except BaseException:
            self._update(lambda o: _drop(o.journal, intent))
            raise
        crashpoint(f"state:before-{intent['op']}-settled")

        def done(o: Ownership) -> None:
            _drop(o.journal, intent)
            settle(o)

        self._update(done)

    def forget(self, kind: Kind, key: str) -> None:
        """Drop a record whose object is gone without vgpuctl (removed by another tool)."""
        if key in self.ownership().records(kind):
            self._update(lambda o: o.records(kind).pop(key, None))

    def reconcile(self, exists: Callable[[Kind, str], bool]) -> Ownership:
        """Settle the intents of processes that died, and drop device records whose device is gone.

        ``exists(kind, key)`` says whether the object is on the host now. Returns the settled records.
        """
        current = self.ownership()
        if not current.journal and all(exists("device", uuid) for uuid in current.devices):
            return current  # the usual case: nothing to settle, nothing written

        def settle(o: Ownership) -> None:
            for intent in list(o.journal):
                if process.is_alive(intent.get("by", {})):
                    continue  # still at work (another vgpuctl): it settles its own intent
                o.journal.remove(intent)
                kind, key = intent["kind"], intent["key"]
                present = exists(kind, key)
                if intent["op"] == "claim" and present:
                    o.records(kind)[key] = intent["record"]
                elif intent["op"] == "release" and not present:
                    o.records(kind).pop(key, None)
            # A device gone (removed by another tool, or a reboot) is no longer ours: if the same UUID is
            # made again by someone else, it is theirs. Devices being claimed right now are in the journal.
            for uuid in [u for u in o.devices if not exists("device", u)]:
                del o.devices[uuid]

        return self._update(settle)

    def _update(self, change: Callable[[Ownership], object]) -> Ownership:
        with self.state.lock("state"):
            current = self.ownership()
            change(current)
            self.state.path.mkdir(parents=True, exist_ok=True)
            atomic_write(self.file, current.to_json())
            return current


def _drop(journal: list[dict[str, Any]], intent: dict[str, Any]) -> None:
    with contextlib.suppress(ValueError):
        journal.remove(intent)

