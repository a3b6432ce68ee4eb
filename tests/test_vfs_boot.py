"""VFs survive a reboot (sriov.md 6 pain 4, 8): install-units, VFs enabled (Intel: provisioned too) and a VM marked
autostart on one; the simulated host reboots (every VF gone); the installed units' commands run in the order
systemd would run them (from their After=/Before=), and the VF configuration is back before the VM starts on
real QEMU (TCG)."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import MountFn, new_vm
from vgpuctl.backends import sriov_nvidia
from vgpuctl.backends.vf_definitions import UNIT_NAME as VF_UNIT_NAME
from vgpuctl.base.state import StateDir
from vgpuctl.host import HostRoot
from vgpuctl.mdev.units import UNIT_NAME as MDEV_UNIT_NAME
from vgpuctl.vm import lifecycle
from vgpuctl.vm import spec as specs
from vgpuctl.vm.spec import VgpuRequest
from vgpuctl.vm.units import VM_UNIT_NAME

pytestmark = pytest.mark.fuse

VGPUCTL_BIN = Path(sys.executable).parent / "vgpuctl"  # the console script pip installed in this venv
UNITS_DIR = "/etc/systemd/system"
WANTS_DIR = f"{UNITS_DIR}/multi-user.target.wants"
MIB = 1 << 20


def unit_fields(root: HostRoot, name: str) -> dict[str, list[str]]:
    """key -> values of a unit file (space-separated lists split, as systemd reads After=/Before=)."""
    fields: dict[str, list[str]] = {}
    for line in root.read_text(f"{UNITS_DIR}/{name}").splitlines():
        key, sep, value = line.partition("=")
        if sep and not line.startswith("#"):
            fields.setdefault(key.strip(), []).extend(value.split() if key in ("After", "Before", "Wants")
                                                      else [value.strip()])
    return fields


def boot_order(root: HostRoot) -> list[str]:
    """The enabled units in the order systemd starts them: a topological sort of their After=/Before= edges."""
    enabled = sorted(root.listdir(WANTS_DIR))
    fields = {name: unit_fields(root, name) for name in enabled}
    after = {name: {a for a in fields[name].get("After", []) if a in fields} for name in enabled}
    for name in enabled:
        for later in fields[name].get("Before", []):
            if later in after:
                after[later].add(name)
    order: list[str] = []
    while len(order) < len(enabled):
        ready = [n for n in enabled if n not in order and after[n] <= set(order)]
        assert ready, f"an ordering cycle among {enabled}"
        order.append(ready[0])
    return order


class Host:
    def __init__(self, root: HostRoot, state: StateDir) -> None:
        self.root, self.state = root, state
        self.env = {**os.environ, "VGPUCTL_ROOT": str(root.root), "VGPUCTL_STATE_DIR": str(state.path)}

    def run(self, argv: list[str]) -> subprocess.CompletedProcess[str]:
        return subprocess.run(argv, capture_output=True, text=True, env=self.env, timeout=180)

    def vgpuctl(self, *args: str) -> str:
        done = self.run([str(VGPUCTL_BIN), *args])
        assert done.returncode == 0, (args, done.stdout, done.stderr)
        return done.stdout

    def reboot(self) -> None:
        shown = self.vgpuctl("sim", "ctl", str(self.root.root), "reboot")
        assert shown.startswith("reboot: done (boot 2"), shown

    def boot(self, until: str | None = None) -> list[str]:
        """Run each enabled unit's ExecStart in boot order (up to ``until``, not included); the units it ran.
        The VM unit's ``vm autostart`` gets ``--accel tcg``: this machine's /dev/kvm runs no guest."""
        ran = []
        for name in boot_order(self.root):
            if name == until:
                break
            for command in unit_fields(self.root, name)["ExecStart"]:
                argv = shlex.split(command) + (["--accel", "tcg"] if name == VM_UNIT_NAME else [])
                done = self.run(argv)
                assert done.returncode == 0, (name, done.stdout, done.stderr)
            ran.append(name)
        return ran

    def doctor(self, check: str) -> dict[str, str]:
        done = self.run([str(VGPUCTL_BIN), "doctor", "--json", "--no-guest", "--qemu", "/nonexistent/qemu"])
        return {c["id"]: c for c in json.loads(done.stdout)["checks"]}[check]

    def listed(self) -> dict[str, dict[str, object]]:
        return {row["pf"]: row for row in json.loads(self.vgpuctl("vfs", "list", "--json"))["pfs"]}


def autostart_vm(state: StateDir, guest: Path, name: str, request: VgpuRequest) -> None:
    new_vm(state, name, guest)
    spec = specs.load(state, name)
    spec.vgpu, spec.vgpu_display, spec.ramfb, spec.autostart = request, False, False, True
    specs.save(state, spec)


def driver(root: HostRoot, address: str) -> str:
    return root.readlink(f"/sys/bus/pci/devices/{address}/driver").rsplit("/", 1)[-1]


@pytest.fixture
def bin_present() -> None:
    if not VGPUCTL_BIN.is_file():
        pytest.fail(f"{VGPUCTL_BIN} is missing: install vgpuctl into the venv (make deps)")


def test_intel_vfs_and_their_quotas_are_back_before_the_vm_starts(mount_host: MountFn, state: StateDir, guest: Path,
                                                                   bin_present: None) -> None:
    pf, vf1 = "0000:00:02.0", "0000:00:02.1"
    host = Host(mount_host("adl-sriov"), state)
    root = host.root
    host.vgpuctl("install-units")
    assert boot_order(root) == [VF_UNIT_NAME, MDEV_UNIT_NAME, VM_UNIT_NAME]
    host.vgpuctl("vfs", "provision", pf, "--vf", "1-2", "--ggtt", "1G", "--contexts", "8192", "--doorbells", "32")
    host.vgpuctl("vfs", "enable", pf, "2")
    assert host.doctor("sriov-boot")["status"] == "ok"  # the doctor sees the VF unit install-units enabled
    autostart_vm(state, guest, "boot-vf", VgpuRequest(vf=pf))

    host.reboot()
    assert root.read_value(f"/sys/bus/pci/devices/{pf}/sriov_numvfs") == "0"  # VFs are runtime state
    # Without the VF unit the VM cannot start: the boot the users of sriov.md 6 pain 4 have.
    alone = host.run([str(VGPUCTL_BIN), "vm", "autostart", "--accel", "tcg"])
    assert alone.returncode == 1 and "has no VFs enabled" in alone.stdout + alone.stderr, alone
    assert lifecycle.status(root, state, "boot-vf").state == "stopped"

    assert host.boot(until=VM_UNIT_NAME) == [VF_UNIT_NAME, MDEV_UNIT_NAME]
    row = host.listed()[pf]
    assert row["enabled_vfs"] == 2 and row["enabled_by_vgpuctl"]
    assert row["quotas"] == {n: {"ggtt": 1 << 30, "contexts": 8192, "doorbells": 32} for n in ("1", "2")}
    assert [driver(root, vf) for vf in (vf1, "0000:00:02.2")] == ["vfio-pci", "vfio-pci"]  # never i915
    assert root.read_value(f"/sys/bus/pci/devices/{pf}/sriov_drivers_autoprobe") == "1"
    try:
        host.boot()  # the whole boot again: the VF unit finds everything as defined, the VM unit starts the VM
        status = lifecycle.status(root, state, "boot-vf")
        assert status.state == "running" and status.vgpu == vf1
        vfs = {vf["address"]: vf["vm"] for vf in host.listed()[pf]["vfs"]}  # type: ignore[union-attr]
        assert vfs == {vf1: "boot-vf", "0000:00:02.2": None}
    finally:
        if lifecycle.status(root, state, "boot-vf").state != "stopped":
            lifecycle.stop(root, state, "boot-vf", timeout_s=10)


def test_nvidia_vfs_are_back_by_sriov_manage_before_the_vm_starts(mount_host: MountFn, state: StateDir,
                                                                   guest: Path, bin_present: None) -> None:
    pf = "0000:41:00.0"
    host = Host(mount_host("l40s-vfio"), state)
    root = host.root
    host.vgpuctl("install-units")
    host.vgpuctl("vfs", "enable", pf)
    assert host.doctor("nvidia-boot")["status"] == "ok"
    autostart_vm(state, guest, "boot-nv", VgpuRequest(vf=pf, type="1159"))

    host.reboot()
    assert root.read_value(f"/sys/bus/pci/devices/{pf}/sriov_numvfs") == "0"
    assert host.boot(until=VM_UNIT_NAME) == [VF_UNIT_NAME, MDEV_UNIT_NAME]
    row = host.listed()[pf]
    assert row["enabled_vfs"] == 32 and row["enabled_by_vgpuctl"]
    first = "0000:41:00.4"
    assert driver(root, first) == "nvidia"  # vendor VFs stay on nvidia (sriov.md 3.4)
    try:
        host.boot()
        status = lifecycle.status(root, state, "boot-nv")
        assert status.state == "running" and status.vgpu == first
        assert sriov_nvidia.current_type(root, first) == 1159  # the type is set at VM start, not restored
    finally:
        if lifecycle.status(root, state, "boot-nv").state != "stopped":
            lifecycle.stop(root, state, "boot-nv", timeout_s=10)
    deadline = time.monotonic() + 20  # released after QEMU ends
    while sriov_nvidia.current_type(root, first) != 0:
        assert time.monotonic() < deadline, "the VF's type was not released"
        time.sleep(0.1)
