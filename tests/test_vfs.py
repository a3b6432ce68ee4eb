"""vgpuctl vfs: Intel SR-IOV VFs on the simulated hosts (sriov.md 1, 2.3, 2.6)."""

from __future__ import annotations

import errno
import json
import os
import stat
from pathlib import Path

import pytest

from tests.conftest import Cli, GoldenFn, MountFn
from vgpuctl.backends import backend_for_type, sriov_intel
from vgpuctl.base.errors import Conflict, KernelError
from vgpuctl.base.state import StateDir
from vgpuctl.host import HostRoot

INTEL_PF = "0000:00:02.0"
B60_PF = "0000:03:00.0"
CONTROL = "/.vgpuctl-sim-control"


def control(root: HostRoot, command: str) -> None:
    root.path(CONTROL).write_text(command + "\n")


def driver_of(root: HostRoot, address: str) -> str | None:
    link = root.path(f"/sys/bus/pci/devices/{address}/driver")
    return os.readlink(link).rsplit("/", 1)[-1] if os.path.lexists(link) else None


def cli_on(mount_host: MountFn, tmp_path: Path, preset: str) -> Cli:
    return Cli(mount_host(preset), tmp_path / "state")


def test_the_backend_is_registered_and_attaches_by_pci_address() -> None:
    backend = backend_for_type(sriov_intel.TYPE_ID)
    assert backend.name == "sriov-intel"
    attachment = backend.attachment("0000:00:02.1")
    assert attachment.qemu_property == ("host", "0000:00:02.1")
    assert attachment.hostdev == {"type": "pci", "managed": "no"}
    assert attachment.address == {"domain": "0x0000", "bus": "0x00", "slot": "0x02", "function": "0x1"}
    assert backend_for_type("i915-GVTg_V5_4").name == "gvt-g" and backend_for_type("nvidia-1").name == "mdev"


def test_enable_follows_the_manager_order_and_list_shows_it(mount_host: MountFn, tmp_path: Path,
                                                            golden: GoldenFn) -> None:
    cli = cli_on(mount_host, tmp_path, "adl-sriov")
    golden("vfs/adl-sriov-off.txt", cli("vfs", "list")[1])
    _, out, _ = cli("vfs", "enable", INTEL_PF, "3")
    assert "3 VFs enabled, on vfio-pci" in out
    pf = cli.root.path(f"/sys/bus/pci/devices/{INTEL_PF}")
    assert (pf / "sriov_numvfs").read_text() == "3\n"
    assert (pf / "sriov_drivers_autoprobe").read_text() == "1\n"  # set back
    for n in (1, 2, 3):
        vf = f"0000:00:02.{n}"
        assert driver_of(cli.root, vf) == "vfio-pci"  # not i915: autoprobe was off while the VFs appeared
        assert cli.root.path(f"/sys/bus/pci/devices/{vf}/driver_override").read_text() == "vfio-pci\n"
    assert driver_of(cli.root, INTEL_PF) == "i915"  # the PF keeps its driver (never bound by id)
    owned = json.loads((tmp_path / "state" / "owned.json").read_text())
    assert owned["vfs"][INTEL_PF]["count"] == 3 and owned["journal"] == []
    control(cli.root, "open 0000:00:02.2")  # a VM outside vgpuctl holds one
    golden("vfs/adl-sriov-3.txt", cli("vfs", "list")[1])
    golden("vfs/adl-sriov-3.json", cli("vfs", "list", "--json")[1])
    control(cli.root, "close 0000:00:02.2")
    # another count: 0 first, then N
    cli("vfs", "enable", INTEL_PF, "2")
    assert (pf / "sriov_numvfs").read_text() == "2\n"


def test_disable_refuses_a_vf_in_use_unless_forced_and_then_times_out(mount_host: MountFn, tmp_path: Path) -> None:
    root = mount_host("adl-sriov")
    state = StateDir(tmp_path / "state")
    sriov_intel.enable(root, state, INTEL_PF, 2)
    control(root, "open 0000:00:02.1")
    with pytest.raises(Conflict, match=r"0000:00:02.1 by a simulated VM.*stop those VMs"):
        sriov_intel.disable(root, state, INTEL_PF)
    with pytest.raises(Conflict, match=r"0000:00:02.2 by VM win"):
        sriov_intel.disable(root, state, INTEL_PF, holders={"0000:00:02.2": "win"})
    with pytest.raises(KernelError, match=r"a VM still holds one of the VFs") as caught:
        sriov_intel.disable(root, state, INTEL_PF, force=True, timeout_s=0.5)
    assert caught.value.errno == errno.ETIMEDOUT and caught.value.parent == INTEL_PF
    control(root, "close 0000:00:02.1")  # the blocked write now finishes
    done = sriov_intel.intel_pf(root, INTEL_PF)
    for _ in range(50):
        if done.pf.num_vfs == 0:
            break
        done = sriov_intel.intel_pf(root, INTEL_PF)
    assert done.pf.num_vfs == 0
    assert INTEL_PF in sriov_intel.Journal(state).ownership().vfs  # the release failed: still recorded


def test_disable_refuses_vfs_vgpuctl_did_not_enable(mount_host: MountFn, tmp_path: Path) -> None:
    cli = cli_on(mount_host, tmp_path, "adl-sriov")
    cli.root.path(f"/sys/bus/pci/devices/{INTEL_PF}/sriov_numvfs").write_text("2\n")  # a boot script did it
    code, _, err = cli("vfs", "disable", INTEL_PF, ok=False)
    assert code == 1 and "were not enabled by vgpuctl" in err and "--force" in err
    code, _, err = cli("vfs", "enable", INTEL_PF, "3", ok=False)
    assert code == 1 and "were not enabled by vgpuctl" in err
    cli("vfs", "disable", INTEL_PF, "--force")
    assert cli.root.path(f"/sys/bus/pci/devices/{INTEL_PF}/sriov_numvfs").read_text() == "0\n"


@pytest.mark.parametrize(("preset", "code", "words"), [
    ("adl-stock-i915", errno.ENOENT, "it is the stock driver, not i915-sriov-dkms"),
    ("adl-sriov-nomaxvfs", errno.ERANGE, "i915.max_vfs is 0 (or GuC submission is off): set i915.max_vfs=7 "
                                         "i915.enable_guc=3 (vgpuctl setup)"),
    ("adl-sriov-noguc", errno.ERANGE, "i915.max_vfs is 0 (or GuC submission is off)"),
])
def test_the_kernels_refusal_in_the_drivers_words(mount_host: MountFn, tmp_path: Path, golden: GoldenFn,
                                                  preset: str, code: int, words: str) -> None:
    root = mount_host(preset)
    state = StateDir(tmp_path / "state")
    with pytest.raises(KernelError) as caught:
        sriov_intel.enable(root, state, INTEL_PF, 2)
    assert words in str(caught.value)
    assert caught.value.errno == code and caught.value.parent == INTEL_PF and caught.value.data["driver"] == "i915"
    assert sriov_intel.Journal(state).ownership().vfs == {}  # the failed claim left nothing
    golden(f"vfs/{preset}.txt", Cli(root, tmp_path / "state")("vfs", "list")[1])


def test_ebusy_and_too_many(mount_host: MountFn, tmp_path: Path) -> None:
    root = mount_host("adl-sriov")
    state = StateDir(tmp_path / "state")
    pf = sriov_intel.intel_pf(root, INTEL_PF)
    busy = sriov_intel.explain(pf, KernelError("x", errno=errno.EBUSY, path="p"), 3)
    assert "already enabled" in str(busy) and busy.errno == errno.EBUSY
    nomem = sriov_intel.explain(pf, KernelError("x", errno=errno.ENOMEM, path="p"), 3)
    assert "MMIO" in str(nomem)
    with pytest.raises(Exception, match="at most 7 VFs"):
        sriov_intel.enable(root, state, INTEL_PF, 8)


def test_battlemage_vfs_go_to_xe_vfio_pci(mount_host: MountFn, tmp_path: Path, golden: GoldenFn) -> None:
    cli = cli_on(mount_host, tmp_path, "b60-xe")
    cli("vfs", "enable", B60_PF, "2")
    assert driver_of(cli.root, "0000:03:00.1") == "xe-vfio-pci"
    golden("vfs/b60-xe-2.txt", cli("vfs", "list")[1])
    golden("vfs/b60-xe-2.json", cli("vfs", "list", "--json")[1])
    cli("vfs", "disable", B60_PF)
    assert cli.root.path(f"/sys/bus/pci/devices/{B60_PF}/sriov_numvfs").read_text() == "0\n"
    assert sriov_intel.Journal(StateDir(tmp_path / "state")).ownership().vfs == {}
    assert stat.S_ISDIR(cli.root.path(f"/sys/bus/pci/devices/{B60_PF}").stat().st_mode)


def test_enabling_the_same_count_again_only_binds(mount_host: MountFn, tmp_path: Path) -> None:
    root = mount_host("adl-sriov")
    state = StateDir(tmp_path / "state")
    sriov_intel.enable(root, state, INTEL_PF, 2)
    control(root, "open 0000:00:02.1")  # a VM runs on it: an unchanged count must not disturb it
    done = sriov_intel.enable(root, state, INTEL_PF, 2)
    assert done.pf.num_vfs == 2 and json.loads(root.path("/.vgpuctl-sim").read_text())["open_vfs"] == ["0000:00:02.1"]
    with pytest.raises(Conflict, match=r"0000:00:02.1 by a simulated VM"):
        sriov_intel.enable(root, state, INTEL_PF, 3)  # another count turns the VFs off first: refused
    control(root, "close 0000:00:02.1")
