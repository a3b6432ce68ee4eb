"""The VMs as plain JSON-ready data, and the spec-level changes that are not QEMU's business:
the one place both the CLI (``vm list/show --json``, ``vm rm``) and the HTTP service get them from.
"""

from __future__ import annotations

import contextlib
import shutil
from collections.abc import Callable, Collection
from dataclasses import fields as dataclass_fields
from typing import Any

from vgpuctl.base.crash import crashpoint
from vgpuctl.base.errors import Conflict, InvalidInput, NotOwned
from vgpuctl.base.problems import UnreadableFile
from vgpuctl.base.state import StateDir
from vgpuctl.host import HostRoot
from vgpuctl.vm import spec as specs
from vgpuctl.vm.runtime import (
    RuntimePaths,
    VmProcesses,
    all_vm_processes,
    check_requirements,
    is_running,
    running_vms,
)
from vgpuctl.vm.spec import VmSpec

# What the body of a create may set besides name and profile: VmSpec's fields as in its TOML file.
SPEC_FIELDS = tuple(f.name for f in dataclass_fields(VmSpec) if f.name not in ("name", "profile"))


def vm_row(state: StateDir, spec: VmSpec, running: set[str] | None = None) -> dict[str, Any]:
    """One row of ``vgpuctl vm list --json``; ``running``: the VMs that run (one pass over /proc for all)."""
    return {"name": spec.name, "profile": spec.profile, "memory_mib": spec.memory_mib, "cpus": spec.cpus,
            "vgpu": spec.vgpu.describe() if spec.vgpu.kind != "none" else None,
            "vgpu_display": spec.vgpu_display, "display": spec.display.backend, "order": spec.order,
            "autostart": spec.autostart,
            "running": spec.name in running if running is not None else is_running(state, spec.name)}


def vm_rows(state: StateDir) -> list[dict[str, Any]]:
    """``vgpuctl vm list --json``: a row per VM, and ``{"name", "file", "error"}`` for each spec file that
    cannot be read, in name order."""
    good, problems = specs.load_each(state)
    running = running_vms(state)
    rows = [vm_row(state, spec, running) for spec in good] + [bad_spec_row(p) for p in problems]
    return sorted(rows, key=lambda row: str(row["name"]))


def vm_overview(root: HostRoot, state: StateDir, spec: VmSpec,
                processes: dict[str, VmProcesses] | None = None) -> dict[str, Any]:
    """A VM's list row with its status (``vm status --json`` less the name; the vGPU's UUID as ``vgpu_uuid``,
    since ``vgpu`` is the request) and its whole spec: what the service lists and streams. ``processes``:
    :func:`all_vm_processes`, when the caller lists many VMs."""
    from vgpuctl.vm.lifecycle import status

    mine = processes.get(spec.name, VmProcesses()) if processes is not None else None
    now = status(root, state, spec.name, processes=mine).to_json()
    now.pop("name")
    now["vgpu_uuid"] = now.pop("vgpu")
    running = None if processes is None else {n for n, p in processes.items() if p.qemu is not None}
    return {**vm_row(state, spec, running), **now, "spec": spec.to_dict()}


def vm_overviews(root: HostRoot, state: StateDir) -> list[dict[str, Any]]:
    """What the service lists: an overview per VM, and for each spec file that cannot be read
    ``{"name", "file", "error", "state": "error", "detail": error}`` (the others are listed all the same)."""
    good, problems = specs.load_each(state)
    processes = all_vm_processes(state)  # one pass over /proc for all VMs (the service asks twice a second)
    rows = [vm_overview(root, state, spec, processes) for spec in good]
    rows += [{**bad_spec_row(p), "state": "error", "detail": p.error} for p in problems]
    return sorted(rows, key=lambda row: str(row["name"]))


def vm_detail(root: HostRoot, state: StateDir, name: str) -> dict[str, Any]:
    """``vgpuctl vm show --json``: the whole spec, its files, host requirements and warnings."""
    spec = specs.load(state, name)
    return {"name": spec.name, "file": str(specs.spec_path(state, name)), "running": is_running(state, name),
            "spec": spec.to_dict(), "paths": RuntimePaths.for_vm(state, name).to_json(),
            "requires": [{"requirement": r.requirement, "met": r.met, "actual": r.actual, "where": r.where}
                         for r in check_requirements(root, spec)],
            "warnings": spec.warnings()}


def spec_from_fields(name: str, profile: str | None, fields: dict[str, Any]) -> VmSpec:
    """A new VM's spec: the profile's defaults (or vgpuctl's), then ``fields`` in the spec's own TOML form
    (``{"memory_mib": 64, "display": {"backend": "vnc"}, "vgpu": {"type": "i915-GVTg_V5_8"}}``), merged as
    ``vgpuctl vm create`` does (:func:`vgpuctl.vm.spec.merge`). Every field is checked as in a spec file.
    """
    from vgpuctl.vm.profiles import new_spec

    specs.check_name(name)
    unknown = [k for k in fields if k not in SPEC_FIELDS]
    if unknown:
        raise InvalidInput(f"unknown field {unknown[0]!r} (known: {', '.join(SPEC_FIELDS)})")
    where = f"vm {name}"
    return specs.merge(new_spec(name, profile), fields, where).validate(where)


def create(state: StateDir, name: str, profile: str | None, fields: dict[str, Any]) -> VmSpec:
    """Save a new VM made by :func:`spec_from_fields`; Conflict if the name is taken."""
    if specs.exists(state, name):
        raise Conflict(f"VM {name!r} already exists; change it with 'vgpuctl vm edit' or pick another name")
    spec = spec_from_fields(name, profile, fields)
    specs.save(state, spec, new=True)
    return spec


def remove(root: HostRoot, state: StateDir, name: str) -> list[str]:
    """Remove a stopped VM: the vGPU vgpuctl made for it, its runtime directory, then its spec (last: a
    remove killed half-way leaves a VM that a second remove finishes). Returns the disk images, which stay."""
    from vgpuctl.vm import lifecycle

    with lifecycle.vm_lock(state, name):  # no start of this VM runs meanwhile
        crashpoint("vm-rm:locked")
        spec = specs.load(state, name)
        current = lifecycle.status(root, state, name)
        if current.pid is not None or current.state == "starting":
            raise Conflict(f"VM {name} is {current.state}; stop it first: 'vgpuctl vm stop {name}'"
                           + (f" (QEMU pid {current.pid})" if current.pid else ""))
        # The vGPU vgpuctl made for this VM (its UUID derived from the name); a vGPU the spec names by
        # UUID is the user's and stays, as does one with the derived UUID that vgpuctl did not make.
        with contextlib.suppress(NotOwned):
            if lifecycle.release_vgpu_locked(root, state, name):
                crashpoint("vm-rm:vgpu-released")
        lifecycle.end_swtpm(state, name)  # one a killed start left, found by its command line
        shutil.rmtree(RuntimePaths.for_vm(state, name).directory, ignore_errors=True)  # the TPM's state too
        crashpoint("vm-rm:runtime-removed")
        specs.remove(state, name)
    return [d.path for d in spec.disks]


def bad_spec_row(problem: UnreadableFile) -> dict[str, Any]:
    """A VM listing's row for a spec file that is not a VM: its name, its file and why."""
    return {"name": problem.owner, "file": problem.path, "error": problem.error}


def vf_holders(root: HostRoot, state: StateDir) -> dict[str, str]:
    """SR-IOV VF address -> the name of the running VM vgpuctl gave it (from the VMs' run records)."""
    from vgpuctl.host.pci import check_address
    from vgpuctl.vm.lifecycle import _running_vgpus

    found = {}
    for vgpu, name in _running_vgpus(state, "").items():
        with contextlib.suppress(InvalidInput):
            found[check_address(vgpu)] = name
    return found


def vf_listing(root: HostRoot, state: StateDir) -> list[dict[str, Any]]:
    """Each SR-IOV PF vgpuctl knows (Intel's, then NVIDIA's vendor-VFIO ones) with its VFs, who holds each (a VM of
    vgpuctl's, or another opener), and the definition ``vfs restore`` puts back at boot: the rows of ``vgpuctl vfs
    list`` and the API. An Intel row adds each VF's quotas (``quota``); an NVIDIA row the type each VF has
    (``vgpu_type``), the types it can take now (``creatable``) and, per PF, every type its VFs can take with how
    many free VFs could take it (``types``)."""
    from vgpuctl.backends import INTEL_VENDOR_ID, sriov_intel, sriov_intel_provision, vf_definitions
    from vgpuctl.host import pci
    from vgpuctl.mdev.state import Journal

    sriov_intel.settle(root, state)  # what a killed vfs command left
    holders = vf_holders(root, state)
    owned = Journal(state).ownership().vfs
    definitions = {d.pf: d for d in vf_definitions.load_all(state)[0]}

    def defined(pf: str) -> dict[str, Any] | None:
        found = definitions.get(pf)
        return None if found is None else {"count": found.count, "provisioned": sorted(found.provisioning or {},
                                                                                      key=int)}

    rows = []
    for pf in sriov_intel.intel_pfs(root):
        openers = pci.vf_openers(root, pf.pf.vfs)
        quotas = sriov_intel_provision.quotas_of(root, pf)
        by_index = {vf.address: index for index, vf in enumerate(pf.pf.vfs, start=1)}
        rows.append({
            "pf": pf.address,
            "vendor_id": f"{INTEL_VENDOR_ID:04x}",
            "device": None if pf.pf.function.device is None else f"{pf.pf.function.device:04x}",
            "driver": pf.driver,
            "total_vfs": pf.pf.total_vfs,
            "enabled_vfs": pf.pf.num_vfs,
            "vfio_driver": pf.vfio_driver,
            "enabled_by_vgpuctl": pf.address in owned,
            "problem": pf.problem,
            "definition": defined(pf.address),
            "quotas": None if quotas is None else {str(n): q for n, q in quotas.items() if any(q.values())},
            "vfs": [{"address": vf.address, "driver": vf.driver,
                     "vm": holders.get(vf.address), "opened_by": openers.get(vf.address),
                     "quota": None if quotas is None else quotas.get(by_index[vf.address]), "vgpu_type": None}
                    for vf in pf.pf.vfs],
            "backend": sriov_intel.BACKEND.name,
        })
    rows += nvidia_vf_rows(root, holders, owned, defined)
    return rows


def nvidia_vf_rows(root: HostRoot, holders: dict[str, str], owned: Collection[str],
                   defined: Callable[[str], dict[str, Any] | None]) -> list[dict[str, Any]]:
    """:func:`vf_listing`'s rows of NVIDIA's vendor-VFIO PFs (``holders``: VF address -> the VM on it; ``owned``:
    the PFs whose VFs vgpuctl enabled; ``defined``: a PF's VF definition)."""
    from vgpuctl.backends import NVIDIA_VENDOR_ID, sriov_nvidia
    from vgpuctl.host import pci

    rows = []
    for pf in sriov_nvidia.nvidia_views(root):
        openers = pci.vf_openers(root, pf.pf.vfs)
        names = pf.type_names()
        rows.append({
            "pf": pf.address,
            "vendor_id": f"{NVIDIA_VENDOR_ID:04x}",
            "device": None if pf.pf.function.device is None else f"{pf.pf.function.device:04x}",
            "driver": pf.pf.function.driver,
            "total_vfs": pf.pf.total_vfs,
            "enabled_vfs": pf.pf.num_vfs,
            "vfio_driver": "nvidia",  # its VFs stay on nvidia, which is their VFIO driver (sriov.md 3.4)
            "enabled_by_vgpuctl": pf.address in owned,
            "problem": pf.problem,
            "definition": defined(pf.address),
            "quotas": None,
            "vfs": [{"address": vf.address, "driver": vf.driver, "vm": holders.get(vf.address),
                     "opened_by": openers.get(vf.address), "quota": None,
                     "vgpu_type": {"id": vf.current, "name": names.get(vf.current)} if vf.current else None,
                     "creatable": [t.id for t in vf.creatable]} for vf in pf.vfs],
            "types": [{"id": type_id, "name": names[type_id], "framebuffer_mib": sriov_nvidia.framebuffer_mib(
                names[type_id]), "free_vfs": takers}
                      for type_id, takers in pf.takers(set(holders) | set(openers)).items()],
            "backend": sriov_nvidia.BACKEND.name,
        })
    return rows
