"""vgpuctl's errors: a small hierarchy of kinds. Each carries what went wrong as data, and its message
(which says what to do next) is rendered from that data.

The raiser gives a template and the data: ``NotFound("no active vGPU {uuid}", what="device", uuid=u)``.
The common fields are attributes (None when not given): ``what`` the error is about ("parent", "type",
"device", "definition", "attribute", "file" ...), ``errno``, ``path`` (as on the host), ``parent``,
``type_id``, ``uuid``, ``pool``, ``holder`` (what has it: a device, a VM); anything else is in ``data``.
Another front end (the mdevctl stand-in) says the same error in its own words from the same data, as
qemu.qmp's ExecuteError carries the reply it came from. Only these errors are user errors: any other
exception is a bug.
"""

from __future__ import annotations

import os
import re
from typing import Any, ClassVar

FIELDS = ("what", "errno", "path", "parent", "type_id", "uuid", "pool", "holder")


class VgpuError(Exception):
    """Base of every error vgpuctl reports to a user (exit status 1)."""

    kind: ClassVar[str] = "vgpu_error"  # the API's error kind: the class name in snake case unless a class says
    http_status: ClassVar[int | None] = None  # the API's status, when the kind's usual one does not fit

    what: str | None
    errno: int | None
    path: str | None
    parent: str | None
    type_id: str | None
    uuid: str | None
    pool: str | None
    holder: object

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "kind" not in cls.__dict__:
            cls.kind = re.sub(r"(?<!^)(?=[A-Z])", "_", cls.__name__).lower()

    def __init__(self, template: str, /, **data: Any) -> None:
        # A template without data is a finished message (it may hold braces of its own).
        errno = data.get("errno")
        values = {"strerror": os.strerror(errno) if errno is not None else "unknown error", **data}
        super().__init__(template.format(**values) if data else template)
        self.template = template
        self.data = data
        for name in FIELDS:
            setattr(self, name, data.get(name))


class NotFound(VgpuError):
    """A parent, type, device or definition that does not exist."""


class Conflict(VgpuError):
    """Something already exists or is in use (a UUID, a definition, an active device)."""


class CapacityError(VgpuError):
    """The parent has no room for the requested type."""


class NotOwned(VgpuError):
    """vgpuctl did not create this vGPU or definition; touching it needs --force."""


class InvalidInput(VgpuError):
    """Input that can never work (a malformed UUID, a bad definition file)."""


class KernelError(VgpuError):
    """The kernel refused an operation with an errno we have no better words for (``{strerror}`` says it)."""


class StateDamaged(VgpuError):
    """One of vgpuctl's own state files cannot be read; nothing is changed until it is repaired or moved away."""

    http_status = 503  # the service cannot do its job until an administrator repairs the file
