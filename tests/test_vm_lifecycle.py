"""VMs on real QEMU with the project's test guest, on a mounted simulated host.

Accelerator: whatever the KVM probe decides; on the machines our tests and CI run on that is TCG
(/dev/kvm is KVM-PVM there), and test_accelerator_is_decided_by_the_probe says so.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import GVT_PARENT, dominant, new_vm, screen, wait_for
from vgpuctl.base.errors import CapacityError, Conflict
from vgpuctl.base.state import StateDir
from vgpuctl.host import HostRoot
from vgpuctl.host.kvm import probe_kvm
from vgpuctl.mdev.sysfs import active_devices
from vgpuctl.vm import lifecycle
from vgpuctl.vm import spec as specs
from vgpuctl.vm.qmp import QmpError
from vgpuctl.vm.runtime import RuntimePaths, vm_vgpu_uuid

pytestmark = pytest.mark.fuse



def test_start_screenshot_key_stop_and_the_vgpu_is_reused(host: HostRoot, state: StateDir, guest: Path,
                                                          tmp_path: Path) -> None:
    new_vm(state, "car1", guest)
    started = lifecycle.start(host, state, "car1", accel="tcg")
    try:
        assert started.state == "running" and started.qmp_status == "running" and started.accel == "tcg"
        assert started.vgpu == vm_vgpu_uuid("car1")
        assert started.simulated_display == "emulated VGA 1024x768"
        assert [(d.uuid, d.type_id) for d in active_devices(host)] == [(started.vgpu, "i915-GVTg_V5_8")]
        wait_for(lambda: dominant(screen(state, "car1", tmp_path)) == "blue")  # the guest's picture
        png = lifecycle.screenshot(host, state, "car1", tmp_path / "shot.png")
        header = png.read_bytes()[:24]
        assert header[:8] == b"\x89PNG\r\n\x1a\n" and struct.unpack(">II", header[16:24]) == (1024, 768)
        paths = RuntimePaths.for_vm(state, "car1")
        lifecycle.qmp(paths, "send-key", {"keys": [{"type": "qcode", "data": "a"}]})
        wait_for(lambda: dominant(screen(state, "car1", tmp_path)) == "red")  # the guest reacted
        with pytest.raises(Conflict, match="already running"):
            lifecycle.start(host, state, "car1", accel="tcg")
    finally:
        stopped = lifecycle.stop(host, state, "car1", timeout_s=10)
    assert stopped.state == "stopped" and stopped.detail == "the guest powered off"  # by ACPI, not quit
    assert lifecycle.status(host, state, "car1").state == "stopped"
    with pytest.raises(Conflict, match="not running"):
        lifecycle.stop(host, state, "car1")
    # The vGPU stays and is reused, not churned (GVT-g fragments its graphics memory).
    assert [d.uuid for d in active_devices(host)] == [started.vgpu]
    again = lifecycle.start(host, state, "car1", accel="tcg")
    assert again.vgpu == started.vgpu and len(active_devices(host)) == 1
    lifecycle.kill(host, state, "car1")
    assert lifecycle.release_vgpu(host, state, "car1") == started.vgpu
    assert active_devices(host) == []


def test_guest_power_off_kill_and_crash_are_told_apart(host: HostRoot, state: StateDir, guest: Path,
                                                        tmp_path: Path) -> None:
    new_vm(state, "vm1", guest)
    running = lifecycle.start(host, state, "vm1", accel="tcg")
    # The guest clears a power-button press that comes before it set ACPI up: wait for its picture.
    wait_for(lambda: dominant(screen(state, "vm1", tmp_path)) == "blue")
    # The guest powers off by itself, so fast under load that QEMU may quit before it answers.
    with contextlib.suppress(QmpError):
        lifecycle.qmp(RuntimePaths.for_vm(state, "vm1"), "system_powerdown")
    wait_for(lambda: lifecycle.status(host, state, "vm1").state != "running")
    off = lifecycle.status(host, state, "vm1")
    assert off.state == "stopped" and off.detail == "the guest powered off"

    lifecycle.start(host, state, "vm1", accel="tcg")
    killed = lifecycle.kill(host, state, "vm1")
    assert killed.state == "stopped" and killed.detail == "killed"
    assert lifecycle.status(host, state, "vm1").state == "stopped"

    crashing = lifecycle.start(host, state, "vm1", accel="tcg")
    assert crashing.pid and crashing.pid != running.pid
    os.kill(crashing.pid, signal.SIGSEGV)  # QEMU dies on its own
    wait_for(lambda: lifecycle.status(host, state, "vm1").state == "crashed")
    crashed = lifecycle.status(host, state, "vm1")
    assert "139" in crashed.detail  # 128 + SIGSEGV, kept by the shell QEMU runs under
    assert crashed.vgpu == vm_vgpu_uuid("vm1")
    restarted = lifecycle.start(host, state, "vm1", accel="tcg")  # a crashed VM starts again
    assert restarted.state == "running"
    lifecycle.kill(host, state, "vm1")


def test_a_vm_outlives_vgpuctl_and_the_cli_reattaches(host: HostRoot, state: StateDir, guest: Path) -> None:
    new_vm(state, "web", guest, profile="streaming")
    env = {**os.environ, "VGPUCTL_ROOT": str(host.root), "VGPUCTL_STATE_DIR": str(state.path)}

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "vgpuctl", "vm", *args], capture_output=True, text=True,
                              env=env, timeout=60)

    started = cli("start", "web", "--accel", "tcg")
    assert started.returncode == 0, started.stderr
    assert "web: running" in started.stdout and "emulated VGA 1920x1200" in started.stdout
    run = json.loads((RuntimePaths.for_vm(state, "web").directory / "run.json").read_text())
    assert "-chardev" in run["argv"] and "-qmp" not in run["argv"]  # QEMU got its QMP socket pre-opened
    status = cli("status", "web", "--json")  # a new process finds the VM through its socket and pidfile
    info = json.loads(status.stdout)
    assert info["state"] == "running" and info["accel"] == "tcg"
    assert info["console"]["vnc"].startswith("unix:")
    refused = cli("rm", "web")
    assert refused.returncode == 1 and "running" in refused.stderr
    again = cli("start", "web")
    assert again.returncode == 1 and "already running" in again.stderr
    argv = cli("argv", "web", "--accel", "tcg")
    assert "-device VGA,id=hostdev0,xres=1920,yres=1200" in argv.stdout and "simulated host" in argv.stdout
    assert "-qmp unix:" in argv.stdout  # the command line a user can run by hand
    stopped = cli("stop", "web")
    assert stopped.returncode == 0 and "web: stopped" in stopped.stdout
    assert cli("stop", "web").returncode == 1


def test_seven_vms_share_a_1g_aperture_gpu_and_the_eighth_is_refused(host: HostRoot, state: StateDir,
                                                                     guest: Path) -> None:
    names = [f"car{i}" for i in range(8)]
    for name in names:
        new_vm(state, name, guest)  # automotive: 1024x768, the smallest GVT-g type
    try:
        for name in names[:7]:
            assert lifecycle.start(host, state, name, accel="tcg").state == "running"
        assert len(active_devices(host)) == 7
        with pytest.raises(CapacityError, match="full"):
            lifecycle.start(host, state, names[7], accel="tcg")
        assert lifecycle.status(host, state, names[7]).state == "stopped"
    finally:
        for name in names[:7]:
            if lifecycle.status(host, state, name).pid:
                lifecycle.kill(host, state, name)


def test_accelerator_is_decided_by_the_probe(host: HostRoot, state: StateDir, guest: Path) -> None:
    report = probe_kvm(HostRoot(Path("/")))
    new_vm(state, "probe", guest)
    started = lifecycle.start(host, state, "probe")  # accel auto
    try:
        assert started.accel == ("kvm" if report.guest_runs else "tcg")
    finally:
        lifecycle.kill(host, state, "probe")
    cached = json.loads((state.path / "kvm-probe.json").read_text())
    assert cached["answer"]["accel"] == started.accel


def test_qemu_that_fails_at_start_is_reported_with_its_log(host: HostRoot, state: StateDir, guest: Path) -> None:
    new_vm(state, "bad", guest)
    spec = specs.load(state, "bad")
    spec.extra_args = ["-device", "no-such-device"]
    specs.save(state, spec)
    with pytest.raises(lifecycle.VmError, match="no-such-device"):
        lifecycle.start(host, state, "bad", accel="tcg")
    assert lifecycle.status(host, state, "bad").state == "crashed"
    assert GVT_PARENT in {d.parent for d in active_devices(host)}  # its vGPU stays for the next try


def test_autostart_starts_the_marked_vms_in_order_and_carries_on_past_a_failure(
        host: HostRoot, state: StateDir, guest: Path) -> None:
    for name, order in (("rear", 2), ("cluster", 1), ("spare", None), ("broken", 0)):
        new_vm(state, name, guest)  # automotive: autostart, order 1
        spec = specs.load(state, name)
        spec.order, spec.autostart = order, name != "spare"
        if name == "broken":
            spec.extra_args = ["-device", "no-such-device"]
        specs.save(state, spec)
    (state.path / "vms" / "dir.toml").mkdir()  # not a spec: reported, and the others still start
    results = lifecycle.autostart(host, state, accel="tcg")
    assert [(r.name, r.outcome) for r in results] == [("dir", "failed"), ("broken", "failed"),
                                                      ("cluster", "started"), ("rear", "started")]
    assert "dir.toml: cannot be read as a spec" in results[0].detail
    assert "no-such-device" in results[1].detail
    runs = {name: json.loads((RuntimePaths.for_vm(state, name).directory / "run.json").read_text())
            for name in ("cluster", "rear")}
    assert runs["cluster"]["started"] < runs["rear"]["started"]  # one after the other, in their order
    assert lifecycle.status(host, state, "spare").state == "stopped"
    again = subprocess.run([sys.executable, "-m", "vgpuctl", "vm", "autostart", "--accel", "tcg"], text=True,
                           capture_output=True, timeout=60,
                           env={**os.environ, "VGPUCTL_ROOT": str(host.root), "VGPUCTL_STATE_DIR": str(state.path)})
    assert again.returncode == 1  # broken still fails; the others are left running as they are
    assert "cluster: already running" in again.stdout and "rear: already running" in again.stdout
    assert "broken: failed" in again.stdout
    stopped = lifecycle.autostop(host, state, timeout_s=2)  # at shutdown: the reverse order (ACPI, then quit)
    assert [(r.name, r.outcome) for r in stopped] == [("dir", "failed"), ("rear", "stopped"),
                                                      ("cluster", "stopped")], stopped
    assert {lifecycle.status(host, state, n).state for n in ("rear", "cluster", "spare")} == {"stopped"}


def test_a_vgpu_not_kept_is_removed_however_qemu_ends(host: HostRoot, state: StateDir, guest: Path) -> None:
    new_vm(state, "temp", guest)
    spec = specs.load(state, "temp")
    spec.vgpu.keep = False
    specs.save(state, spec)
    assert "keep = false" in specs.spec_path(state, "temp").read_text()
    uuid = vm_vgpu_uuid("temp")

    def vgpu_gone() -> bool:
        deadline = time.monotonic() + 15  # the shell runs 'vgpuctl vm release-vgpu' after QEMU
        while uuid in {d.uuid for d in active_devices(host)}:
            if time.monotonic() > deadline:
                return False
            time.sleep(0.1)
        return True

    lifecycle.start(host, state, "temp", accel="tcg")
    assert uuid in {d.uuid for d in active_devices(host)}
    lifecycle.stop(host, state, "temp", timeout_s=1)  # ACPI, then quit: the guest may not have set ACPI up yet
    assert vgpu_gone()
    lifecycle.start(host, state, "temp", accel="tcg")  # a new one is made at the next start
    pid = lifecycle.status(host, state, "temp").pid
    assert pid and uuid in {d.uuid for d in active_devices(host)}
    os.kill(pid, signal.SIGKILL)  # a crash
    assert vgpu_gone()
    assert lifecycle.status(host, state, "temp").state == "crashed"
    # The default keeps it: 'car' gets its vGPU back after a stop.
    new_vm(state, "car", guest)
    lifecycle.start(host, state, "car", accel="tcg")
    lifecycle.stop(host, state, "car", timeout_s=1)
    time.sleep(1.0)
    assert vm_vgpu_uuid("car") in {d.uuid for d in active_devices(host)}


def test_a_display_backend_qemu_lacks_is_refused_before_start(host: HostRoot, state: StateDir, guest: Path,
                                                              tmp_path: Path) -> None:
    # This machine's QEMU, except that its '-display help' leaves gtk out (as without qemu-system-gui).
    fake = tmp_path / "qemu-without-gtk"
    fake.write_text('#!/bin/sh\nprevious=""\nfor a in "$@"; do\n'
                    '  if [ "$previous" = -display ] && [ "$a" = help ]; then\n'
                    '    /usr/bin/qemu-system-x86_64 "$@" | grep -vx gtk; exit 0\n  fi\n  previous="$a"\ndone\n'
                    'exec /usr/bin/qemu-system-x86_64 "$@"\n')
    fake.chmod(0o755)
    new_vm(state, "local", guest)
    spec = specs.load(state, "local")
    spec.display.backend = "gtk"
    specs.save(state, spec)
    with pytest.raises(lifecycle.VmError, match=r"display backend gtk is not available.*qemu-system-gui"):
        lifecycle.start(host, state, "local", accel="tcg", qemu=str(fake))
    cached = json.loads((state.path / "qemu-probe.json").read_text())
    assert "gtk" not in cached["answer"]["available"] and "vnc" in cached["answer"]["available"]
    spec.display.backend = "vnc"  # one it has: starts, and the probe is not run again (the cache answers)
    specs.save(state, spec)
    answer = {"version": "x", "available": ["vnc"]}
    (state.path / "qemu-probe.json").write_text(json.dumps({**cached, "answer": answer}))
    assert lifecycle.start(host, state, "local", accel="tcg", qemu=str(fake)).state == "running"
    assert json.loads((state.path / "qemu-probe.json").read_text())["answer"]["version"] == "x"


def test_a_vgpu_in_use_by_a_running_vm_is_refused_to_another(host: HostRoot, state: StateDir, guest: Path) -> None:
    from vgpuctl.mdev.lifecycle import Manager
    from vgpuctl.vm.spec import VgpuRequest

    uuid = Manager(host, state).create(GVT_PARENT, "i915-GVTg_V5_8", "7c4e2d3a-1b2c-4d5e-8f90-a1b2c3d4e5f6")
    for name in ("first", "second"):
        new_vm(state, name, guest)
        spec = specs.load(state, name)
        spec.vgpu = VgpuRequest(uuid=uuid)
        specs.save(state, spec)
    lifecycle.start(host, state, "first", accel="tcg")
    (RuntimePaths.for_vm(state, "first").pidfile).unlink()  # found by its command line all the same
    with pytest.raises(lifecycle.VmError, match=f"vGPU {uuid} is in use by VM first"):
        lifecycle.start(host, state, "second", accel="tcg")
    lifecycle.kill(host, state, "first")
    assert lifecycle.start(host, state, "second", accel="tcg").state == "running"
    lifecycle.kill(host, state, "second")
