"""A VM that boots from its CD-ROM (``boot = cdrom``): SeaBIOS, isolinux on the ISO, the Linux test guest."""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import Cli
from vgpuctl.base.state import StateDir
from vgpuctl.host import HostRoot
from vgpuctl.vm.linuxguest import LinuxGuest, build_iso, kernel_cmdline, read_report
from vgpuctl.vm.runtime import RuntimePaths, is_running, read_pid

BOOT_TIMEOUT_S = 120.0


@pytest.fixture
def state() -> Iterator[StateDir]:
    state = StateDir(Path(tempfile.mkdtemp(prefix="vgc-")))  # short: socket paths stay under 108 bytes
    yield state
    pid = read_pid(RuntimePaths.for_vm(state, "cd"))
    if pid and is_running(state, "cd"):  # its own QEMU, nothing else
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    shutil.rmtree(state.path, ignore_errors=True)


def test_a_vm_boots_the_linux_guest_from_its_cdrom(linux_guest: LinuxGuest, state: StateDir) -> None:
    token = secrets.token_hex(8)
    iso = build_iso(state.path / "boot.iso", {"token.txt": token.encode()}, boot=linux_guest,
                    append=kernel_cmdline(booted="cdrom"))
    cli = Cli(HostRoot(Path("/")), state.path)
    cli("vm", "create", "cd", "--no-vgpu", "--memory", "256", "--cpus", "1", "--boot", "cdrom", "--cdrom", str(iso),
        "--network", "none", "--display", "vnc", "--fast-boot")
    _, argv, _ = cli("vm", "argv", "cd", "--accel", "tcg")
    assert "-boot order=d,menu=off" in argv and "-kernel" not in argv  # the firmware boots the ISO
    cli("vm", "start", "cd", "--accel", "tcg")
    serial = RuntimePaths.for_vm(state, "cd").serial_log
    deadline = time.monotonic() + BOOT_TIMEOUT_S
    while "ready" not in (found := read_report(serial.read_text(errors="replace") if serial.exists() else "")):
        assert time.monotonic() < deadline, f"no ready report in {BOOT_TIMEOUT_S:.0f} s: {found}"
        time.sleep(0.2)
    assert found["kernel"] == [linux_guest.kernel_version]
    cmdline = found["cmdline"][0].split()
    assert "BOOT_IMAGE=/vmlinuz" in cmdline and "vgpuctl.booted=cdrom" in cmdline  # isolinux's own command line
    assert found["cdrom.token"] == [token]  # the guest mounted the CD it booted from
    assert {"isolinux.bin", "vmlinuz", "initrd.gz"} <= set(found["cdrom.files"][0].split())
    _, out, _ = cli("vm", "stop", "cd", "--timeout", "60")
    assert "the guest powered off" in out
