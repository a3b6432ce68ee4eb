"""Which QEMU binary vgpuctl runs: a module of its own, free of the probe's imports, because every
``vgpuctl vm start`` asks it before QEMU can be spawned."""

from __future__ import annotations

import os

QEMU_ENV = "VGPUCTL_QEMU"
QEMU_NAME = "qemu-system-x86_64"
QEMU_KVM = "/usr/libexec/qemu-kvm"  # RHEL, CentOS, Fedora's qemu-kvm package


def _executable(path: str) -> bool:
    return os.path.isfile(path) and os.access(path, os.X_OK)


def _resolve(candidate: str) -> str | None:
    """An executable's absolute path: a path as given, a bare name looked up on PATH (as shutil.which does;
    importing shutil, with its compression modules, costs a VM start ~2.5 ms)."""
    if os.sep in candidate:
        path = os.path.abspath(candidate)
        return path if _executable(path) else None
    for directory in os.get_exec_path():
        path = os.path.join(directory, candidate)
        if _executable(path):
            return path
    return None


def explain_qemu(explicit: str | None) -> tuple[str | None, str | None]:
    """The binary find_qemu chooses, or None and why none was found."""
    if explicit:
        found = _resolve(explicit)
        return found, None if found else f"QEMU binary {explicit!r} not found or not executable"
    from_env = os.environ.get(QEMU_ENV)
    if from_env:
        found = _resolve(from_env)
        return found, None if found else f"${QEMU_ENV}={from_env!r}: not found or not executable"
    for candidate in (QEMU_NAME, QEMU_KVM):
        found = _resolve(candidate)
        if found:
            return found, None
    return None, (f"no QEMU found: neither {QEMU_NAME} on PATH nor {QEMU_KVM} "
                  f"(Debian: apt-get install qemu-system-x86; or set ${QEMU_ENV})")


def find_qemu(explicit: str | None = None) -> str | None:
    """The QEMU to use: ``explicit``, else ``$VGPUCTL_QEMU``, else qemu-system-x86_64 on PATH,
    else /usr/libexec/qemu-kvm. A binary asked for by name (argument or environment) that does
    not exist gives None rather than a silent fallback to another QEMU."""
    return explain_qemu(explicit)[0]
