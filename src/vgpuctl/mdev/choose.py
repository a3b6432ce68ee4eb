"""Pick a parent and type for a request ("1920x1200, at least 512 MiB"), and say why.

Among the types that satisfy the request and still have room, prefer the one that uses the
fewest resources (least graphics memory, then lowest weight), so the most capacity stays for
later; between equal types, the parent with the most instances left.

The types are every backend's: the mdev parents' from sysfs, and what the SR-IOV PFs' VFs offer
(:func:`vgpuctl.backends.offered_types`: an Intel VF by its provisioned LMEM, else GGTT quota; an NVIDIA
type by the framebuffer its name says), compared alike. A type with ``display=emulated`` has no display
of its own (an Intel VF): any resolution asked for is the emulated adapter's, and the reason says so.
"""

from __future__ import annotations

from collections.abc import Collection
from typing import NamedTuple

from vgpuctl.base.errors import CapacityError, InvalidInput, NotFound
from vgpuctl.host import HostRoot
from vgpuctl.mdev.sysfs import MdevType


class Request(NamedTuple):  # NamedTuples: loaded at every vm start, where a dataclass costs ~0.5 ms
    resolution: tuple[int, int] | None = None
    min_memory_mib: int | None = None
    weight: int | None = None

    def describe(self) -> str:
        parts = []
        if self.resolution:
            parts.append(f">= {self.resolution[0]}x{self.resolution[1]}")
        if self.min_memory_mib:
            parts.append(f">= {self.min_memory_mib} MiB")
        if self.weight:
            parts.append(f"weight >= {self.weight}")
        return ", ".join(parts) or "any vGPU"


class Choice(NamedTuple):
    chosen: MdevType
    reason: str
    rejected: list[str]


def parse_resolution(text: str) -> tuple[int, int]:
    width, sep, height = text.lower().partition("x")
    if not sep or not width.isdigit() or not height.isdigit():
        raise InvalidInput("resolution must look like 1920x1200, got {value!r}", what="resolution", value=text)
    return int(width), int(height)


def emulated_display(t: MdevType) -> bool:
    """The type has no display of its own: the VM's picture comes from an emulated adapter (any resolution)."""
    return t.fields.get("display") == "emulated"


def mismatch(t: MdevType, request: Request) -> str | None:
    """Why t cannot serve the request, or None if it can (``unavailable``: a backend says why none is there)."""
    if t.fields.get("unavailable"):
        return str(t.fields["unavailable"])
    if request.resolution and not emulated_display(t):
        have = t.resolution
        if have is None:
            return "no resolution given by its driver"
        if have[0] < request.resolution[0] or have[1] < request.resolution[1]:
            return f"max {have[0]}x{have[1]}"
    if request.min_memory_mib:
        memory = t.memory_mib
        if memory is None or memory < request.min_memory_mib:
            return f"{memory or 'unknown'} MiB"
    if request.weight:
        weight = t.fields.get("weight")
        if not isinstance(weight, int) or weight < request.weight:
            return f"weight {weight or 'unknown'}"
    return None


def _is_vf(t: MdevType) -> bool:
    """A type of an SR-IOV backend (its vGPUs are VFs, not created)."""
    from vgpuctl.backends import backend_for_type

    return backend_for_type(t.type_id).pci_function


def choose(types: list[MdevType], request: Request) -> Choice:
    suitable, rejected, full = [], [], []
    for t in types:
        why = mismatch(t, request)
        if why:
            rejected.append(f"{t.parent} {t.type_id}: {why}")
        elif t.available_instances < 1:
            full.append(f"{t.parent} {t.type_id}")
        else:
            suitable.append(t)
    if not suitable:
        if full:
            vfs = any(_is_vf(t) for t in types if t.available_instances < 1 and not mismatch(t, request))
            raise CapacityError("every type that gives {request} is full ({listed}); remove a vGPU{more} or ask for "
                                "less", what="type", request=request.describe(), choices=full, listed=", ".join(full),
                                more=", stop a VM on a VF, enable more VFs" if vfs else "")
        raise NotFound("no vGPU type on this host gives {request} ({why})", what="type", request=request.describe(),
                       rejected=rejected,
                       why="; ".join(rejected) if rejected else "no mdev types at all: see 'vgpuctl doctor'")

    def cost(t: MdevType) -> tuple[int, int, int]:
        weight = t.fields.get("weight")
        return (t.memory_mib or 0, weight if isinstance(weight, int) else 0, -t.available_instances)

    best = min(suitable, key=cost)
    source = best.fields.get("memory_from")
    memory = (f"{best.memory_mib} MiB graphics memory" + (f", its {str(source).upper()} quota" if source else "")
              if best.memory_mib else "the least resources")
    reason = (f"the smallest type that gives {request.describe()} ({memory}); "
              f"{best.available_instances} can be created there now")
    if request.resolution and emulated_display(best):
        reason += ("; it has no display of its own: the resolution is the VM's emulated display's "
                   "(vgpu_display = false)")
    others = [f"{t.parent} {t.type_id}" for t in suitable if t is not best]
    if others:
        reason += f"; also possible: {', '.join(others)}"
    return Choice(best, reason, rejected)


def choose_on_host(root: HostRoot, request: Request, parent: str | None = None,
                   held: Collection[str] = ()) -> Choice:
    """The choice among every type on the host (or on ``parent``): every mdev parent's and every SR-IOV PF's
    (``held``: VF addresses VMs run on, not free), as ``vgpuctl create --resolution`` makes it."""
    from vgpuctl.backends import offered_types
    from vgpuctl.mdev.sysfs import parent_names, read_types

    types = [t for p in parent_names(root) for t in read_types(root, p)] + offered_types(root, held)
    if parent:
        types = [t for t in types if t.parent == parent]
    return choose(types, request)


def require_creatable(choice: Choice) -> None:
    """InvalidInput when the choice is an SR-IOV VF's type: a VF is not created, a VM takes it whole."""
    from vgpuctl.backends import backend_for_type

    if not _is_vf(choice.chosen):
        return
    backend = backend_for_type(choice.chosen.type_id)
    vm_type = backend.vm_vgpu_type(choice.chosen.type_id)
    how = f"vgpuctl vm create NAME --vf {choice.chosen.parent}" + (f" --type {vm_type}" if vm_type else "")
    raise InvalidInput("the best fit is {type} on {parent} ({reason}): an SR-IOV VF, which is not created but given "
                       "to a VM whole: {how}; or choose among mdev parents only with -p PARENT", what="type",
                       type=choice.chosen.type_id, parent=choice.chosen.parent, reason=choice.reason, how=how)
