"""What the host's vGPUs look like, as plain JSON-ready rows: the one place both the CLI
(``gpus``, ``types``, ``list`` with ``--json``) and the HTTP service (``/api/v1/gpus`` ...) get them from.
"""

from __future__ import annotations

from collections.abc import Collection
from typing import Any, Literal, NotRequired, cast

# typing_extensions: pydantic (the API's response models) needs its TypedDict before Python 3.12.
from typing_extensions import TypedDict

from vgpuctl.base.errors import NotFound
from vgpuctl.base.problems import UnreadableFile
from vgpuctl.base.state import StateDir
from vgpuctl.host import HostRoot
from vgpuctl.mdev import definitions
from vgpuctl.mdev.state import Journal
from vgpuctl.mdev.sysfs import MdevType, active_devices, aperture_mib, parent_names, read_parents, read_types

StartMode = Literal["auto", "manual"]


class PoolRow(TypedDict):
    total: int
    used: int
    free: int
    unit: str


class SriovTypeRow(TypedDict):
    type: str  # as a VM's vgpu.type names it (NVIDIA: its numeric id)
    name: str | None
    memory_mib: int | None
    free_vfs: int  # free VFs that could take one now (siblings share the card: fewer may fit at once)


class SriovRow(TypedDict):
    """What an SR-IOV PF's row adds: its VFs and what they were given or can take."""

    backend: str  # the vGPU backend's name: "sriov-intel", "nvidia-vfio"
    driver: str | None  # the PF's
    total_vfs: int
    enabled_vfs: int | None  # None: sriov_numvfs did not answer in time (a disable waits for a VM)
    vfio_driver: str  # what its VFs must be bound to for a VM to open one
    vfio_bound: int
    free: int  # bound to it, and no VM holds or has opened it
    held: list[str]  # VFs a VM holds or has open
    problem: str | None  # why it cannot give VFs now
    quotas: list[dict[str, Any]] | None  # Intel: each enabled VF's provisioning (MiB, counts; None unreadable)
    types: list[SriovTypeRow] | None  # NVIDIA: every type its VFs can take now


class GpuRow(TypedDict):
    parent: str
    vendor: str
    vendor_id: str | None
    device_id: str | None
    platform: str | None
    aperture_mib: int | None
    pools: dict[str, PoolRow] | None  # GVT-g pools by name ("low GM (aperture)", ...); None for other vendors
    types: int
    active_vgpus: list[str]
    sriov: NotRequired[SriovRow]  # only on an SR-IOV PF's row (then active_vgpus are the VFs held)


class TypeRow(TypedDict):
    parent: str
    type: str
    name: str | None
    available_instances: int
    device_api: str
    description: str | None
    fields: dict[str, str | int]
    memory_mib: int | None
    resolution: str | None


class VgpuRow(TypedDict):
    uuid: str
    parent: str
    type: str
    active: bool
    defined: bool
    start: StartMode | None  # a definition's; None for a device that is not defined
    attrs: list[dict[str, str]]  # mdevctl's form: one {name: value} per attribute, in order
    owner: Literal["vgpuctl", "other"]


def check_parent(root: HostRoot, parent: str, names: list[str] | None = None) -> None:
    """NotFound (with the close match or the parents there are) unless ``parent`` is an mdev parent."""
    names = parent_names(root) if names is None else names
    if parent in names:
        return
    hint = next((n for n in names if n.lower() == parent.lower()), None)
    if hint:
        raise NotFound("no parent device {parent!r}; did you mean {hint!r}?", what="parent", parent=parent,
                       choices=names, hint=hint)
    listed = ", ".join(names) if names else "none (is the vendor driver, e.g. kvmgt, loaded? try 'vgpuctl doctor')"
    raise NotFound("no parent device {parent!r}; mdev parents on this host: {listed}", what="parent", parent=parent,
                   choices=names, hint=None, listed=listed)


def check_type(root: HostRoot, parent: str, type_id: str, names: list[str] | None = None) -> MdevType:
    """The type ``type_id`` of ``parent``; NotFound (the parent's types as ``choices``) when it has none such."""
    check_parent(root, parent, names)
    types = read_types(root, parent)
    found = next((t for t in types if t.type_id == type_id), None)
    if found is None:
        listed = [t.type_id for t in types]
        raise NotFound("{parent} has no type {type_id!r}; its types: {listed}", what="type", parent=parent,
                       type_id=type_id, choices=listed, listed=", ".join(listed) or "none")
    return found


def gpus_rows(root: HostRoot, held: Collection[str] = ()) -> list[GpuRow]:
    """Each mdev-capable GPU: address, vendor, platform, aperture, GVT-g pools, active vGPUs; then each SR-IOV
    PF (:func:`sriov_gpu_rows`; ``held``: the VFs VMs run on)."""
    from vgpuctl.backends import backend_for_parent  # GVT-g's platform tables are not needed by `list`
    from vgpuctl.backends.gvt_capacity import GvtCapacity

    active = active_devices(root)
    rows: list[GpuRow] = []
    for parent in read_parents(root):
        backend = backend_for_parent(parent.types)
        found = backend.capacity(root, parent.name, parent.types)
        capacity = found if isinstance(found, GvtCapacity) else None  # the pools are GVT-g's (the row's shape)
        rows.append({
            "parent": parent.name,
            "vendor": parent.vendor,
            "vendor_id": f"0x{parent.vendor_id:04x}" if parent.vendor_id is not None else None,
            "device_id": f"0x{parent.device_id:04x}" if parent.device_id is not None else None,
            "platform": backend.platform(parent.vendor_id, parent.device_id),
            "aperture_mib": aperture_mib(root, parent.name) if capacity else None,
            "pools": {p.name: {"total": p.total, "used": p.used, "free": p.free, "unit": p.unit}
                      for p in capacity.pools} if capacity else None,
            "types": len(parent.types),
            "active_vgpus": [d.uuid for d in active if d.parent == parent.name],
        })
    return rows + sriov_gpu_rows(root, held)


def sriov_gpu_rows(root: HostRoot, held: Collection[str] = ()) -> list[GpuRow]:
    """Each SR-IOV PF a backend knows (Intel's, NVIDIA's vendor-VFIO ones): its VFs enabled, bound to their VFIO
    driver, free and held; Intel's VF quotas, NVIDIA's types and how many free VFs could take each."""
    from vgpuctl.backends import INTEL_VENDOR_ID, NVIDIA_VENDOR_ID, sriov_intel, sriov_nvidia
    from vgpuctl.backends.sriov_intel_quota import free_vfs, offers, vf_quotas
    from vgpuctl.host import pci
    from vgpuctl.host.pci import vendor_name

    rows: list[GpuRow] = []
    for intel in sriov_intel.intel_pfs(root):
        openers = pci.vf_openers(root, intel.pf.vfs)
        free = free_vfs(root, intel, held, openers)
        count = 1 if offers(intel) else 0  # its one type row (sriov_intel_quota.offered_types)
        rows.append(_sriov_row(intel.pf, INTEL_VENDOR_ID, vendor_name(INTEL_VENDOR_ID), count, {
            "backend": sriov_intel.BACKEND.name, "driver": intel.driver, "total_vfs": intel.pf.total_vfs,
            "enabled_vfs": intel.pf.num_vfs, "vfio_driver": intel.vfio_driver,
            "vfio_bound": sum(1 for vf in intel.pf.vfs if vf.driver == intel.vfio_driver), "free": len(free),
            "held": sorted({vf.address for vf in intel.pf.vfs if vf.address in held or vf.address in openers}),
            "problem": intel.problem, "quotas": [q.to_json() for q in vf_quotas(root, intel)], "types": None}))
    for nvidia in sriov_nvidia.nvidia_views(root):
        openers = pci.vf_openers(root, nvidia.pf.vfs)
        taken = set(held) | set(openers)
        names = nvidia.type_names()
        types: list[SriovTypeRow] = [
            {"type": str(type_id), "name": names[type_id], "memory_mib": sriov_nvidia.framebuffer_mib(names[type_id]),
             "free_vfs": takers} for type_id, takers in nvidia.takers(taken).items()]
        rows.append(_sriov_row(nvidia.pf, NVIDIA_VENDOR_ID, vendor_name(NVIDIA_VENDOR_ID), len(types), {
            "backend": sriov_nvidia.BACKEND.name, "driver": nvidia.pf.function.driver,
            "total_vfs": nvidia.pf.total_vfs, "enabled_vfs": nvidia.pf.num_vfs, "vfio_driver": "nvidia",
            "vfio_bound": sum(1 for vf in nvidia.vfs if vf.driver == "nvidia"), "free": len(nvidia.free(taken)),
            "held": sorted(vf.address for vf in nvidia.vfs if vf.address in taken),
            "problem": nvidia.problem, "quotas": None, "types": types}))
    return rows


def _sriov_row(pf: Any, vendor_id: int, vendor: str, types: int, sriov: SriovRow) -> GpuRow:
    device = pf.function.device
    return {"parent": pf.address, "vendor": vendor, "vendor_id": f"0x{vendor_id:04x}",
            "device_id": f"0x{device:04x}" if device is not None else None, "platform": None, "aperture_mib": None,
            "pools": None, "types": types, "active_vgpus": sriov["held"], "sriov": sriov}


def read_all_types(root: HostRoot, parent: str | None = None, held: Collection[str] = ()) -> list[MdevType]:
    """Every type of every parent (or of ``parent``, which must exist): the mdev parents' from sysfs, then what
    the SR-IOV PFs' VFs offer (:func:`vgpuctl.backends.offered_types`; ``held``: the VFs VMs run on)."""
    from vgpuctl.backends import offered_types

    names = parent_names(root)
    offered = offered_types(root, held)
    if parent and parent not in names:
        if parent in {t.parent for t in offered}:
            return [t for t in offered if t.parent == parent]
        check_parent(root, parent, names)
    mdev = [t for p in ([parent] if parent else names) for t in read_types(root, p)]
    return mdev + ([] if parent else offered)


def type_row(t: MdevType) -> TypeRow:
    return {"parent": t.parent, "type": t.type_id, "name": t.name, "available_instances": t.available_instances,
            "device_api": t.device_api, "description": t.description, "fields": t.fields,
            "memory_mib": t.memory_mib, "resolution": "x".join(map(str, t.resolution)) if t.resolution else None}


def types_rows(root: HostRoot, parent: str | None = None, held: Collection[str] = ()) -> list[TypeRow]:
    """Every vGPU type with its available instances and its description as fields (SR-IOV VFs' too)."""
    return [type_row(t) for t in read_all_types(root, parent, held)]


def object_exists(root: HostRoot, kind: str, key: str) -> bool:
    """Whether a device (key: UUID), a definition (key: PARENT/UUID) or VFs (key: PF) of vgpuctl's records are on
    the host."""
    if kind == "device":
        return root.exists(root.mdev_device_dir(key))
    if kind == "vfs":  # a PF's VFs (key: the PF's address): on while its first VF is there
        return root.exists(f"{root.pci_device(key)}/virtfn0")
    parent, _, uuid = key.partition("/")
    return root.exists(definitions.definition_path(root, parent, uuid))


def vgpu_rows(root: HostRoot, state: StateDir, *, defined_only: bool = False, active_only: bool = False,
              parent: str | None = None, uuid: str | None = None) -> list[VgpuRow]:
    """Active and defined vGPUs (one row where a definition is active), with start mode and owner,
    sorted by parent then UUID."""
    return vgpu_listing(root, state, defined_only=defined_only, active_only=active_only, parent=parent,
                        uuid=uuid)[0]


def vgpu_listing(root: HostRoot, state: StateDir, *, defined_only: bool = False, active_only: bool = False,
                 parent: str | None = None, uuid: str | None = None) -> tuple[list[VgpuRow], list[UnreadableFile]]:
    """:func:`vgpu_rows` and the definition files that could not be read (each reported, none hiding the rest)."""
    problems: list[UnreadableFile] = []
    owned = Journal(state).reconcile(lambda kind, key: object_exists(root, kind, key))
    rows: dict[tuple[str, str], VgpuRow] = {}
    if not defined_only:
        for d in active_devices(root):
            rows[(d.parent, d.uuid)] = {"uuid": d.uuid, "parent": d.parent, "type": d.type_id, "active": True,
                                        "defined": False, "start": None, "attrs": [], "owner": "other"}
    if not active_only:
        found, problems = definitions.scan(root)
        for definition in found:
            key = (definition.parent, definition.uuid)
            row = rows.get(key)
            if row is None:
                row = rows[key] = {"uuid": definition.uuid, "parent": definition.parent,
                                   "type": definition.mdev_type, "active": False, "defined": True, "start": None,
                                   "attrs": [], "owner": "other"}
            row["defined"], row["start"] = True, cast(StartMode, definition.start)  # parsed as auto|manual
            row["attrs"] = [{k: v} for k, v in definition.attrs]
        if defined_only:
            active = {d.uuid: d for d in active_devices(root)}
            for row in rows.values():
                running = active.get(row["uuid"])
                row["active"] = bool(running and running.parent == row["parent"])
    for (row_parent, row_uuid), row in rows.items():
        # A defined row is the definition's (starting someone else's definition does not make it ours);
        # an active-only row is its device's.
        ours = owned.owns_definition(row_parent, row_uuid) or (
            not row["defined"] and owned.owns_device(row_uuid, row_parent, row["type"]))
        row["owner"] = "vgpuctl" if ours else "other"
    return [r for _, r in sorted(rows.items())
            if (parent is None or r["parent"] == parent) and (uuid is None or r["uuid"] == uuid)], \
        [p for p in problems if parent is None or p.owner == parent]
