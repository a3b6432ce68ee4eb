"""The REST API under ``/api/v1``: thin routes over the same library calls the CLI makes.

Every route is a plain (sync) function: FastAPI runs it in its threadpool, so the blocking sysfs
reads, file locks, QMP calls and QEMU starts never stall the event loop. Listings answer exactly what
the CLI's ``--json`` prints (:mod:`vgpuctl.mdev.report`, :mod:`vgpuctl.vm.inventory`); errors are
``{"error", "message"}`` with the statuses in :mod:`vgpuctl.service.errors`.
"""

from __future__ import annotations

import dataclasses
import pathlib
import tempfile
from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated, Any, Literal, cast, get_args, get_origin, get_type_hints

from fastapi import APIRouter, Depends, Path, Query, Request, Response
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, create_model, field_validator, model_validator

from vgpuctl.base.state import StateDir
from vgpuctl.host import HostRoot
from vgpuctl.mdev.report import GpuRow, TypeRow, VgpuRow
from vgpuctl.service.auth import require_auth
from vgpuctl.service.errors import ERROR_RESPONSES

# Names that become path components under /sys and /etc/mdevctl.d: no '/', no leading '.'.
PARENT_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9:._-]{0,63}$"
TYPE_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9:._+-]{0,63}$"
ATTR_PART_PATTERN = r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,63}"
RESOLUTION_PATTERN = r"^[1-9][0-9]{0,4}x[1-9][0-9]{0,4}$"
VM_NAME_PATTERN = r"^[a-z0-9][a-z0-9-]{0,62}$"
UUID_PATTERN = r"^[0-9a-fA-F]{8}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{12}$"

ParentName = Annotated[str, Field(pattern=PARENT_PATTERN, examples=["0000:00:02.0"])]
TypeName = Annotated[str, Field(pattern=TYPE_PATTERN, examples=["i915-GVTg_V5_4"])]
Uuid = Annotated[str, Field(pattern=UUID_PATTERN, examples=["2f6bb1f4-4b8a-4a77-9d5f-0d0e1c3e7a11"])]
UuidPath = Annotated[str, Path(pattern=UUID_PATTERN, description="a vGPU's UUID")]
VmName = Annotated[str, Path(pattern=VM_NAME_PATTERN, description="the VM's name")]


@dataclass(frozen=True)
class Context:
    root: HostRoot
    state: StateDir


def context(request: Request) -> Context:
    ctx: Context = request.app.state.ctx
    return ctx


Ctx = Annotated[Context, Depends(context)]
Force = Annotated[bool, Query(description="Also act on what vgpuctl did not create (as --force).")]

router = APIRouter(prefix="/api/v1", dependencies=[Depends(require_auth)], responses=ERROR_RESPONSES)


# ---------------------------------------------------------------------- response shapes (for the OpenAPI document)


class Row(BaseModel):
    model_config = ConfigDict(extra="allow")


class CreatedVgpu(Row):
    uuid: str | None = Field(None, description="absent for a dry run")
    parent: str
    type: str
    reason: str | None = Field(None, description="why the chooser took this type (requests only)")
    rejected: list[str] | None = Field(None, description="types the chooser ruled out, and why (dry run only)")


class DefinitionOut(Row):
    uuid: str
    parent: str
    type: str
    start: Literal["auto", "manual"]
    attrs: list[dict[str, str]]


class VmStatusOut(Row):
    name: str
    state: str = Field(description="running | paused | shutdown | stopped | crashed")
    pid: int | None = None
    qmp_status: str | None = None
    accel: str | None = None
    vgpu: str | None = None
    simulated_display: str | None = None
    console: dict[str, str] = {}
    detail: str = ""
    log_tail: list[str] = []
    uptime_s: float | None = Field(None, description="seconds since QEMU started")
    guest: dict[str, Any] | None = Field(None, description="what the QEMU guest agent says of the guest "
                                                           "(agent, os, kernel, ip_addresses), or why it cannot")


# ---------------------------------------------------------------------- request bodies


def _check_attrs(attrs: list[dict[str, str]]) -> list[dict[str, str]]:
    import re

    for attr in attrs:
        if len(attr) != 1:
            raise ValueError("each attribute is one {\"name\": \"value\"} object, in order")
        ((name, _),) = attr.items()
        if not all(re.fullmatch(ATTR_PART_PATTERN, part) for part in name.split("/")):
            raise ValueError(f"attribute name {name!r} must be a sysfs attribute name (letters, digits, _ . -)")
    return attrs


def _pairs(attrs: list[dict[str, str]]) -> list[tuple[str, str]]:
    return [next(iter(a.items())) for a in attrs]


class VgpuCreate(BaseModel):
    """Either ``parent`` and ``type``, or a request for the chooser (``resolution``, ``min_memory``,
    ``weight``; ``parent`` then only restricts where it looks)."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [
        {"parent": "0000:00:02.0", "type": "i915-GVTg_V5_4"}, {"resolution": "1920x1200", "min_memory": 512}]})

    parent: ParentName | None = None
    type: TypeName | None = None
    uuid: Uuid | None = Field(None, description="default: a new random UUID")
    attrs: list[dict[str, str]] = Field(default_factory=list, description="[{\"name\": \"value\"}, ...] in order")
    resolution: str | None = Field(None, pattern=RESOLUTION_PATTERN, description="at least WxH")
    min_memory: int | None = Field(None, ge=1, le=1 << 20, description="at least this much graphics memory, MiB")
    weight: int | None = Field(None, ge=1, le=16, description="at least this scheduler weight (GVT-g)")
    dry_run: bool = Field(False, description="only say what the chooser would take (200, nothing created)")

    _attrs = field_validator("attrs")(_check_attrs)

    @property
    def choosing(self) -> bool:
        return self.resolution is not None or self.min_memory is not None or self.weight is not None

    @model_validator(mode="after")
    def _one_way(self) -> VgpuCreate:
        if self.choosing and self.type:
            raise ValueError("give either parent and type, or a request (resolution/min_memory/weight), not both")
        if not self.choosing and not (self.parent and self.type):
            raise ValueError("say what to create: parent and type, or a request (resolution, min_memory, weight)")
        if self.dry_run and not self.choosing:
            raise ValueError("dry_run only applies when vgpuctl chooses (resolution/min_memory/weight)")
        return self


class DefinitionCreate(BaseModel):
    """A persistent vGPU in mdevctl's format. Only ``uuid`` promotes that active vGPU to a definition."""

    model_config = ConfigDict(extra="forbid")

    uuid: Uuid | None = Field(None, description="default: a new random UUID")
    parent: ParentName | None = None
    type: TypeName | None = None
    start: Literal["auto", "manual"] = "manual"
    attrs: list[dict[str, str]] = Field(default_factory=list)

    _attrs = field_validator("attrs")(_check_attrs)


class AttrIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=rf"^{ATTR_PART_PATTERN}(/{ATTR_PART_PATTERN})*$")
    value: str


class DefinitionChange(BaseModel):
    """What ``vgpuctl modify`` changes: type, start mode, an attribute added (at ``index``, else last) or
    deleted (at ``index``, else the last)."""

    model_config = ConfigDict(extra="forbid")

    type: TypeName | None = None
    start: Literal["auto", "manual"] | None = None
    add_attr: AttrIn | None = None
    delete_attr: bool = False
    index: int | None = Field(None, ge=0, le=1024)

    @model_validator(mode="after")
    def _something(self) -> DefinitionChange:
        if not (self.type or self.start or self.add_attr or self.delete_attr):
            raise ValueError("nothing to change: give type, start, add_attr or delete_attr")
        return self


# The VM models are derived from the spec's dataclasses (vgpuctl.vm.spec, vgpuctl.vm.devices): a field, its
# choices (a Literal) and its tables come from there; the API only adds stricter patterns for what becomes a
# path component under /sys and /etc.
_API_PATTERNS: dict[tuple[str, str], Any] = {("VgpuRequest", "uuid"): Uuid, ("VgpuRequest", "parent"): ParentName,
                                             ("VgpuRequest", "type"): TypeName}


def _api_type(owner: type[Any], f: dataclasses.Field[Any], hint: Any) -> Any:
    """The pydantic type of a spec field: its choices as a Literal, a table as its input model."""
    if (owner.__name__, f.name) in _API_PATTERNS:
        return _API_PATTERNS[(owner.__name__, f.name)]
    if "choices" in f.metadata:
        return cast(Any, Literal)[f.metadata["choices"]]
    if dataclasses.is_dataclass(hint):
        return _input_model(cast(type[Any], hint), merged=True)
    if get_origin(hint) is list and dataclasses.is_dataclass(get_args(hint)[0]):
        return list[_input_model(get_args(hint)[0], merged=False)]  # type: ignore[misc]
    return hint


def _input_model(cls: type[Any], *, merged: bool) -> type[BaseModel]:
    """``<Table>In``: a spec table as the API takes it. ``merged`` (network, vgpu, display: merged into the
    profile's): every field optional, null removes it; else (a disk) required fields stay required."""
    hints = get_type_hints(cls)
    fields: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        kind = _api_type(cls, f, hints[f.name])
        if merged:
            fields[f.name] = (kind | None, None)
        elif f.default is not dataclasses.MISSING:
            fields[f.name] = (kind, f.default)
        else:
            fields[f.name] = (kind, ...)
    return create_model(f"{cls.__name__}In", __config__=ConfigDict(extra="forbid"), __doc__=cls.__doc__,
                        **fields)


class VmCreateBase(BaseModel):
    """A new VM: a profile's defaults (or vgpuctl's), then these fields, as in the spec's TOML file.
    ``display`` and ``network`` are merged into the profile's, ``vgpu`` replaces it, ``kernel`` implies
    ``boot: kernel``; null removes a setting. The library checks every value and says what is wrong."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [
        {"name": "car1", "profile": "automotive", "kernel": "/srv/guest.elf", "memory_mib": 64, "cpus": 1,
         "display": {"backend": "vnc"}}]})

    name: str = Field(pattern=VM_NAME_PATTERN)
    profile: Literal["streaming", "gaming", "automotive"] | None = None  # = PROFILE_NAMES (a test checks)


def _vm_create() -> type[VmCreateBase]:
    from vgpuctl.vm.spec import VmSpec

    hints = get_type_hints(VmSpec)
    fields: dict[str, Any] = {f.name: (_api_type(VmSpec, f, hints[f.name]) | None, None)
                              for f in dataclasses.fields(VmSpec) if f.name not in ("name", "profile")}
    return create_model("VmCreate", __base__=VmCreateBase, __doc__=VmCreateBase.__doc__, **fields)


if TYPE_CHECKING:
    VmCreate = VmCreateBase
else:
    VmCreate = _vm_create()


class VmStart(BaseModel):
    model_config = ConfigDict(extra="forbid")

    accel: Annotated[Literal["auto", "kvm", "tcg"],
                     Field(description="auto: KVM when a probe guest runs under it")] = "auto"


class VmStop(BaseModel):
    model_config = ConfigDict(extra="forbid")

    timeout: Annotated[float, Field(gt=0, le=600,
                                    description="seconds to wait for the guest before quitting QEMU")] = 30.0


# ---------------------------------------------------------------------- the host


def _held(ctx: Context) -> set[str]:
    """The VFs VMs of vgpuctl's run on."""
    from vgpuctl.vm.inventory import vf_holders

    return set(vf_holders(ctx.root, ctx.state))


@router.get("/gpus", tags=["host"], response_model=list[GpuRow])
def gpus(ctx: Ctx) -> Any:
    """Each mdev-capable GPU, then each SR-IOV PF with its ``sriov`` facts (as ``vgpuctl gpus --json``)."""
    from vgpuctl.mdev.report import gpus_rows

    return gpus_rows(ctx.root, _held(ctx))


@router.get("/types", tags=["host"], response_model=list[TypeRow])
def types(ctx: Ctx, parent: Annotated[str | None, Query(pattern=PARENT_PATTERN)] = None) -> Any:
    """Every vGPU type with its available instances, SR-IOV VFs' too (as ``vgpuctl types --json [-p PARENT]``)."""
    from vgpuctl.mdev.report import types_rows

    return types_rows(ctx.root, parent, _held(ctx))


@router.get("/doctor", tags=["host"])
def doctor(ctx: Ctx, guest: Annotated[bool, Query(description="start a tiny KVM guest (slow)")] = True
           ) -> dict[str, Any]:
    """Is this host ready for GVT-g vGPUs? (as ``vgpuctl doctor --json [--no-guest]``)."""
    from vgpuctl.backends.doctor import run_doctor

    return run_doctor(ctx.root, run_guest=guest).to_json()


@router.get("/problems", tags=["host"])
def problems(ctx: Ctx) -> list[dict[str, str]]:
    """Files vgpuctl cannot read (an mdevctl definition, a VM spec), with path and error; the rest works on."""
    from vgpuctl.service.problems import unreadable_files

    return unreadable_files(ctx.root, ctx.state)


# ---------------------------------------------------------------------- SR-IOV VFs

PCI_ADDRESS_PATTERN = r"^([0-9a-fA-F]{4}:)?[0-9a-fA-F]{2}:[0-9a-fA-F]{2}\.[0-7]$"
PfAddress = Annotated[str, Path(pattern=PCI_ADDRESS_PATTERN, description="the PF's PCI address, e.g. 0000:00:02.0")]


class VfsEnable(BaseModel):
    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [{"count": 7}]})

    count: int | None = Field(None, ge=1, le=65535, description="how many VFs (Intel; the kernel takes 0, then N: "
                              "VFs on are replaced); none on NVIDIA: sriov-manage enables every VF")


class VfsProvision(BaseModel):
    """Intel VFs' quotas, as ``vgpuctl vfs provision`` takes them (sizes in bytes or with K/M/G), or ``auto``."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [
        {"vfs": ["1-2"], "ggtt": "512M", "contexts": 1024, "doorbells": 16}, {"auto": True}]})

    vfs: list[Annotated[str, Field(pattern=r"^\d+(-\d+)?$")]] = Field(default_factory=list,
                                                                    description="N or N-M; default every VF")
    ggtt: str | None = Field(None, description="GGTT per VF")
    vram: str | None = Field(None, description="VRAM (local memory) per VF, discrete GPUs")
    contexts: int | None = Field(None, ge=0, description="GuC contexts per VF")
    doorbells: int | None = Field(None, ge=0, description="GuC doorbells per VF")
    auto: bool = Field(False, description="clear every quota: the driver's fair shares at enable")


class VfsDisable(BaseModel):
    model_config = ConfigDict(extra="forbid")

    timeout: Annotated[float, Field(gt=0, le=600, description="seconds to wait for the kernel")] = 5.0


def _pf_row(ctx: Context, address: str) -> dict[str, Any]:
    from vgpuctl.host.pci import check_address
    from vgpuctl.vm.inventory import vf_listing

    address = check_address(address)
    return next(row for row in vf_listing(ctx.root, ctx.state) if row["pf"] == address)


@router.get("/vfs", tags=["vfs"])
def list_vfs(ctx: Ctx) -> list[dict[str, Any]]:
    """Each SR-IOV PF (Intel's, NVIDIA's vendor-VFIO ones) with its VFs and the VM holding each: the ``pfs`` of
    ``vgpuctl vfs list --json``."""
    from vgpuctl.vm.inventory import vf_listing

    return vf_listing(ctx.root, ctx.state)


@router.post("/vfs/{pf}/enable", tags=["vfs"])
def enable_vfs(ctx: Ctx, pf: PfAddress, body: VfsEnable, force: Force = False) -> dict[str, Any]:
    """Enable ``count`` VFs on an Intel PF, each bound to its VFIO driver (as ``vgpuctl vfs enable``); answers
    the PF's row of ``GET /vfs``. The kernel's refusal is 409 ``kernel_error`` saying why in the driver's
    words; VFs in use or not vgpuctl's are 409 unless ``force``."""
    from vgpuctl.backends import vfs
    from vgpuctl.vm.inventory import vf_holders

    done = vfs.enable(ctx.root, ctx.state, pf, body.count, force=force, holders=vf_holders(ctx.root, ctx.state))
    return _pf_row(ctx, done.address)


@router.post("/vfs/{pf}/disable", tags=["vfs"])
def disable_vfs(ctx: Ctx, pf: PfAddress, body: VfsDisable | None = None, force: Force = False) -> dict[str, Any]:
    """Turn off an Intel PF's VFs (as ``vgpuctl vfs disable``): refused (409) while a VM holds one, or when
    vgpuctl did not enable them, unless ``force``; answers the PF's row of ``GET /vfs``."""
    from vgpuctl.backends import vfs
    from vgpuctl.vm.inventory import vf_holders

    address, _ = vfs.disable(ctx.root, ctx.state, pf, force=force, holders=vf_holders(ctx.root, ctx.state),
                             timeout_s=(body or VfsDisable()).timeout)
    return _pf_row(ctx, address)


@router.post("/vfs/{pf}/provision", tags=["vfs"])
def provision_vfs(ctx: Ctx, pf: PfAddress, body: VfsProvision, force: Force = False) -> dict[str, Any]:
    """Set an Intel PF's VF quotas while its VFs are off (as ``vgpuctl vfs provision``), kept in its definition
    and put back at boot; answers the PF's row of ``GET /vfs`` (its ``quotas``)."""
    from vgpuctl.backends import sriov_intel_provision
    from vgpuctl.host.pci import check_address

    sriov_intel_provision.request(ctx.root, ctx.state, pf, tuple(body.vfs), ggtt=body.ggtt, vram=body.vram,
                                  contexts=body.contexts, doorbells=body.doorbells, auto_shares=body.auto,
                                  force=force)
    return _pf_row(ctx, check_address(pf))


@router.post("/vfs/restore", tags=["vfs"])
def restore_vfs(ctx: Ctx, force: Force = False) -> list[dict[str, str]]:
    """Put back every VF configuration vgpuctl made (as ``vgpuctl vfs restore``, what the boot unit runs): one
    row per PF with its outcome (restored, already, failed, skipped) and why."""
    from vgpuctl.backends import vf_restore
    from vgpuctl.vm.inventory import vf_holders

    return [{"pf": r.pf, "outcome": r.outcome, "detail": r.detail}
            for r in vf_restore.restore(ctx.root, ctx.state, force=force, holders=vf_holders(ctx.root, ctx.state))]


# ---------------------------------------------------------------------- vGPUs


@router.get("/vgpus", tags=["vgpus"], response_model=list[VgpuRow])
def list_vgpus(ctx: Ctx, defined: Annotated[bool, Query(description="only defined vGPUs (as -d)")] = False,
               active: Annotated[bool, Query(description="only active vGPUs (as --active)")] = False,
               parent: Annotated[str | None, Query(pattern=PARENT_PATTERN)] = None,
               uuid: Annotated[str | None, Query(pattern=UUID_PATTERN)] = None) -> Any:
    """Active and defined vGPUs with start mode and owner (as ``vgpuctl list --json``)."""
    from vgpuctl.mdev.definitions import canonical_uuid
    from vgpuctl.mdev.report import vgpu_rows

    return vgpu_rows(ctx.root, ctx.state, defined_only=defined, active_only=active, parent=parent,
                     uuid=canonical_uuid(uuid) if uuid else None)


@router.post("/vgpus", tags=["vgpus"], status_code=201, response_model=CreatedVgpu, response_model_exclude_unset=True,
             responses={200: {"model": CreatedVgpu, "description": "Dry run: what would be created"}})
def create_vgpu(ctx: Ctx, body: VgpuCreate, response: Response) -> Any:
    """Create an active vGPU: on ``parent`` of ``type``, or the smallest type that satisfies the request
    (as ``vgpuctl create``). A full GPU is 409 ``capacity_error``, saying which pool and what still fits."""
    from vgpuctl.mdev.choose import Request as Wanted
    from vgpuctl.mdev.choose import choose_on_host, parse_resolution, require_creatable
    from vgpuctl.mdev.lifecycle import Manager
    from vgpuctl.mdev.report import read_all_types

    parent, type_id, reason = body.parent, body.type, None
    if body.choosing:
        held = _held(ctx)
        if parent:
            read_all_types(ctx.root, parent, held)  # NotFound unless an mdev parent or an SR-IOV PF
        wanted = Wanted(parse_resolution(body.resolution) if body.resolution else None, body.min_memory, body.weight)
        choice = choose_on_host(ctx.root, wanted, parent, held)
        parent, type_id, reason = choice.chosen.parent, choice.chosen.type_id, choice.reason
        if body.dry_run:
            response.status_code = 200
            return {"parent": parent, "type": type_id, "reason": reason, "rejected": choice.rejected}
        require_creatable(choice)
    assert parent and type_id
    new = Manager(ctx.root, ctx.state).create(parent, type_id, body.uuid, _pairs(body.attrs))
    return {"uuid": new, "parent": parent, "type": type_id, "reason": reason}


@router.delete("/vgpus/{uuid}", tags=["vgpus"], status_code=204)
def remove_vgpu(ctx: Ctx, uuid: UuidPath, force: Force = False) -> None:
    """Remove an active vGPU (only one vgpuctl created, unless ``force``); its definition stays."""
    from vgpuctl.mdev.lifecycle import Manager

    Manager(ctx.root, ctx.state, force=force).remove(uuid)


# ---------------------------------------------------------------------- definitions


def _definition(d: Any) -> dict[str, Any]:
    return {"uuid": d.uuid, "parent": d.parent, "type": d.mdev_type, "start": d.start,
            "attrs": [{k: v} for k, v in d.attrs]}


@router.post("/definitions", tags=["definitions"], status_code=201, response_model=DefinitionOut)
def define(ctx: Ctx, body: DefinitionCreate) -> Any:
    """Define a persistent vGPU in mdevctl's format (as ``vgpuctl define``)."""
    from vgpuctl.mdev.lifecycle import Manager

    definition = Manager(ctx.root, ctx.state).define(body.uuid, body.parent, body.type, body.start == "auto",
                                                     _pairs(body.attrs))
    return _definition(definition)


@router.patch("/definitions/{uuid}", tags=["definitions"], response_model=DefinitionOut)
def modify(ctx: Ctx, uuid: UuidPath, body: DefinitionChange,
           parent: Annotated[str | None, Query(pattern=PARENT_PATTERN)] = None, force: Force = False) -> Any:
    """Change a definition: start mode (auto/manual), type, attributes (as ``vgpuctl modify``)."""
    from vgpuctl.mdev.lifecycle import Manager

    add = (body.add_attr.name, body.add_attr.value) if body.add_attr else None
    definition = Manager(ctx.root, ctx.state, force=force).modify(uuid, parent, body.type, body.start, add,
                                                                  body.delete_attr, body.index)
    return _definition(definition)


@router.delete("/definitions/{uuid}", tags=["definitions"], status_code=204)
def undefine(ctx: Ctx, uuid: UuidPath, parent: Annotated[str | None, Query(pattern=PARENT_PATTERN)] = None,
             force: Force = False) -> None:
    """Remove a definition (only one vgpuctl created, unless ``force``); an active vGPU stays."""
    from vgpuctl.mdev.lifecycle import Manager

    Manager(ctx.root, ctx.state, force=force).undefine(uuid, parent)


@router.post("/definitions/{uuid}/start", tags=["definitions"], status_code=201, response_model=CreatedVgpu,
             response_model_exclude_unset=True)
def start_definition(ctx: Ctx, uuid: UuidPath, parent: Annotated[str | None, Query(pattern=PARENT_PATTERN)] = None
                     ) -> Any:
    """Start a defined vGPU (as ``vgpuctl start -u``); stop it with ``DELETE /vgpus/{uuid}``."""
    from vgpuctl.mdev.lifecycle import Manager

    manager = Manager(ctx.root, ctx.state)
    definition = manager.one_definition(uuid, parent)
    new = manager.start(definition.uuid, definition.parent)
    return {"uuid": new, "parent": definition.parent, "type": definition.mdev_type}


# ---------------------------------------------------------------------- VMs


@router.get("/vms", tags=["vms"])
def list_vms(ctx: Ctx) -> list[dict[str, Any]]:
    """Every VM: its ``vgpuctl vm list --json`` row (``vgpu`` is the request), its status (``state``, ``pid``,
    ``accel``, ``vgpu_uuid``, ``console``, ``detail``, ...) and its whole ``spec``."""
    from vgpuctl.vm.inventory import vm_overviews

    return vm_overviews(ctx.root, ctx.state)


@router.post("/vms", tags=["vms"], status_code=201)
def create_vm(ctx: Ctx, body: VmCreate) -> dict[str, Any]:
    """Create a VM from a profile and fields (as ``vgpuctl vm create``); answers as ``GET /vms/{name}``."""
    from vgpuctl.vm import inventory

    fields = body.model_dump(exclude_unset=True, exclude={"name", "profile"})
    inventory.create(ctx.state, body.name, body.profile, fields)
    return _vm(ctx, body.name)


def _vm(ctx: Context, name: str) -> dict[str, Any]:
    from vgpuctl.vm import inventory
    from vgpuctl.vm import spec as specs

    detail = inventory.vm_detail(ctx.root, ctx.state, name)
    detail.update(inventory.vm_overview(ctx.root, ctx.state, specs.load(ctx.state, name)))
    return detail


@router.get("/vms/{name}", tags=["vms"])
def get_vm(ctx: Ctx, name: VmName) -> dict[str, Any]:
    """A VM as in ``GET /vms``, with its files (``file``, ``paths``), host ``requires`` and ``warnings``."""
    return _vm(ctx, name)


@router.delete("/vms/{name}", tags=["vms"], status_code=204)
def remove_vm(ctx: Ctx, name: VmName) -> None:
    """Remove a stopped VM: its spec and runtime directory; disk images stay (as ``vgpuctl vm rm``)."""
    from vgpuctl.vm import inventory

    inventory.remove(ctx.root, ctx.state, name)


@router.get("/vms/{name}/status", tags=["vms"], response_model=VmStatusOut)
def vm_status(ctx: Ctx, name: VmName) -> Any:
    """Running, paused, shutdown, stopped or crashed (as ``vgpuctl vm status --json``)."""
    from vgpuctl.vm import lifecycle

    return lifecycle.status(ctx.root, ctx.state, name, guest=True).to_json()


@router.post("/vms/{name}/start", tags=["vms"], response_model=VmStatusOut)
def start_vm(ctx: Ctx, name: VmName, body: VmStart | None = None) -> Any:
    """Start the VM: preflight, its vGPU (created on demand), QEMU until QMP says running."""
    from vgpuctl.vm import lifecycle

    return lifecycle.start(ctx.root, ctx.state, name, accel=(body or VmStart()).accel).to_json()


@router.post("/vms/{name}/stop", tags=["vms"], response_model=VmStatusOut)
def stop_vm(ctx: Ctx, name: VmName, body: VmStop | None = None) -> Any:
    """ACPI power button; quit QEMU if the guest has not powered off within ``timeout`` seconds."""
    from vgpuctl.vm import lifecycle

    return lifecycle.stop(ctx.root, ctx.state, name, timeout_s=(body or VmStop()).timeout).to_json()


@router.post("/vms/{name}/kill", tags=["vms"], response_model=VmStatusOut)
def kill_vm(ctx: Ctx, name: VmName) -> Any:
    """Kill QEMU at once (the guest gets no chance to shut down)."""
    from vgpuctl.vm import lifecycle

    return lifecycle.kill(ctx.root, ctx.state, name).to_json()


@router.get("/vms/{name}/screenshot", tags=["vms"], response_class=Response,
            responses={200: {"content": {"image/png": {}}, "description": "The VM's display as PNG"}})
def screenshot(ctx: Ctx, name: VmName) -> Response:
    """The VM's display now, as a PNG (QMP screendump)."""
    from vgpuctl.vm import lifecycle

    # A directory of our own for QEMU to write into (0700): nobody else can swap the file under us.
    with tempfile.TemporaryDirectory(prefix="vgpuctl-screenshot-") as directory:
        data = lifecycle.screenshot(ctx.root, ctx.state, name, pathlib.Path(directory) / "screen.png").read_bytes()
    return Response(data, media_type="image/png", headers={"Cache-Control": "no-store"})


# ---------------------------------------------------------------------- live


@router.get("/events", tags=["live"], response_class=StreamingResponse,
            responses={200: {"content": {"text/event-stream": {}},
                             "description": "events gpus, vgpus, vms, vfs (whole snapshots) and error"}})
async def events(request: Request) -> StreamingResponse:
    """Server-sent events: ``gpus``, ``vgpus``, ``vms`` and ``vfs`` — the same JSON as the listings — at connect and
    whenever one changes (polled every 0.5 s while anyone listens, so CLI changes show too)."""
    from vgpuctl.service.events import EventHub

    hub: EventHub = request.app.state.events
    return StreamingResponse(hub.stream(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"})
