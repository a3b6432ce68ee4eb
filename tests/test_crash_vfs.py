"""Crash tests of vgpuctl vfs enable/disable (as tests/test_crash.py does for the mdev commands): killed at each
crash point, the next command settles what it left, the PF's autoprobe is back on, the VFs are vgpuctl's if
they are there, and vgpuctl can take them back without --force."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import Cli, MountFn
from vgpuctl.backends import sriov_intel
from vgpuctl.base.state import StateDir
from vgpuctl.host import HostRoot

pytestmark = pytest.mark.fuse

PF = "0000:00:02.0"
PRELIM = f"/sys/bus/pci/devices/{PF}/drm/card0/prelim_iov"
PROVISION = ["vfs", "provision", PF, "--vf", "1-2", "--ggtt", "512M", "--contexts", "1024", "--doorbells", "16"]


def run(root: HostRoot, state: Path, argv: list[str], **env: str) -> int:
    command = [sys.executable, "-m", "vgpuctl", "--root", str(root.root), "--state-dir", str(state), *argv]
    return subprocess.run(command, env={**os.environ, **env}, capture_output=True, timeout=60).returncode


def points(root: HostRoot, state: Path, argv: list[str], tmp: Path) -> list[str]:
    trace = tmp / "trace"
    assert run(root, state, argv, VGPUCTL_CRASH_TRACE=str(trace)) == 0
    names = [line.split()[0] for line in trace.read_text().splitlines()]
    seen: dict[str, int] = {}
    found = []
    for name in names:
        seen[name] = seen.get(name, 0) + 1
        found.append(f"{name}#{seen[name]}")
    return found


def numvfs(root: HostRoot) -> str:
    return root.path(f"/sys/bus/pci/devices/{PF}/sriov_numvfs").read_text().strip()


def check(root: HostRoot, state: Path, what: str) -> None:
    cli = Cli(root, state)
    listed = cli.json("vfs", "list")  # the next command succeeds and settles
    assert isinstance(listed, dict), what
    assert root.path(f"/sys/bus/pci/devices/{PF}/sriov_drivers_autoprobe").read_text() == "1\n", what
    ownership = sriov_intel.Journal(StateDir(state)).ownership()
    assert ownership.journal == [], (what, ownership.journal)
    if numvfs(root) != "0":
        assert PF in ownership.vfs, what  # VFs there are vgpuctl's
    cli("vfs", "disable", PF)  # and it takes them back without --force
    assert numvfs(root) == "0", what
    owned = state / "owned.json"
    assert not owned.exists() or json.loads(owned.read_text()).get("vfs", {}) == {}, what
    cli("vfs", "provision", PF, "--auto")  # quotas left are vgpuctl's: cleared without --force
    assert not (state / "vfs" / f"{PF}.json").exists(), what  # nothing is put back at the next boot
    assert root.read_value(f"{PRELIM}/vf1/gt0/ggtt_quota") == "0", what


@pytest.mark.parametrize("command", ["enable", "re-enable", "disable", "provision", "restore"])
def test_each_crash_point_of_vfs_commands(mount_host: MountFn, tmp_path: Path, command: str) -> None:
    root = mount_host("adl-sriov")
    argv = {"enable": ["vfs", "enable", PF, "2"], "re-enable": ["vfs", "enable", PF, "3"],
            "disable": ["vfs", "disable", PF], "provision": PROVISION, "restore": ["vfs", "restore"]}[command]

    def before(state: Path) -> None:
        cli = Cli(root, state)
        if command == "restore":  # provisioned and enabled, then the host reboots: restore puts it back
            cli(*PROVISION)
            cli("vfs", "enable", PF, "2")
            root.write_text("/.vgpuctl-sim-control", "reboot\n")
        elif command != "enable" and command != "provision":
            cli("vfs", "enable", PF, "2")

    def again(state: Path, what: str) -> None:
        """The killed command run again finishes the job (restore: the host as defined)."""
        cli = Cli(root, state)
        cli(*argv)
        if command == "restore":
            assert numvfs(root) == "2", what
            assert root.read_value(f"{PRELIM}/vf2/gt0/ggtt_quota") == str(512 << 20), what
            assert all(root.readlink(f"/sys/bus/pci/devices/0000:00:02.{n}/driver").endswith("/vfio-pci")
                       for n in (1, 2)), what
            assert cli("vfs", "restore")[1] == f"{PF}: already (2 VFs on vfio-pci)\n", what

    learn = tmp_path / "learn"
    before(learn)
    found = points(root, learn, argv, tmp_path)
    assert found and any(p.startswith("vfs-") for p in found), found
    expected = {"provision": {"vfs-define:written", "vfs-provision:auto-off", "vfs-provision:written"},
                "restore": {"vfs-provision:auto-off", "vfs-provision:written", "vfs-restore:provisioned",
                            "vfs-define:written", "vfs-enable:autoprobe-off", "vfs-enable:enabled", "vfs-enable:bound",
                            "vfs-restore:pf-done"}}.get(command, {"vfs-define:written"})
    assert expected <= {p.split("#")[0] for p in found}, found
    Cli(root, learn)("vfs", "disable", PF)
    Cli(root, learn)("vfs", "provision", PF, "--auto")
    for trial, point in enumerate(found):
        state = tmp_path / f"state{trial}"
        before(state)
        assert run(root, state, argv, VGPUCTL_CRASH_AT=point) == -9, point
        if command in ("provision", "restore"):
            again(state, f"{command} killed at {point}")
        check(root, state, f"{command} killed at {point}")


def test_each_crash_point_of_an_nvidia_restore(mount_host: MountFn, tmp_path: Path) -> None:
    """sriov-manage's restore killed at each point: run again, the VFs are back and vgpuctl's; disabled without
    --force, nothing left to put back."""
    root = mount_host("l40s-vfio")
    nv_pf = "0000:41:00.0"

    def before(state: Path) -> None:
        Cli(root, state)("vfs", "enable", nv_pf)
        root.write_text("/.vgpuctl-sim-control", "reboot\n")

    learn = tmp_path / "learn"
    before(learn)
    found = points(root, learn, ["vfs", "restore"], tmp_path)
    assert {"vfs-define:written", "vfs-enable:enabled", "vfs-restore:pf-done"} <= {p.split("#")[0] for p in found}
    Cli(root, learn)("vfs", "disable", nv_pf)
    for trial, point in enumerate(found):
        state = tmp_path / f"state{trial}"
        before(state)
        assert run(root, state, ["vfs", "restore"], VGPUCTL_CRASH_AT=point) == -9, point
        cli = Cli(root, state)
        assert cli("vfs", "restore")[1].startswith(f"{nv_pf}: "), point
        assert root.read_value(f"/sys/bus/pci/devices/{nv_pf}/sriov_numvfs") == "32", point
        assert sriov_intel.Journal(StateDir(state)).ownership().journal == [], point
        cli("vfs", "disable", nv_pf)
        assert not (state / "vfs" / f"{nv_pf}.json").exists(), point
