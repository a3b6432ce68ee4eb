"""Pick a parent and type for a request ("1920x1200, at least 512 MiB"), and say why.

Among the types that satisfy the request and still have room, prefer the one that uses the
fewest resources (least graphics memory, then lowest weight), so the most capacity stays for
later; between equal types, the parent with the most instances left.
"""

from __future__ import annotations

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


def mismatch(t: MdevType, request: Request) -> str | None:
    """Why t cannot serve the request, or None if it can."""
    if request.resolution:
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
            raise CapacityError("every type that gives {request} is full ({listed}); remove a vGPU or ask for less",
                                what="type", request=request.describe(), choices=full, listed=", ".join(full))
        raise NotFound("no vGPU type on this host gives {request} ({why})", what="type", request=request.describe(),
                       rejected=rejected,
                       why="; ".join(rejected) if rejected else "no mdev types at all: see 'vgpuctl doctor'")

    def cost(t: MdevType) -> tuple[int, int, int]:
        weight = t.fields.get("weight")
        return (t.memory_mib or 0, weight if isinstance(weight, int) else 0, -t.available_instances)

    best = min(suitable, key=cost)
    memory = f"{best.memory_mib} MiB graphics memory" if best.memory_mib else "the least resources"
    reason = (f"the smallest type that gives {request.describe()} ({memory}); "
              f"{best.available_instances} can be created there now")
    others = [f"{t.parent} {t.type_id}" for t in suitable if t is not best]
    if others:
        reason += f"; also possible: {', '.join(others)}"
    return Choice(best, reason, rejected)


def choose_on_host(root: HostRoot, request: Request, parent: str | None = None) -> Choice:
    """The choice among every type on the host (or on ``parent``), as ``vgpuctl create --resolution`` makes it."""
    from vgpuctl.mdev.sysfs import parent_names, read_types

    types = [t for p in parent_names(root) for t in read_types(root, p)]
    if parent:
        types = [t for t in types if t.parent == parent]
    return choose(types, request)
