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
from vgpuctl.mdev.report import check_parent, object_exists
from vgpuctl.mdev.state import Journal, Kind, Ownership, definition_key
from vgpuctl.mdev.sysfs import ActiveDevice, active_device, active_devices, parent_names, read_types


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
        self.check_parent(parent)
        types = [t.type_id for t in read_types(self.root, parent)]
        if type_id not in types:
            raise NotFound(f"{parent} has no type {type_id!r}; its types: {', '.join(types) or 'none'}")

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
        raise NotOwned(f"vGPU {device.uuid} was not created by vgpuctl (mdevctl, libvirt or another tool "
                       "made it); leave it alone, or add --force if you are sure")

    def require_owned_definition(self, definition: Definition) -> None:
        if self.force or self.ownership().owns_definition(definition.parent, definition.uuid):
            return
        raise NotOwned(f"the definition of {definition.uuid} on {definition.parent} was not created by vgpuctl "
                       "(mdevctl, libvirt or another tool made it; starting or stopping it does not make it "
                       "vgpuctl's); leave it alone, or add --force if you are sure")

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
            existing = active_device(self.root, uuid)
            if existing:
                raise Conflict(f"vGPU {uuid} is already active on {existing.parent} (type {existing.type_id}); "
                               "choose another UUID or remove it first")
            create_path = f"{self.root.mdev_type_dir(parent, type_id)}/create"
            with self.journal.claiming("device", uuid, {"parent": parent, "type": type_id}):
                crashpoint("create:before-write")
                try:
                    self.root.write_text(create_path, uuid)
                except OSError as e:
                    raise self._explain_create_error(e, parent, type_id, uuid) from None
                crashpoint("create:after-write")
                try:
                    self._write_attrs(uuid, attrs or [])
                except VgpuError:
                    self._remove_device(uuid)
                    raise
        return uuid

    def _write_attrs(self, uuid: str, attrs: list[tuple[str, str]]) -> None:
        device_dir = self.root.mdev_device_dir(uuid)
        for name, value in attrs:
            # Only attributes the device has: the kernel's files, never a new file beside them.
            if not self.root.path(f"{device_dir}/{relative_path(name, 'attribute')}").is_file():
                known = [n for n in self.root.listdir(device_dir) if self.root.path(f"{device_dir}/{n}").is_file()]
                raise InvalidInput(f"{uuid} has no attribute {name!r} (it has: {', '.join(known) or 'none'}); "
                                   "the device was removed again")
            try:
                self.root.write_text(f"{device_dir}/{name}", value)
            except OSError as e:
                raise KernelError(f"failed to write {value!r} to attribute {name!r} of {uuid} "
                                  f"({e.strerror}); the device was removed again", e.errno) from None

    def _explain_create_error(self, error: OSError, parent: str, type_id: str, uuid: str) -> VgpuError:
        if error.errno == errno.EEXIST:
            holder = active_device(self.root, uuid)
            where = f" on {holder.parent}" if holder else ""
            return Conflict(f"UUID {uuid} is already in use{where}; choose another UUID")
        if error.errno in (errno.ENOSPC, errno.EUSERS, errno.ENOMEM):
            return CapacityError(self.capacity_message(parent, type_id))
        if error.errno == errno.EINVAL:
            return InvalidInput(f"the kernel rejected UUID {uuid!r} (EINVAL)")
        if error.errno in (errno.EACCES, errno.EPERM):
            return KernelError(f"permission denied writing {parent}/{type_id}/create: run as root", error.errno)
        return KernelError(f"creating {type_id} on {parent} failed: {error.strerror}", error.errno)

    def capacity_message(self, parent: str, type_id: str) -> str:
        types = read_types(self.root, parent)
        fits = [f"{t.type_id} ({t.available_instances})" for t in types if t.available_instances > 0]
        reasons = ""
        capacity = backend_for_parent(types).capacity(self.root, parent, types)
        wanted = next((t for t in types if t.type_id == type_id), None)
        if capacity and wanted:
            short = capacity.shortfalls(wanted)
            reasons = " (" + "; ".join(short) + ")" if short else ""
        still = f"types that still fit: {', '.join(fits)}" if fits else "no type fits any more"
        more = capacity.advice() if capacity else ""
        advice = "; remove a vGPU" + (f" or {more}" if more else "")
        return f"no room for {type_id} on {parent}{reasons}; {still}{advice} to make room"

    def remove(self, uuid: str) -> None:
        uuid = canonical_uuid(uuid)
        device = active_device(self.root, uuid)
        if device is None:
            raise NotFound(f"no active vGPU {uuid}; 'vgpuctl list' shows the active ones")
        self.require_owned_device(device)
        with self.state.lock(f"parent-{device.parent}"), self.journal.releasing("device", uuid):
            crashpoint("remove:before-write")
            self._remove_device(uuid)

    def _remove_device(self, uuid: str) -> None:
        try:
            self.root.write_text(f"{self.root.mdev_device_dir(uuid)}/remove", "1")
        except FileNotFoundError:
            return  # already gone: the goal is reached
        except OSError as e:
            if e.errno == errno.EBUSY:
                raise Conflict(f"vGPU {uuid} is in use by a VM; shut the VM down first") from None
            raise KernelError(f"removing {uuid} failed: {e.strerror}", e.errno) from None

    # ------------------------------------------------------------------ persistent definitions
    def define(self, uuid: str | None, parent: str | None, type_id: str | None, auto: bool = False,
               attrs: list[tuple[str, str]] | None = None) -> Definition:
        """mdevctl define: new definition, or promote an active device when only -u is given."""
        uuid = canonical_uuid(uuid) if uuid else new_uuid()
        active = active_device(self.root, uuid)
        if active and parent in (None, active.parent) and type_id in (None, active.type_id):
            parent, type_id = active.parent, active.type_id
        if parent is None:
            raise InvalidInput("no parent given: use -p PARENT (see 'vgpuctl gpus')")
        if type_id is None:
            raise InvalidInput("no type given: use -t TYPE (see 'vgpuctl types')")
        self.check_type(parent, type_id)
        for name, _ in attrs or []:
            relative_path(name, "attribute")
        self.ownership()
        with self.state.lock(f"parent-{parent}"):
            if self.root.exists(definitions.definition_path(self.root, parent, uuid)):
                raise Conflict(f"vGPU {uuid} on {parent} is already defined; use 'vgpuctl modify'")
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
            where = f" on {parent}" if parent else ""
            raise NotFound(f"vGPU {uuid}{where} is not defined; 'vgpuctl list -d' shows definitions")
        if len(found) > 1:
            raise Conflict(f"{uuid} is defined on several parents ({', '.join(d.parent for d in found)}); "
                           "say which with -p")
        return found[0]

    def undefine(self, uuid: str, parent: str | None = None) -> list[Definition]:
        uuid = canonical_uuid(uuid)
        found = definitions.find(self.root, uuid, parent)
        if not found:
            raise NotFound(f"no definition of {uuid}; 'vgpuctl list -d' shows definitions")
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
                    raise InvalidInput(f"attribute index {position} is invalid: use 0..{len(definition.attrs)}")
                definition.attrs.insert(position, add_attr)
            if del_attr:
                if not definition.attrs:
                    raise InvalidInput(f"{uuid} has no attributes to delete")
                position = len(definition.attrs) - 1 if index is None else index
                if not 0 <= position < len(definition.attrs):
                    raise InvalidInput(f"attribute index {position} is invalid: use 0..{len(definition.attrs) - 1}")
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
                raise Conflict(f"{uuid} is defined on several parents; say which with -p")
            if found:
                definition = found[0]
                if type_id is not None and type_id != definition.mdev_type:
                    raise Conflict(f"vGPU {uuid} is defined on {definition.parent} with type "
                                   f"{definition.mdev_type}, not {type_id}")
                return self.create(definition.parent, definition.mdev_type, uuid, definition.attrs)
        if parent is None or type_id is None:
            what = "a defined vGPU's -u" if uuid is None else f"-p and -t ({uuid} is not defined)"
            raise InvalidInput(f"not enough to start a vGPU: give {what}")
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
        results += [AutostartResult("-", p.parent, "-", "failed", f"{p.path}: {p.error}") for p in problems
                    if parent is None or p.parent == parent]
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
