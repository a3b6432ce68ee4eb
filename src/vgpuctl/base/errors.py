"""vgpuctl's errors: a small hierarchy; every message says what to do next."""

from __future__ import annotations


class VgpuError(Exception):
    """Base of every error vgpuctl reports to a user (exit status 1)."""


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
    """The kernel refused an operation with an errno we have no better words for."""

    def __init__(self, message: str, errno: int | None = None) -> None:
        super().__init__(message)
        self.errno = errno


class StateDamaged(VgpuError):
    """One of vgpuctl's own state files cannot be read; nothing is changed until it is repaired or moved away."""

    http_status = 503  # the service cannot do its job until an administrator repairs the file

    def __init__(self, message: str, path: str) -> None:
        super().__init__(message)
        self.path = path
