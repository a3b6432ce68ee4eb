"""What the installed QEMU can do, asked of the binary itself.

Every answer comes from the binary's own help output (``-version``, ``-accel help``,
``-display help``, ``-device help``, ``-device vfio-pci,help``, ``-device vfio-pci-nohotplug,help``,
``-spice help``, ``-vnc help``), never from its version number: distributions backport features
and build without others, and display backends are loadable modules that may be missing
(spec qemu-streaming.md §1.4). The help outputs are used rather than QMP because only they list
accelerators and the display backends whose modules are really installed, and they carry the
same qdev property list as QMP's ``device-list-properties``. Each query is one short-lived QEMU
with ``-nodefaults -machine none``; all of them run in parallel, so a probe takes a few tens of
milliseconds. Nothing is cached.
"""

from __future__ import annotations

import os
import re
import subprocess
import time
from dataclasses import dataclass, field

from vgpuctl.host.qemu_binary import QEMU_ENV, QEMU_KVM, QEMU_NAME, explain_qemu, find_qemu

__all__ = ["QEMU_ENV", "QEMU_KVM", "QEMU_NAME", "QemuReport", "find_qemu", "parse_list", "parse_properties",
           "parse_version", "probe_qemu"]

# Arguments that make a QEMU start nothing: no default devices, no machine.
QUIET = ("-nodefaults", "-machine", "none")


@dataclass(frozen=True)
class QemuReport:
    """The capabilities of one QEMU binary that vgpuctl depends on."""

    binary: str | None  # resolved path, None if not found
    version: str | None  # e.g. "7.2.22" from -version
    accelerators: list[str] = field(default_factory=list)  # from -accel help: kvm, tcg, ...
    vfio_pci_properties: dict[str, str] = field(default_factory=dict)  # -device vfio-pci,help: name -> type
    vfio_pci_nohotplug: bool = False  # -device help lists vfio-pci-nohotplug
    ramfb: bool = False  # vfio-pci-nohotplug has the ramfb property
    displays: list[str] = field(default_factory=list)  # from -display help, in QEMU's order
    spice: bool = False  # -spice is supported (its module is installed)
    vnc: bool = False  # -vnc is supported
    errors: list[str] = field(default_factory=list)  # what failed while probing, in words


# Parsers: each takes the text one help query printed.
_VERSION = re.compile(r"QEMU emulator version (\d+\.\d+(?:\.\d+)?)")
# "  sysfsdev=<str>" (QEMU >= 2.12 or so) and the older "vfio-pci.sysfsdev=str".
_PROPERTY = re.compile(r"^(?:\s+|[\w-]+\.)([\w.-]+)=(?:<([^>]*)>|(\S+))")
_DEVICE_NAME = re.compile(r'^name "([^"]+)"', re.MULTILINE)


def parse_version(text: str) -> str | None:
    match = _VERSION.search(text)
    return match.group(1) if match else None


def parse_list(text: str, heading: str) -> list[str]:
    """The one-name-per-line list after ``heading``, up to the first blank line (newer QEMUs
    add prose after it)."""
    lines = text.splitlines()
    for index, line in enumerate(lines):
        if line.strip().startswith(heading):
            names: list[str] = []
            for item in lines[index + 1:]:
                if not item.strip():
                    break
                names.append(item.strip())
            return names
    return []


def parse_properties(text: str) -> dict[str, str]:
    """``-device TYPE,help``: property name -> type name."""
    properties: dict[str, str] = {}
    for line in text.splitlines():
        match = _PROPERTY.match(line)
        if match:
            properties[match.group(1)] = match.group(2) if match.group(2) is not None else match.group(3)
    return properties


def parse_device_names(text: str) -> set[str]:
    """``-device help``: every device type name."""
    return set(_DEVICE_NAME.findall(text))


# What each query runs (after the binary) and the key its output is filed under.
_QUERIES: dict[str, tuple[str, ...]] = {
    "version": ("-version",),
    "accel": (*QUIET, "-accel", "help"),
    "display": (*QUIET, "-display", "help"),
    "devices": (*QUIET, "-device", "help"),
    "vfio-pci": (*QUIET, "-device", "vfio-pci,help"),
    "vfio-pci-nohotplug": (*QUIET, "-device", "vfio-pci-nohotplug,help"),
    "spice": (*QUIET, "-spice", "help"),
    "vnc": (*QUIET, "-vnc", "help"),
}


def _run_all(binary: str, timeout_s: float, errors: list[str]) -> dict[str, tuple[str, str]]:
    """Run every query at once; (stdout, stderr) per key that finished in time."""
    env = {**os.environ, "LC_ALL": "C"}
    started: dict[str, subprocess.Popen[str]] = {}
    for key, args in _QUERIES.items():
        try:
            started[key] = subprocess.Popen([binary, *args], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                            stderr=subprocess.PIPE, text=True, errors="replace", env=env)
        except OSError as exc:
            errors.append(f"cannot run {binary} {' '.join(args)}: {exc.strerror or exc}")
    deadline = time.monotonic() + timeout_s
    outputs: dict[str, tuple[str, str]] = {}
    for key, process in started.items():
        try:
            outputs[key] = process.communicate(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            process.kill()
            process.communicate()
            errors.append(f"{binary} {' '.join(_QUERIES[key])}: no answer within {timeout_s:g} s")
    return outputs


def _first_line(text: str) -> str:
    return next((line.strip() for line in text.splitlines() if line.strip()), "no output")


def probe_qemu(binary: str | None = None, timeout_s: float = 10.0) -> QemuReport:
    """Ask a QEMU binary (``binary``, else :func:`find_qemu`'s choice) what it supports."""
    path, why = explain_qemu(binary)
    if path is None:
        return QemuReport(binary=None, version=None, errors=[why or "no QEMU found"])
    errors: list[str] = []
    out = _run_all(path, timeout_s, errors)

    def text(key: str) -> str:
        return out.get(key, ("", ""))[0]

    version = parse_version(text("version"))
    if version is None and "version" in out:
        errors.append(f"{path} -version: no version in its output ({_first_line(text('version') + out['version'][1])})")
    accelerators = parse_list(text("accel"), "Accelerators supported")
    if not accelerators and "accel" in out:
        errors.append(f"{path} -accel help: no accelerator list ({_first_line(out['accel'][1])})")
    displays = parse_list(text("display"), "Available display backend types")
    if not displays and "display" in out:
        errors.append(f"{path} -display help: no display list ({_first_line(out['display'][1])})")
    devices = parse_device_names(text("devices"))
    if not devices and "devices" in out:
        errors.append(f"{path} -device help: no device list ({_first_line(out['devices'][1])})")
    vfio = parse_properties(text("vfio-pci"))
    if not vfio and "vfio-pci" in out:
        errors.append(f"{path} has no vfio-pci device ({_first_line(out['vfio-pci'][1])})")
    nohotplug = parse_properties(text("vfio-pci-nohotplug"))
    return QemuReport(
        binary=path,
        version=version,
        accelerators=accelerators,
        vfio_pci_properties=vfio,
        vfio_pci_nohotplug="vfio-pci-nohotplug" in devices,
        ramfb="ramfb" in nohotplug,
        displays=displays,
        spice="spice options:" in text("spice"),
        vnc="vnc options:" in text("vnc"),
        errors=errors,
    )
