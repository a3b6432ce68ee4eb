"""VMs that nothing loses track of: vgpuctl killed (SIGKILL) at every step of ``vm start/stop/kill/rm``
on real QEMU (TCG, the test guest) never leaves a QEMU that vgpuctl cannot see, a second QEMU for one VM,
or a half-written file; and the next command works.

The steps come from the commands themselves (``VGPUCTL_CRASH_TRACE``): the VM's own (``vm-*``) and those
of what they call (the ownership journal, atomic writes; ``NAME#N`` for the N-th time a point is reached).
Each is then crashed at (``VGPUCTL_CRASH_AT``) in a subprocess, and QEMU is counted straight from /proc.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from itertools import pairwise
from pathlib import Path

import pytest

from tests.conftest import dominant, new_vm, screen, wait_for
from vgpuctl.base.errors import Conflict
from vgpuctl.base.state import StateDir
from vgpuctl.host import HostRoot
from vgpuctl.mdev.sysfs import active_devices
from vgpuctl.vm import inventory, lifecycle
from vgpuctl.vm import spec as specs
from vgpuctl.vm.runtime import RuntimePaths, vm_vgpu_uuid

pytestmark = pytest.mark.fuse
VM = "crash"
# The lifecycle tests' fixtures: the test guest, a short state dir (killing its QEMUs at the end), a host.


def qemus_and_shells(state: StateDir, name: str = VM) -> tuple[list[int], list[int]]:
    """The pids of the VM's QEMUs and of the shells they run under, read from /proc: every process whose
    command line has ``-pidfile <the VM's pidfile>``; the shell is the one run as ``/bin/sh -c``."""
    pidfile = os.fsencode(RuntimePaths.for_vm(state, name).pidfile)
    qemus, shells = [], []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            argv = Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if any(a == b"-pidfile" and b == pidfile for a, b in pairwise(argv)):
            (shells if argv[:2] == [b"/bin/sh", b"-c"] else qemus).append(int(entry))
    return qemus, shells


def settled(state: StateDir) -> bool:
    """No shell is between forking and exec'ing QEMU: QEMU runs, or nothing does."""
    qemus, shells = qemus_and_shells(state)
    return bool(qemus) or not shells


class Vgpuctl:
    """``python -m vgpuctl vm ...`` as a process of its own, as a user (or a crash) would run it."""

    def __init__(self, host: HostRoot, state: StateDir) -> None:
        self.env = {**os.environ, "VGPUCTL_ROOT": str(host.root), "VGPUCTL_STATE_DIR": str(state.path)}
        for key in ("VGPUCTL_CRASH_AT", "VGPUCTL_CRASH_TRACE"):
            self.env.pop(key, None)

    def __call__(self, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "vgpuctl", "vm", *args], capture_output=True, text=True,
                              env={**self.env, **env}, timeout=60)

    def crash(self, args: tuple[str, ...], point: str) -> int:
        """Run ``args`` until it is killed at ``point``; its pid (the temp files it may leave are named by it)."""
        run = subprocess.Popen([sys.executable, "-m", "vgpuctl", "vm", *args], stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE, text=True, env={**self.env, "VGPUCTL_CRASH_AT": point})
        _, err = run.communicate(timeout=60)
        assert run.returncode == -signal.SIGKILL, (point, run.returncode, err)
        return run.pid


def occurrences(trace: Path) -> list[str]:
    """The crash points of a trace (``NAME TIME`` lines) as VGPUCTL_CRASH_AT names them: ``NAME#N`` from
    the second time on."""
    seen: dict[str, int] = {}
    points = []
    for line in trace.read_text().splitlines():
        name = line.split()[0]
        seen[name] = seen.get(name, 0) + 1
        points.append(name if seen[name] == 1 else f"{name}#{seen[name]}")
    return points


# Each command as the crash runs give it: "stop" of a guest that powers off at the power button (its picture
# is up: it has set ACPI up), "stop-paused" of a paused one (QEMU is told to quit at once).
COMMANDS = {"start": ("start", VM, "--accel", "tcg"), "stop": ("stop", VM, "--timeout", "20"),
            "stop-paused": ("stop", VM), "kill": ("kill", VM), "rm": ("rm", VM)}


@pytest.fixture
def cli(host: HostRoot, state: StateDir) -> Vgpuctl:
    return Vgpuctl(host, state)


def prepare(host: HostRoot, state: StateDir, guest: Path, command: str, shots: Path) -> None:
    """The VM as ``command`` finds it: stopped without a vGPU for a start (which then makes one), running
    for stop (with its picture up) and kill, paused for stop-paused, stopped with its vGPU for rm (which then
    releases it)."""
    if not specs.exists(state, VM):
        new_vm(state, VM, guest)
    if lifecycle.status(host, state, VM).pid is not None:
        lifecycle.kill(host, state, VM)
    if command == "start":
        lifecycle.release_vgpu(host, state, VM)
        return
    lifecycle.start(host, state, VM, accel="tcg")
    if command == "stop":
        wait_for(lambda: dominant(screen(state, VM, shots)) == "blue")
    if command == "stop-paused":
        lifecycle.qmp(RuntimePaths.for_vm(state, VM), "stop")
    if command == "rm":
        lifecycle.kill(host, state, VM)


def test_every_step_of_start_stop_kill_and_rm_survives_a_crash(host: HostRoot, state: StateDir,
                                                               guest: Path, cli: Vgpuctl,
                                                               tmp_path: Path) -> None:
    prepare(host, state, guest, "kill", tmp_path)  # a first start: it probes QEMU and caches the answer for the others
    steps: dict[str, list[str]] = {}
    for command, args in COMMANDS.items():  # the crash points each command reaches, in order
        prepare(host, state, guest, command, tmp_path)
        trace = tmp_path / f"trace-{command}"
        done = cli(*args, VGPUCTL_CRASH_TRACE=str(trace))
        assert done.returncode == 0, (command, done.stderr)
        steps[command] = occurrences(trace)
    mine = {command: [p for p in points if p.startswith("vm-")] for command, points in steps.items()}
    assert mine["start"] == ["vm-start:locked", "vm-start:vgpu-created", "vm-start:recorded", "vm-start:spawned",
                              "vm-start:recorded-shell", "vm-start:running", "vm-start:recorded-qemu"]
    assert mine["stop-paused"] == ["vm-stop:locked", "vm-stop:quit-sent", "vm-stop:gone"]
    assert mine["kill"] == ["vm-kill:locked", "vm-kill:killed", "vm-kill:gone"]
    assert mine["rm"] == ["vm-rm:locked", "vm-rm:vgpu-released", "vm-rm:runtime-removed"]
    assert "atomic-write:before-rename#2" in steps["start"]  # run.json and the journal are written mid-start
    assert mine["stop"] == ["vm-stop:locked", "vm-stop:powerdown-sent", "vm-stop:gone"]

    for command, points in steps.items():
        for point in points:
            prepare(host, state, guest, command, tmp_path)
            killed = cli.crash(COMMANDS[command], point)
            check_after_crash(host, state, point, killed)


def check_after_crash(host: HostRoot, state: StateDir, point: str, killed: int) -> None:
    wait_for(lambda: settled(state))
    if point == "vm-stop:powerdown-sent":  # the guest got the button: it powers off by itself
        wait_for(lambda: qemus_and_shells(state) == ([], []))
    qemus, _ = qemus_and_shells(state)
    assert len(qemus) <= 1, (point, qemus)
    # Nothing half-written under a real name; the only litter is a temp file of the killed writer's, which
    # the next write of that file sweeps.
    for path in state.path.rglob("*"):
        if path.name.endswith(".tmp"):
            assert f".{killed}." in path.name, (point, path)
        elif path.suffix == ".json":
            json.loads(path.read_text())
        elif path.suffix == ".toml":
            specs.load(state, path.stem)
    if not specs.exists(state, VM):  # an rm that had finished its work: the VM and its vGPU are gone
        assert point.startswith("vm-rm:") and not qemus
        return
    now = lifecycle.status(host, state, VM)
    if qemus:
        assert now.pid == qemus[0] and now.state in ("running", "paused", "shutdown"), (point, now)
        with pytest.raises(Conflict, match="already"):  # never a second QEMU
            lifecycle.start(host, state, VM, accel="tcg")
        assert qemus_and_shells(state)[0] == qemus, point
        lifecycle.kill(host, state, VM)
    else:
        assert now.pid is None and now.state in ("stopped", "crashed"), (point, now)
    assert qemus_and_shells(state) == ([], []), point
    if point.startswith("vm-rm:"):  # the next command: the remove again, which finishes the job
        inventory.remove(host, state, VM)
        assert vm_vgpu_uuid(VM) not in {d.uuid for d in active_devices(host)}
    else:  # the next command: a start, which must run exactly one QEMU
        assert lifecycle.start(host, state, VM, accel="tcg").state == "running", point
        assert len(qemus_and_shells(state)[0]) == 1, point
        lifecycle.kill(host, state, VM)
    assert qemus_and_shells(state) == ([], []), point


def test_a_qemu_whose_state_files_are_gone_is_still_found_and_not_doubled(state: StateDir, guest: Path,
                                                                          cli: Vgpuctl) -> None:
    new_vm(state, VM, guest)
    assert cli(*COMMANDS["start"]).returncode == 0
    (qemu,) = qemus_and_shells(state)[0]
    # Whatever the state files say (a start killed before it wrote them, or someone removed them): without
    # run.json and the pidfile the VM's QEMU is still found, by its command line.
    paths = RuntimePaths.for_vm(state, VM)
    for record in (paths.directory / "run.json", paths.pidfile):
        record.unlink()
    status = cli("status", VM, "--json")
    assert status.returncode == 0 and f'"pid": {qemu}' in status.stdout and '"state": "running"' in status.stdout
    again = cli(*COMMANDS["start"])
    assert again.returncode == 1 and "already running" in again.stderr
    assert qemus_and_shells(state)[0] == [qemu]  # no second QEMU
    refused = cli("rm", VM)
    assert refused.returncode == 1 and "stop it first" in refused.stderr and specs.exists(state, VM)
    killed = cli("kill", VM)
    assert killed.returncode == 0, killed.stderr
    assert qemus_and_shells(state) == ([], [])
    assert cli("status", VM).stdout.startswith(f"{VM}: stopped")


def test_rm_waits_for_the_vms_lock_and_releases_the_vgpu_made_for_it(host: HostRoot, state: StateDir,
                                                                     guest: Path, cli: Vgpuctl) -> None:
    new_vm(state, VM, guest)
    lifecycle.start(host, state, VM, accel="tcg")
    lifecycle.kill(host, state, VM)
    assert vm_vgpu_uuid(VM) in {d.uuid for d in active_devices(host)}  # kept for the next start
    # While a start (here: the test) holds the VM's lock, rm waits for it instead of removing under it.
    with state.lock(f"vm-{VM}"):
        rm = subprocess.Popen([sys.executable, "-m", "vgpuctl", "vm", "rm", VM], env=cli.env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        wait_for(lambda: waits_for_a_lock(rm.pid) or rm.poll() is not None)
        assert rm.poll() is None and specs.exists(state, VM)
    _, err = rm.communicate(timeout=30)
    assert rm.returncode == 0, err
    assert not specs.exists(state, VM)
    assert vm_vgpu_uuid(VM) not in {d.uuid for d in active_devices(host)}  # released, not left active


def waits_for_a_lock(pid: int) -> bool:
    """``pid`` is blocked in flock (/proc/locks lists a waiter as '-> FLOCK ...')."""
    with contextlib.suppress(OSError):
        return any(line.split()[1:3] == ["->", "FLOCK"] and line.split()[5] == str(pid)
                   for line in Path("/proc/locks").read_text().splitlines())
    return False


@pytest.fixture(autouse=True)
def _no_stray_qemu(state: StateDir) -> Iterator[None]:
    yield
    qemus, shells = qemus_and_shells(state)
    for pid in qemus + shells:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
