"""Each SR-IOV preset end to end, through the CLI as a user drives it: VFs enabled (Intel: provisioned first),
two VMs started on two VFs on real QEMU (TCG: /dev/kvm here is KVM-PVM), both shown as holders, stopped, and
the VFs given back — on NVIDIA the vGPU type is set on each VF at start and released after stop, which takes
the EPERM retry (sriov.md 3.4: the driver refuses the release while, and shortly after, QEMU has the VF)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import Cli, MountFn, wait_for
from vgpuctl.backends import sriov_nvidia

pytestmark = pytest.mark.fuse

INTEL = {"adl-sriov": "0000:00:02.0", "n100-sriov": "0000:00:02.0", "b60-xe": "0000:03:00.0"}
NVIDIA = {"l40s-vfio": "0000:41:00.0", "h200-vfio": "0000:41:00.0"}
RELEASE_DELAY_S = 1.5  # longer than a stop: the release right after QEMU is refused, only a retry lands
CONTROL = "/.vgpuctl-sim-control"


def pf_row(cli: Cli, pf: str) -> dict[str, Any]:
    listed = cli.json("vfs", "list")
    assert isinstance(listed, dict)
    return next(row for row in listed["pfs"] if row["pf"] == pf)


def create_vm(cli: Cli, name: str, guest: Path, *vgpu: str) -> None:
    cli("vm", "create", name, "--profile", "automotive", "--kernel", str(guest), "--boot", "kernel", "--memory", "64",
        "--cpus", "1", "--display", "vnc", "--no-vgpu-display", "--no-ramfb", *vgpu)


def run_two_vms(cli: Cli, pf: str, guest: Path, *vgpu: str,
                while_running: Callable[[dict[str, str]], None] = lambda held: None) -> dict[str, str]:
    """Start VMs a and b on VFs of the PF; VF address -> VM as ``vfs list`` shows them while both run."""
    for name in ("a", "b"):
        create_vm(cli, name, guest, "--vf", pf, *vgpu)
    try:
        for name in ("a", "b"):
            _, out, _ = cli("vm", "start", name, "--accel", "tcg")
            assert f"{name}: running" in out, out
        held = {vf["address"]: vf["vm"] for vf in pf_row(cli, pf)["vfs"] if vf["vm"]}
        assert sorted(held.values()) == ["a", "b"], held
        code, _, err = cli("vfs", "disable", pf, ok=False)
        assert code == 1 and "stop those VMs" in err, err  # never pulled from under a running VM
        while_running(held)
    finally:
        for name in ("a", "b"):
            cli("vm", "stop", name, "--timeout", "10")
    return held


@pytest.mark.parametrize("preset_name", list(INTEL))
def test_intel_vfs_provisioned_two_vms_stopped_released(preset_name: str, mount_host: MountFn, tmp_path: Path,
                                                          guest: Path) -> None:
    pf = INTEL[preset_name]
    cli = Cli(mount_host(preset_name), tmp_path / "s")
    cli("vfs", "provision", pf, "--vf", "1-2", "--ggtt", "512M", "--contexts", "1024", "--doorbells", "16")
    cli("vfs", "enable", pf, "2")
    row = pf_row(cli, pf)
    assert row["enabled_vfs"] == 2 and row["enabled_by_vgpuctl"]
    assert all(vf["driver"] == row["vfio_driver"] and vf["quota"]["ggtt"] == 512 << 20 for vf in row["vfs"])
    held = run_two_vms(cli, pf, guest)
    assert set(held) == {vf["address"] for vf in row["vfs"]}
    assert all(vf["vm"] is None for vf in pf_row(cli, pf)["vfs"])  # stopped: both VFs free again
    cli("vfs", "disable", pf)
    assert cli.root.read_value(f"/sys/bus/pci/devices/{pf}/sriov_numvfs") == "0"


@pytest.mark.parametrize("preset_name", list(NVIDIA))
def test_nvidia_types_set_at_start_and_released_after_stop(preset_name: str, mount_host: MountFn, tmp_path: Path,
                                                           guest: Path) -> None:
    pf = NVIDIA[preset_name]
    cli = Cli(mount_host(preset_name, sriov={"release_delay_s": RELEASE_DELAY_S}), tmp_path / "s")
    cli("vfs", "enable", pf)  # sriov-manage -e
    row = pf_row(cli, pf)
    assert row["enabled_vfs"] == row["total_vfs"] and row["enabled_by_vgpuctl"]
    smallest = min((t for t in row["types"] if t["free_vfs"] >= 2), key=lambda t: t["framebuffer_mib"])

    def typed(held: dict[str, str]) -> None:
        types = {vf["address"]: vf["vgpu_type"] for vf in pf_row(cli, pf)["vfs"] if vf["vgpu_type"]}
        assert set(types) == set(held) and {t["id"] for t in types.values()} == {smallest["id"]}  # set at start
        # On a simulated host QEMU runs an emulated adapter in the VF's place, so the simulator is told that QEMU
        # opened the VFs' VFIO devices and closes them now, just before the stops (sriov.md 7.5): the driver then
        # refuses the release after QEMU for RELEASE_DELAY_S.
        for vf in held:
            cli.root.write_text(CONTROL, f"open {vf}\n")
        for vf in held:
            cli.root.write_text(CONTROL, f"close {vf}\n")

    held = run_two_vms(cli, pf, guest, "--type", str(smallest["id"]), while_running=typed)
    # The release right after QEMU is refused (EPERM): only the retry a second later lands it.
    wait_for(lambda: all(sriov_nvidia.current_type(cli.root, vf) == 0 for vf in held), timeout=20)
    assert all(vf["vgpu_type"] is None and vf["vm"] is None for vf in pf_row(cli, pf)["vfs"])
    cli("vfs", "disable", pf)  # sriov-manage -d
    assert pf_row(cli, pf)["enabled_vfs"] == 0
