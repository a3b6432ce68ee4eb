"""vGPU lifecycle with mdevctl's semantics: create/remove, define/undefine/modify, start/stop, autostart.

Every operation that could race takes the parent's lock; every file is replaced atomically; and
nothing vgpuctl did not create is removed or undefined unless the caller says ``force``.
"""

from __future__ import annotations

import errno
from dataclasses import dataclass, field

from vgpuctl.backends import backend_for_parent
from vgpuctl.base.crash import crashpoint
from vgpuctl.base.errors import (
    CapacityError,
    Conflict,
    InvalidInput,
    KernelError,
    NotFound,
    NotOwned,
    VgpuError,
)
from vgpuctl.base.state import StateDir
from vgpuctl.host import HostRoot
from vgpuctl.host.root import relative_path
from vgpuctl.mdev import definitions
from vgpuctl.mdev.definitions import Definition, canonical_uuid, new_uuid
from vgpuctl.mdev.report import check_parent, check_type, object_exists
from vgpuctl.mdev.state import Journal, Kind, Ownership, definition_key
from vgpuctl.mdev.sysfs import (
    ActiveDevice,
    active_device,
    active_devices,
    check_free,
    create_device,
    parent_names,
    read_types,
    remove_device,
    write_attribute,
)


@dataclass
class AutostartResult:
    uuid: str
    parent: str
    type_id: str
    status: str  # "started", "already active", "failed"
    message: str = ""


@dataclass
class Manager:
    root: HostRoot
    state: StateDir
    force: bool = False
    # The parents' names, read once per operation when needed.
    _parents: list[str] | None = field(default=None, repr=False)

    # ------------------------------------------------------------------ checks with helpful errors
    def parents(self) -> list[str]:
        if self._parents is None:
            self._parents = parent_names(self.root)
        return self._parents

    def check_parent(self, parent: str) -> None:
        check_parent(self.root, parent, self.parents())

    def check_type(self, parent: str, type_id: str) -> None:
        check_type(self.root, parent, type_id, self.parents())

    @property
    def journal(self) -> Journal:
        return Journal(self.state)

    def exists(self, kind: Kind, key: str) -> bool:
        return object_exists(self.root, kind, key)

    def ownership(self) -> Ownership:
        """vgpuctl's records with the intents of killed commands settled (every command starts here)."""
        return self.journal.reconcile(self.exists)

    def require_owned_device(self, device: ActiveDevice) -> None:
        """A device is ours if vgpuctl created it, or if it instantiates a definition vgpuctl wrote (started at
        boot by mdevctl or by vgpuctl itself)."""
        owned = self.ownership()
        if (self.force or owned.owns_device(device.uuid, device.parent, device.type_id)
                or owned.owns_definition(device.parent, device.uuid)):
            return
        raise NotOwned("vGPU {uuid} was not created by vgpuctl (mdevctl, libvirt or another tool made it); leave "
                       "it alone, or add --force if you are sure", what="device", uuid=device.uuid,
                       parent=device.parent, type_id=device.type_id)

    def require_owned_definition(self, definition: Definition) -> None:
        if self.force or self.ownership().owns_definition(definition.parent, definition.uuid):
            return
        raise NotOwned("the definition of {uuid} on {parent} was not created by vgpuctl (mdevctl, libvirt or "
                       "another tool made it; starting or stopping it does not make it vgpuctl's); leave it "
                       "alone, or add --force if you are sure", what="definition", uuid=definition.uuid,
                       parent=definition.parent, type_id=definition.mdev_type)

    # ------------------------------------------------------------------ transient devices
    def create(self, parent: str, type_id: str, uuid: str | None = None,
               attrs: list[tuple[str, str]] | None = None) -> str:
        """Create an active vGPU; attributes are written in order and a failure removes it again."""
        uuid = canonical_uuid(uuid) if uuid else new_uuid()
        self.check_type(parent, type_id)
        for name, _ in attrs or []:
            relative_path(name, "attribute")
        self.ownership()  # settles what a killed command left, and fails here, before any change, if damaged
        with self.state.lock(f"parent-{parent}"):
            check_free(self.root, uuid, parent, type_id)
            with self.journal.claiming("device", uuid, {"parent": parent, "type": type_id}):
                crashpoint("create:before-write")
                try:
                    create_device(self.root, parent, type_id, uuid)
                except KernelError as e:
                    raise self._explain_create_error(e) from None
                crashpoint("create:after-write")
                try:
                    for name, value in attrs or []:
                        write_attribute(self.root, uuid, name, value)
                except VgpuError as e:
                    self._remove_device(uuid)
                    raise type(e)(e.template + "; the device was removed again", **e.data) from None
        return uuid

    def _explain_create_error(self, error: KernelError) -> VgpuError:
        """The kernel's refusal to create, in words that say what to do (the same data)."""
        data = error.data
        if error.errno == errno.EEXIST:
            holder = active_device(self.root, data["uuid"])
            where = f" on {holder.parent}" if holder else ""
            return Conflict("UUID {uuid} is already in use{where}; choose another UUID", **data, holder=holder,
                            where=where)
        if error.errno in (errno.ENOSPC, errno.EUSERS, errno.ENOMEM):
            return self.capacity_error(**data)
        if error.errno == errno.EINVAL:
            return InvalidInput("the kernel rejected UUID {uuid!r} (EINVAL)", **data)
        if error.errno in (errno.EACCES, errno.EPERM):
            return KernelError("permission denied writing {parent}/{type_id}/create: run as root", **data)
        return error

    def capacity_error(self, parent: str, type_id: str, **data: object) -> CapacityError:
        """No room for ``type_id`` on ``parent``: the pools that fall short, the types that still fit, what to do."""
        types = read_types(self.root, parent)
        fits = [f"{t.type_id} ({t.available_instances})" for t in types if t.available_instances > 0]
        capacity = backend_for_parent(types).capacity(self.root, parent, types)
        wanted = next((t for t in types if t.type_id == type_id), None)
        short = capacity.shortfalls(wanted) if capacity and wanted else {}
        more = capacity.advice() if capacity else ""
        return CapacityError(
            "no room for {type_id} on {parent}{reasons}; {still}; remove a vGPU{more} to make room",
            **{**data, "what": "device", "parent": parent, "type_id": type_id}, pool=next(iter(short), None),
            shortfalls=list(short.values()), fits=fits, advice=more,
            reasons=" (" + "; ".join(short.values()) + ")" if short else "",
            still=f"types that still fit: {', '.join(fits)}" if fits else "no type fits any more",
            more=f" or {more}" if more else "")

    def remove(self, uuid: str) -> None:
        uuid = canonical_uuid(uuid)
        device = active_device(self.root, uuid)
        if device is None:
            raise NotFound("no active vGPU {uuid}; 'vgpuctl list' shows the active ones", what="device", uuid=uuid)
        self.require_owned_device(device)
        with self.state.lock(f"parent-{device.parent}"), self.journal.releasing("device", uuid):
            crashpoint("remove:before-write")
            self._remove_device(uuid)

    def _remove_device(self, uuid: str) -> None:
        try:
            remove_device(self.root, uuid)
        except KernelError as e:
            if e.errno == errno.ENOENT:
                return  # already gone: the goal is reached
            if e.errno == errno.EBUSY:
                raise Conflict("vGPU {uuid} is in use by a VM; shut the VM down first", **e.data) from None
            raise

    # ------------------------------------------------------------------ persistent definitions
    def define(self, uuid: str | None, parent: str | None, type_id: str | None, auto: bool = False,
               attrs: list[tuple[str, str]] | None = None) -> Definition:
        """mdevctl define: new definition, or promote an active device when only -u is given."""
        uuid = canonical_uuid(uuid) if uuid else new_uuid()
        active = active_device(self.root, uuid)
        if active and parent in (None, active.parent) and type_id in (None, active.type_id):
            parent, type_id = active.parent, active.type_id
        if parent is None:
            raise InvalidInput("no parent given: use -p PARENT (see 'vgpuctl gpus')", what="parent", uuid=uuid)
        if type_id is None:
            raise InvalidInput("no type given: use -t TYPE (see 'vgpuctl types')", what="type", uuid=uuid,
                               parent=parent)
        self.check_type(parent, type_id)
        for name, _ in attrs or []:
            relative_path(name, "attribute")
        self.ownership()
        with self.state.lock(f"parent-{parent}"):
            if self.root.exists(definitions.definition_path(self.root, parent, uuid)):
                raise Conflict("vGPU {uuid} on {parent} is already defined; use 'vgpuctl modify'",
                               what="definition", uuid=uuid, parent=parent, type_id=type_id)
            definition = Definition(uuid, parent, type_id, "auto" if auto else "manual", list(attrs or []))
            with self.journal.claiming("definition", definition_key(parent, uuid), {"parent": parent, "uuid": uuid,
                                                                                 "type": type_id}):
                crashpoint("define:before-write")
                definitions.write(self.root, definition)
                crashpoint("define:after-write")
        return definition

    def one_definition(self, uuid: str, parent: str | None) -> Definition:
        found = definitions.find(self.root, uuid, parent)
        if not found:
            raise NotFound("vGPU {uuid}{where} is not defined; 'vgpuctl list -d' shows definitions",
                           what="definition", uuid=uuid, parent=parent, where=f" on {parent}" if parent else "")
        if len(found) > 1:
            raise Conflict("{uuid} is defined on several parents ({listed}); say which with -p", what="definition",
                           uuid=uuid, choices=[d.parent for d in found], listed=", ".join(d.parent for d in found))
        return found[0]

    def undefine(self, uuid: str, parent: str | None = None) -> list[Definition]:
        uuid = canonical_uuid(uuid)
        found = definitions.find(self.root, uuid, parent)
        if not found:
            raise NotFound("no definition of {uuid}; 'vgpuctl list -d' shows definitions", what="definition",
                           uuid=uuid, parent=parent)
        for definition in found:
            self.require_owned_definition(definition)
        for definition in found:
            key = definition_key(definition.parent, uuid)
            with self.state.lock(f"parent-{definition.parent}"), self.journal.releasing("definition", key):
                crashpoint("undefine:before-delete")
                definitions.delete(self.root, definition)
        return found

    def modify(self, uuid: str, parent: str | None = None, type_id: str | None = None,
               start: str | None = None, add_attr: tuple[str, str] | None = None,
               del_attr: bool = False, index: int | None = None) -> Definition:
        uuid = canonical_uuid(uuid)
        definition = self.one_definition(uuid, parent)
        self.require_owned_definition(definition)
        if add_attr is not None:
            relative_path(add_attr[0], "attribute")
        with self.state.lock(f"parent-{definition.parent}"):
            if type_id is not None:
                definition.mdev_type = type_id
            if start is not None:
                definition.start = start
            if add_attr is not None:
                position = len(definition.attrs) if index is None else index
                if not 0 <= position <= len(definition.attrs):
                    raise InvalidInput("attribute index {index} is invalid: use 0..{last}", what="index",
                                       uuid=uuid, index=position, last=len(definition.attrs))
                definition.attrs.insert(position, add_attr)
            if del_attr:
                if not definition.attrs:
                    raise InvalidInput("{uuid} has no attributes to delete", what="attribute", uuid=uuid)
                position = len(definition.attrs) - 1 if index is None else index
                if not 0 <= position < len(definition.attrs):
                    raise InvalidInput("attribute index {index} is invalid: use 0..{last}", what="index",
                                       uuid=uuid, index=position, last=len(definition.attrs) - 1)
                del definition.attrs[position]
            crashpoint("modify:before-write")
            definitions.write(self.root, definition)
        return definition

    def start(self, uuid: str | None = None, parent: str | None = None, type_id: str | None = None) -> str:
        """Start a definition (``-u`` matching one), else a transient device (needs parent and type)."""
        if uuid:
            uuid = canonical_uuid(uuid)
            found = definitions.find(self.root, uuid, parent)
            if len(found) > 1:
                raise Conflict("{uuid} is defined on several parents; say which with -p", what="definition",
                               uuid=uuid, choices=[d.parent for d in found])
            if found:
                definition = found[0]
                if type_id is not None and type_id != definition.mdev_type:
                    raise Conflict("vGPU {uuid} is defined on {parent} with type {holder.mdev_type}, not {type_id}",
                                   what="definition", uuid=uuid, parent=definition.parent, type_id=type_id,
                                   holder=definition)
                return self.create(definition.parent, definition.mdev_type, uuid, definition.attrs)
        if parent is None or type_id is None:
            needed = "a defined vGPU's -u" if uuid is None else f"-p and -t ({uuid} is not defined)"
            raise InvalidInput("not enough to start a vGPU: give {needed}", what="device", uuid=uuid, parent=parent,
                               type_id=type_id, needed=needed)
        return self.create(parent, type_id, uuid)

    def stop(self, uuid: str) -> None:
        self.remove(uuid)

    # ------------------------------------------------------------------ autostart
    def autostart(self, parent: str | None = None) -> list[AutostartResult]:
        """Start every ``auto`` definition (of one parent); idempotent, continuing past failures."""
        results = []
        active = {d.uuid: d for d in active_devices(self.root)}
        found, problems = definitions.scan(self.root)
        # A file that cannot be read is reported, and every other definition still starts (this runs at boot).
        results += [AutostartResult("-", p.owner, "-", "failed", f"{p.path}: {p.error}") for p in problems
                    if parent is None or p.owner == parent]
        for definition in found:
            if definition.start != "auto" or (parent is not None and definition.parent != parent):
                continue
            result = AutostartResult(definition.uuid, definition.parent, definition.mdev_type, "started")
            running: ActiveDevice | None = active.get(definition.uuid)
            if running and running.parent == definition.parent and running.type_id == definition.mdev_type:
                result.status = "already active"
            elif running:
                result.status, result.message = "failed", (
                    f"UUID in use on {running.parent} as {running.type_id}")
            else:
                try:
                    self.create(definition.parent, definition.mdev_type, definition.uuid, definition.attrs)
                except VgpuError as e:
                    result.status, result.message = "failed", str(e)
                self._parents = None
            results.append(result)
        return results
