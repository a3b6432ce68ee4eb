"""The mdev state of a host as its sysfs shows it: parents, types, active devices.

Read through a :class:`~vgpuctl.host.HostRoot`, the same on a real host and on a simulated one.
"""

from __future__ import annotations

import os
import re
from typing import NamedTuple

from vgpuctl.base.errors import Conflict, InvalidInput, KernelError
from vgpuctl.host import HostRoot
from vgpuctl.host.root import relative_path


class MdevType(NamedTuple):
    """A vGPU type of a parent, read from mdev_supported_types/<type>/."""

    parent: str
    type_id: str
    available_instances: int
    device_api: str
    name: str | None = None
    description: str | None = None

    @property
    def fields(self) -> dict[str, str | int]:
        return parse_description(self.description or "")

    @property
    def resolution(self) -> tuple[int, int] | None:
        text = self.fields.get("resolution") or self.fields.get("max_resolution")
        match = re.fullmatch(r"(\d+)x(\d+)", str(text)) if text else None
        return (int(match[1]), int(match[2])) if match else None

    @property
    def memory_mib(self) -> int | None:
        """Graphics memory of one instance: GVT low+high GM, NVIDIA framebuffer, sample video memory, the memory a
        backend's VF type says it gives (``memory_mib``)."""
        f = self.fields
        if "low_gm_mib" in f and "high_gm_mib" in f:
            return int(f["low_gm_mib"]) + int(f["high_gm_mib"])
        for key in ("framebuffer_mib", "video_memory_mib", "memory_mib"):
            if key in f:
                return int(f[key])
        return None


class ActiveDevice(NamedTuple):
    """A vGPU that exists now (under /sys/bus/mdev/devices)."""

    uuid: str
    parent: str
    type_id: str


class ParentDevice(NamedTuple):
    """A device that can be split into vGPUs (it has mdev_supported_types), with its types."""

    name: str
    vendor_id: int | None
    device_id: int | None
    types: list[MdevType]

    @property
    def vendor(self) -> str:
        from vgpuctl.host.pci import vendor_name  # the listings that show vendors only

        return vendor_name(self.vendor_id)


_MIB_KEYS = {"low_gm_size": "low_gm_mib", "high_gm_size": "high_gm_mib", "framebuffer": "framebuffer_mib"}


def parse_description(text: str) -> dict[str, str | int]:
    """A type's description as fields: GVT "key: value" lines, NVIDIA "k=v, ..." and the samples' prose."""
    fields: dict[str, str | int] = {}
    parts = [p.strip() for p in re.split(r"[\n,]", text) if p.strip()]
    for part in parts:
        key, sep, value = part.partition(":") if ":" in part else part.partition("=")
        if not sep:
            video = re.fullmatch(r"(\d+) MB video memory", part)
            frame = re.fullmatch(r"(\d+x\d+) framebuffer", part)
            if video:
                fields["video_memory_mib"] = int(video[1])
            elif frame:
                fields["resolution"] = frame[1]
            continue
        key, value = key.strip(), value.strip()
        if key in _MIB_KEYS:
            fields[_MIB_KEYS[key]] = int(re.sub(r"\D", "", value) or 0)
        elif value.isdigit():
            fields[key] = int(value)
        else:
            fields[key] = value
    if "fence" in fields:
        fields["fences"] = fields.pop("fence")
    if "num_heads" in fields:
        fields["heads"] = fields.pop("num_heads")
    return fields


def parent_names(root: HostRoot) -> list[str]:
    if not root.exists(root.sys_class_mdev_bus):
        return []
    return root.listdir(root.sys_class_mdev_bus)


def _read_optional(root: HostRoot, path: str) -> str | None:
    try:
        return root.read_text(path)
    except (FileNotFoundError, PermissionError, NotADirectoryError):
        return None


def read_type(root: HostRoot, parent: str, type_id: str) -> MdevType:
    base = root.mdev_type_dir(parent, type_id)
    name = _read_optional(root, f"{base}/name")
    description = _read_optional(root, f"{base}/description")
    return MdevType(
        parent=parent,
        type_id=type_id,
        available_instances=int(root.read_value(f"{base}/available_instances")),
        device_api=root.read_value(f"{base}/device_api"),
        name=name.rstrip("\n") if name else None,
        description=description.rstrip("\n") if description else None,
    )


def read_types(root: HostRoot, parent: str) -> list[MdevType]:
    base = root.mdev_types_dir(parent)
    if not root.exists(base):
        return []
    return [read_type(root, parent, t) for t in root.listdir(base)]


def read_parent(root: HostRoot, parent: str) -> ParentDevice:
    device = f"{root.sys_class_mdev_bus}/{parent}"
    vendor = _read_optional(root, f"{device}/vendor")
    device_id = _read_optional(root, f"{device}/device")
    return ParentDevice(
        name=parent,
        vendor_id=int(vendor, 16) if vendor else None,
        device_id=int(device_id, 16) if device_id else None,
        types=read_types(root, parent),
    )


def read_parents(root: HostRoot) -> list[ParentDevice]:
    return [read_parent(root, p) for p in parent_names(root)]


def active_devices(root: HostRoot) -> list[ActiveDevice]:
    """Every mdev on the mdev bus. Its parent is the directory its bus link points into (the kernel
    makes each mdev a child of its parent device), read from the link alone: one readlink, not a
    walk of every component as realpath() would do."""
    base = root.sys_bus_mdev_devices
    try:
        uuids = sorted(os.listdir(root.path(base)))
    except FileNotFoundError:
        return []
    found = []
    for uuid in uuids:
        link = f"{root.path(base)}/{uuid}"
        try:
            target = os.readlink(link)
            type_id = os.path.basename(os.readlink(f"{link}/mdev_type"))
        except OSError:
            continue  # removed while we looked
        found.append(ActiveDevice(uuid=uuid, parent=os.path.basename(os.path.dirname(target)), type_id=type_id))
    return found


def active_device(root: HostRoot, uuid: str) -> ActiveDevice | None:
    return next((d for d in active_devices(root) if d.uuid == uuid), None)


# ---------------------------------------------------------------- changing devices (callers hold the parent's lock)
# vgpuctl's Manager (which records what it owns) and the mdevctl stand-in (which owns nothing) both use these.


def check_free(root: HostRoot, uuid: str, parent: str, type_id: str) -> None:
    """Conflict (``holder``: the ActiveDevice) when a device of ``uuid`` is active already."""
    holder = active_device(root, uuid)
    if holder is not None:
        raise Conflict("vGPU {uuid} is already active on {holder.parent} (type {holder.type_id}); choose another "
                       "UUID or remove it first", what="device", uuid=uuid, parent=parent, type_id=type_id,
                       holder=holder)


def create_device(root: HostRoot, parent: str, type_id: str, uuid: str) -> None:
    """Write ``uuid`` to the type's ``create``: the kernel makes the device, or refuses (KernelError, its errno)."""
    path = f"{root.mdev_type_dir(parent, type_id)}/create"
    try:
        root.write_text(path, uuid)
    except OSError as e:
        raise KernelError("creating {type_id} on {parent} failed: {strerror}", what="device", action="create",
                          errno=e.errno, path=path, parent=parent, type_id=type_id, uuid=uuid) from None


def write_attribute(root: HostRoot, uuid: str, name: str, value: str) -> None:
    """Write one of the device's attributes (a path below it, never a new file: InvalidInput if it has none)."""
    device_dir = root.mdev_device_dir(uuid)
    path = f"{device_dir}/{relative_path(name, 'attribute')}"
    if not root.path(path).exists():
        known = [n for n in root.listdir(device_dir) if root.path(f"{device_dir}/{n}").is_file()]
        raise InvalidInput("{uuid} has no attribute {attribute!r} (it has: {known})", what="attribute", uuid=uuid,
                           attribute=name, choices=known, known=", ".join(known) or "none")
    try:
        root.write_text(path, value)
    except OSError as e:
        raise KernelError("failed to write {value!r} to attribute {attribute!r} of {uuid} ({strerror})",
                          what="attribute", action="write", errno=e.errno, path=path, uuid=uuid, attribute=name,
                          value=value) from None


def remove_device(root: HostRoot, uuid: str) -> None:
    """Write ``remove`` of the device (KernelError with ENOENT when it is gone, EBUSY when a VM holds it)."""
    path = f"{root.mdev_device_dir(uuid)}/remove"
    try:
        root.write_text(path, "1")
    except OSError as e:
        raise KernelError("removing {uuid} failed: {strerror}", what="device", action="remove", errno=e.errno,
                          path=path, uuid=uuid) from None


def aperture_mib(root: HostRoot, parent: str) -> int | None:
    """BIOS aperture = size of BAR2 (GMADR) of the parent's PCI device."""
    text = _read_optional(root, f"{root.sys_class_mdev_bus}/{parent}/resource")
    from vgpuctl.host.facts import parse_bar_size_mib

    return parse_bar_size_mib(text, 2) if text else None
