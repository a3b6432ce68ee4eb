"""``vgpuctl doctor`` as a whole: each vGPU backend's checks, then the host's (KVM, VFIO, QEMU)."""

from __future__ import annotations

from typing import Any

from vgpuctl.backends import _backends
from vgpuctl.host import HostRoot
from vgpuctl.host import doctor as engine
from vgpuctl.host.doctor import CheckSpec, Report


def all_checks() -> tuple[CheckSpec, ...]:
    return (*(spec for backend in _backends() for spec in backend.doctor_checks()), *engine.HOST_CHECKS)


def run_doctor(root: HostRoot, **options: Any) -> Report:
    """Every check for this host; ``options`` as :func:`vgpuctl.host.doctor.run_doctor` takes them."""
    return engine.run_doctor(root, all_checks(), **options)
