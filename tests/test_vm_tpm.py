"""A VM's TPM 2.0 works by itself: ``vm start`` runs swtpm for it (QEMU's emulator backend on tpm-crb, under
TCG with the test guest), swtpm goes with QEMU (stop, kill, a failed start, a start killed half-way), and the
TPM's state stays from start to start until ``vm rm``.

swtpm is counted straight from /proc (processes named swtpm whose command line names the VM's runtime
directory), not through vgpuctl.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import new_vm, processes_naming, wait_for
from vgpuctl.base.state import StateDir
from vgpuctl.host import HostRoot
from vgpuctl.vm import inventory, lifecycle
from vgpuctl.vm import spec as specs
from vgpuctl.vm.runtime import RuntimePaths

VM = "tpm"


def tpm_vm(state: StateDir, guest: Path) -> RuntimePaths:
    new_vm(state, VM, guest)
    spec = specs.load(state, VM)
    spec.tpm = True
    specs.save(state, spec)
    return RuntimePaths.for_vm(state, VM)


def swtpms(paths: RuntimePaths) -> list[int]:
    """The live swtpm processes whose command line names the VM's runtime directory."""
    found = []
    for pid in processes_naming(paths.directory):
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if os.path.basename(argv[0]) == b"swtpm":
            found.append(pid)
    return found


def test_start_runs_swtpm_and_qemu_has_the_tpm_until_stop_kill_and_rm(host: HostRoot, state: StateDir,
                                                                       guest: Path) -> None:
    paths = tpm_vm(state, guest)
    assert lifecycle.start(host, state, VM, accel="tcg").state == "running"
    (tpm,) = lifecycle.qmp(paths, "query-tpm")
    assert tpm["model"] == "tpm-crb" and tpm["options"]["type"] == "emulator", tpm
    assert tpm["options"]["data"]["chardev"] == "chrtpm", tpm  # the chardev on swtpm's socket
    assert len(swtpms(paths)) == 1
    assert paths.tpm_state.stat().st_mode & 0o777 == 0o700
    state_files = sorted(p.name for p in paths.tpm_state.iterdir())
    assert state_files, "swtpm keeps no state"  # libtpms writes its NV state when QEMU initialises the TPM
    inode = paths.tpm_state.stat().st_ino

    lifecycle.stop(host, state, VM, timeout_s=2)
    assert swtpms(paths) == [] and lifecycle.status(host, state, VM).pid is None

    # A restart: the same state directory, its files kept (the guest's keys), a new swtpm on it.
    lifecycle.start(host, state, VM, accel="tcg")
    assert paths.tpm_state.stat().st_ino == inode
    assert set(state_files) <= {p.name for p in paths.tpm_state.iterdir()}
    assert len(swtpms(paths)) == 1
    lifecycle.kill(host, state, VM)
    assert swtpms(paths) == []
    assert paths.tpm_state.is_dir()

    # QEMU ending without vgpuctl (a crash, a guest power-off): swtpm ends with its connection (--terminate).
    qemu = lifecycle.start(host, state, VM, accel="tcg").pid
    assert qemu is not None and len(swtpms(paths)) == 1
    os.kill(qemu, signal.SIGKILL)
    wait_for(lambda: swtpms(paths) == [])

    inventory.remove(host, state, VM)
    assert not paths.tpm_state.exists() and not paths.directory.exists()


def test_a_failed_start_leaves_no_swtpm(host: HostRoot, state: StateDir, guest: Path) -> None:
    paths = tpm_vm(state, guest)
    with pytest.raises(lifecycle.VmError, match="exited at start"):  # a "QEMU" that exits at once
        lifecycle.start(host, state, VM, accel="tcg", qemu="/bin/false")
    assert swtpms(paths) == []


@pytest.mark.parametrize("point", ["vm-start:swtpm-started", "vm-start:recorded"])
def test_a_start_killed_after_swtpm_started_leaves_nothing_that_kill_start_and_rm_do_not_end(
        host: HostRoot, state: StateDir, guest: Path, point: str) -> None:
    paths = tpm_vm(state, guest)
    env = {**os.environ, "VGPUCTL_ROOT": str(host.root), "VGPUCTL_STATE_DIR": str(state.path)}
    env.pop("VGPUCTL_CRASH_TRACE", None)

    def crash() -> None:
        run = subprocess.run([sys.executable, "-m", "vgpuctl", "vm", "start", VM, "--accel", "tcg"],
                             capture_output=True, text=True, timeout=60, env={**env, "VGPUCTL_CRASH_AT": point})
        assert run.returncode == -signal.SIGKILL, run.stderr
        assert len(swtpms(paths)) == 1  # no QEMU has connected: --terminate does not end it
        for record in (paths.swtpm_pidfile, paths.directory / "run.json"):  # found whatever the files say
            record.unlink(missing_ok=True)

    crash()
    assert "swtpm" in lifecycle.kill(host, state, VM).detail
    assert swtpms(paths) == []

    crash()
    lifecycle.start(host, state, VM, accel="tcg")  # ends the stale swtpm, runs its own
    assert len(swtpms(paths)) == 1
    lifecycle.kill(host, state, VM)
    assert swtpms(paths) == []

    crash()
    inventory.remove(host, state, VM)
    assert swtpms(paths) == [] and not paths.directory.exists()


def test_without_swtpm_a_tpm_vm_does_not_start_and_says_what_to_do(host: HostRoot, state: StateDir,
                                                                  guest: Path, tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    tpm_vm(state, guest)
    qemu = lifecycle.default_qemu()
    monkeypatch.setenv("PATH", str(tmp_path))  # no swtpm on it
    with pytest.raises(lifecycle.VmError) as refused:
        lifecycle.start(host, state, VM, accel="tcg", qemu=qemu)
    assert "apt-get install swtpm swtpm-tools" in str(refused.value) and "--no-tpm" in str(refused.value)
