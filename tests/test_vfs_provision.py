"""vgpuctl vfs provision (Intel quotas, sriov.md 2.4), NVIDIA's enable/disable by sriov-manage (3.2), the persistent
VF definitions and vgpuctl vfs restore (2.6 step 4, 6 pain 4), on the simulated hosts."""

from __future__ import annotations

import errno
import json
from pathlib import Path

import pytest

from tests.conftest import Cli, GoldenFn, MountFn
from vgpuctl.backends import sriov_intel, sriov_intel_provision, vf_definitions, vf_restore
from vgpuctl.base.errors import KernelError
from vgpuctl.base.state import StateDir
from vgpuctl.host import HostRoot
from vgpuctl.mdev.units import UNIT_NAME
from vgpuctl.vm.units import VM_UNIT_NAME

pytestmark = pytest.mark.fuse

INTEL_PF = "0000:00:02.0"
B60_PF = "0000:03:00.0"
NV_PF = "0000:41:00.0"
CONTROL = "/.vgpuctl-sim-control"
PRELIM = f"/sys/bus/pci/devices/{INTEL_PF}/drm/card0/prelim_iov"
MIB = 1 << 20


def sysfs(root: HostRoot, path: str) -> str:
    return root.read_value(path)


def definition(state: Path, pf: str) -> dict[str, object] | None:
    file = state / "vfs" / f"{pf}.json"
    return json.loads(file.read_text()) if file.exists() else None


def test_the_vf_unit_text(golden: GoldenFn) -> None:
    golden("units/vgpuctl-vfs.service", vf_restore.render_unit("/usr/local/bin/vgpuctl", (UNIT_NAME, VM_UNIT_NAME)))


def test_sizes_and_vf_ranges() -> None:
    assert [sriov_intel_provision.parse_size(t) for t in ("4096", "512M", "1G", "466MiB", "2k")] == [
        4096, 512 * MIB, 1 << 30, 466 * MIB, 2048]
    assert sriov_intel_provision.format_size(1088 * MIB) == "1088M"
    assert sriov_intel_provision.format_size(1 << 30) == "1G"
    assert sriov_intel_provision.parse_vfs(("1-3", "5"), 7) == [1, 2, 3, 5]
    assert sriov_intel_provision.parse_vfs((), 3) == [1, 2, 3]
    for bad in ("0", "2-9", "x"):
        with pytest.raises(Exception, match="--vf"):
            sriov_intel_provision.parse_vfs((bad,), 7)
    with pytest.raises(Exception, match="not a size"):
        sriov_intel_provision.parse_size("lots")


def test_i915_provision_then_enable_in_the_drivers_order(mount_host: MountFn, tmp_path: Path,
                                                         golden: GoldenFn) -> None:
    cli = Cli(mount_host("adl-sriov"), tmp_path / "state")
    root = cli.root
    _, out, _ = cli("vfs", "provision", INTEL_PF, "--vf", "1-2", "--ggtt", "1G", "--contexts", "8192",
                    "--doorbells", "32")
    assert out.splitlines() == [f"{INTEL_PF} VF 1:  ggtt=1G contexts=8192 doorbells=32",
                                f"{INTEL_PF} VF 2:  ggtt=1G contexts=8192 doorbells=32"]
    assert sysfs(root, f"{PRELIM}/pf/auto_provisioning") == "0"  # off before the first quota (else EUCLEAN)
    assert sysfs(root, f"{PRELIM}/vf1/gt0/ggtt_quota") == str(1 << 30)
    assert sysfs(root, f"{PRELIM}/vf3/gt0/ggtt_quota") == "0"
    golden("vfs/adl-sriov-provisioned-off.txt", cli("vfs", "list")[1])

    # Three VFs, two provisioned: the driver's ENOKEY, said with what to do.
    code, _, err = cli("vfs", "enable", INTEL_PF, "3", ok=False)
    assert code == 1 and "VFs 1, 2 are provisioned, VF 3 is not" in err and "--vf 1-3" in err, err
    assert sysfs(root, f"/sys/bus/pci/devices/{INTEL_PF}/sriov_numvfs") == "0"
    assert definition(cli.state, INTEL_PF) == {"version": 1, "pf": INTEL_PF, "driver": "i915", "count": 0,
                                               "vfio_driver": "vfio-pci", "provisioning": {
                                                   n: {"ggtt": 1 << 30, "contexts": 8192, "doorbells": 32}
                                                   for n in ("1", "2")}}  # the failed enable changed nothing

    cli("vfs", "enable", INTEL_PF, "2")
    assert sysfs(root, f"{PRELIM}/vf1/gt0/ggtt_quota") == str(1 << 30)  # its own, not a fair share
    assert definition(cli.state, INTEL_PF)["count"] == 2  # type: ignore[index]
    golden("vfs/adl-sriov-provisioned-2.txt", cli("vfs", "list")[1])
    golden("vfs/adl-sriov-provisioned-2.json", cli("vfs", "list", "--json")[1])

    code, _, err = cli("vfs", "provision", INTEL_PF, "--vf", "3", "--ggtt", "256M", ok=False)
    assert code == 1 and "are enabled (2)" in err and f"vgpuctl vfs disable {INTEL_PF} first" in err
    cli("vfs", "disable", INTEL_PF)
    assert definition(cli.state, INTEL_PF)["count"] == 0  # type: ignore[index]
    assert sysfs(root, f"{PRELIM}/vf2/gt0/contexts_quota") == "8192"  # the driver keeps a hand provisioning

    # Too much for what is left: refused before anything is written.
    code, _, err = cli("vfs", "provision", INTEL_PF, "--vf", "3-7", "--ggtt", "512M", ok=False)
    assert code == 1 and "1216M is left for VFs" in err, err
    assert sysfs(root, f"{PRELIM}/vf3/gt0/ggtt_quota") == "0"

    # Back to fair shares: quotas cleared, then auto_provisioning on; the definition has nothing left.
    _, out, _ = cli("vfs", "provision", INTEL_PF, "--auto")
    assert "fair share" in out
    assert sysfs(root, f"{PRELIM}/pf/auto_provisioning") == "1" and sysfs(root, f"{PRELIM}/vf1/gt0/ggtt_quota") == "0"
    assert definition(cli.state, INTEL_PF) is None
    cli("vfs", "enable", INTEL_PF, "2")
    assert sysfs(root, f"{PRELIM}/vf1/gt0/ggtt_quota") == str((3328 - 64) * MIB // 2)


def test_quotas_vgpuctl_did_not_set_need_force(mount_host: MountFn, tmp_path: Path) -> None:
    cli = Cli(mount_host("adl-sriov"), tmp_path / "state")
    root = cli.root
    root.write_text(f"{PRELIM}/vf1/gt0/ggtt_quota", f"{64 * MIB}\n")  # Intel's script, say, with auto still on
    code, _, err = cli("vfs", "provision", INTEL_PF, "--vf", "2", "--ggtt", "64M", ok=False)
    assert code == 1 and "VFs 1 of 0000:00:02.0 hold quotas vgpuctl did not set" in err and "--force" in err
    code, _, err = cli("vfs", "provision", INTEL_PF, "--auto", ok=False)
    assert code == 1 and "--force" in err
    # The driver's own word for it: auto provisioning on and a VF provisioned.
    code, _, err = cli("vfs", "enable", INTEL_PF, "1", ok=False)
    assert code == 1 and "VF 1 is provisioned" in err and "auto mode" in err and "--auto" in err, err
    cli("vfs", "provision", INTEL_PF, "--auto", "--force")
    assert sysfs(root, f"{PRELIM}/vf1/gt0/ggtt_quota") == "0"
    cli("vfs", "enable", INTEL_PF, "1")


def test_estale_and_other_quota_errnos_are_said(mount_host: MountFn, tmp_path: Path) -> None:
    root = mount_host("adl-sriov")
    pf = sriov_intel.intel_pf(root, INTEL_PF)
    root.write_text(f"{PRELIM}/pf/auto_provisioning", "0\n")
    root.write_text(f"{PRELIM}/vf1/gt0/ggtt_quota", f"{64 * MIB}\n")
    with pytest.raises(OSError) as raw:
        root.write_text(f"{PRELIM}/pf/auto_provisioning", "1\n")
    assert raw.value.errno == errno.ESTALE  # the simulated driver, as intel_iov_sysfs.c
    said = sriov_intel_provision.explain_write(pf, KernelError("x", errno=errno.ESTALE, path="p"), "auto")
    assert "cannot go back to fair shares" in str(said) and said.errno == errno.ESTALE
    assert "16-bit" in str(sriov_intel_provision.explain_write(pf, KernelError("x", errno=errno.ERANGE, path="p"),
                                                                "contexts"))
    with pytest.raises(KernelError, match=r"cannot give VF 2 of 0000:00:02.0 70000 of contexts each: 57088 is left"
                                          r" for VFs") as caught:
        sriov_intel_provision.provision(root, StateDir(tmp_path / "state"), INTEL_PF, ("2",), {"contexts": 70000},
                                        force=True)
    assert caught.value.errno == errno.ENOSPC


def test_xe_provision_goes_to_debugfs_and_stays_custom(mount_host: MountFn, tmp_path: Path, golden: GoldenFn) -> None:
    cli = Cli(mount_host("b60-xe"), tmp_path / "state")
    root = cli.root
    cli("vfs", "provision", B60_PF, "--vf", "1-2", "--ggtt", "512M", "--contexts", "4096", "--doorbells", "16",
        "--lmem", "4G")
    tile = f"/sys/kernel/debug/dri/{B60_PF}/sriov/vf1/tile0"
    assert sysfs(root, f"{tile}/ggtt_quota") == str(512 * MIB) and sysfs(root, f"{tile}/vram_quota") == str(4 << 30)
    assert sysfs(root, f"{tile}/gt0/contexts_quota") == "4096"
    cli("vfs", "enable", B60_PF, "2")
    golden("vfs/b60-xe-provisioned-2.txt", cli("vfs", "list")[1])
    cli("vfs", "disable", B60_PF)
    assert sysfs(root, f"{tile}/ggtt_quota") == str(512 * MIB)  # custom mode: nothing released
    code, _, err = cli("vfs", "provision", B60_PF, "--auto", ok=False)
    assert code == 1 and "custom provisioning mode" in err


def test_nvidia_vfs_by_sriov_manage(mount_host: MountFn, tmp_path: Path, golden: GoldenFn) -> None:
    cli = Cli(mount_host("l40s-vfio"), tmp_path / "state")
    root = cli.root
    code, _, err = cli("vfs", "enable", NV_PF, "4", ok=False)
    assert code == 1 and "every VF of an NVIDIA GPU (32 here): give no count" in err
    _, out, _ = cli("vfs", "enable", NV_PF)
    assert out == f"{NV_PF}: 32 VFs enabled by sriov-manage, on nvidia\n"
    assert sysfs(root, f"/sys/bus/pci/devices/{NV_PF}/sriov_numvfs") == "32"
    assert definition(cli.state, NV_PF) == {"version": 1, "pf": NV_PF, "driver": "nvidia", "count": 32,
                                            "vfio_driver": None, "provisioning": None}
    root.write_text("/sys/bus/pci/devices/0000:41:00.4/nvidia/current_vgpu_type", "1159\n")
    golden("vfs/l40s-vfio-32.txt", cli("vfs", "list")[1])
    golden("vfs/l40s-vfio-32.json", cli("vfs", "list", "--json")[1])
    code, _, err = cli("vfs", "disable", NV_PF, ok=False)
    assert code == 1 and "0000:41:00.4 by vGPU type 1159" in err
    root.write_text("/sys/bus/pci/devices/0000:41:00.4/nvidia/current_vgpu_type", "0\n")
    root.write_text(CONTROL, "dcgm on\n")
    code, _, err = cli("vfs", "disable", NV_PF, ok=False)
    assert code == 1 and "another client holds the GPU (DCGM" in err, err
    assert definition(cli.state, NV_PF)["count"] == 32  # type: ignore[index]  # the failure put it back
    root.write_text(CONTROL, "dcgm off\n")
    cli("vfs", "disable", NV_PF)
    assert sysfs(root, f"/sys/bus/pci/devices/{NV_PF}/sriov_numvfs") == "0" and definition(cli.state, NV_PF) is None


def test_nvidia_vfs_of_another_tool_are_left_alone(mount_host: MountFn, tmp_path: Path) -> None:
    cli = Cli(mount_host("l40s-vfio"), tmp_path / "state")
    pf_dir = cli.root.path(f"/sys/bus/pci/devices/{NV_PF}")
    with pytest.raises(PermissionError):  # the simulated driver refuses a raw write (sriov.md 3.2, [U] errno)
        (pf_dir / "sriov_numvfs").write_text("32\n")
    import subprocess

    subprocess.run([str(cli.root.path("/usr/lib/nvidia/sriov-manage")), "-e", NV_PF], check=True, timeout=60,
                   capture_output=True)  # pve-nvidia-sriov@ALL.service, say
    for argv in (("vfs", "enable", NV_PF), ("vfs", "disable", NV_PF)):
        code, _, err = cli(*argv, ok=False)
        assert code == 1 and "were not enabled by vgpuctl" in err and "--force" in err
    cli("vfs", "enable", NV_PF, "--force")  # taken over: now vgpuctl's, and put back at boot
    assert definition(cli.state, NV_PF)["count"] == 32  # type: ignore[index]


def test_restore_after_a_reboot_is_idempotent_and_leaves_foreign_vfs(mount_host: MountFn, tmp_path: Path) -> None:
    cli = Cli(mount_host("adl-sriov"), tmp_path / "state")
    root = cli.root
    cli("vfs", "provision", INTEL_PF, "--vf", "1-3", "--ggtt", "768M", "--contexts", "8192", "--doorbells", "48")
    cli("vfs", "enable", INTEL_PF, "3")
    _, out, _ = cli("vfs", "restore")
    assert out == f"{INTEL_PF}: already (3 VFs on vfio-pci)\n"  # nothing to do on a host already as defined

    root.write_text(CONTROL, "reboot\n")
    assert sysfs(root, f"/sys/bus/pci/devices/{INTEL_PF}/sriov_numvfs") == "0"
    assert sysfs(root, f"{PRELIM}/vf1/gt0/ggtt_quota") == "0" and sysfs(root, f"{PRELIM}/pf/auto_provisioning") == "1"
    _, out, _ = cli("vfs", "restore")
    assert out == f"{INTEL_PF}: restored (provisioned, 3 VFs on vfio-pci)\n"
    assert sysfs(root, f"{PRELIM}/vf3/gt0/ggtt_quota") == str(768 * MIB)
    for n in (1, 2, 3):
        assert root.readlink(f"/sys/bus/pci/devices/0000:00:02.{n}/driver").endswith("/vfio-pci")
    assert sysfs(root, f"/sys/bus/pci/devices/{INTEL_PF}/sriov_drivers_autoprobe") == "1"
    assert cli("vfs", "restore")[1] == f"{INTEL_PF}: already (3 VFs on vfio-pci)\n"
    cli("vfs", "disable", INTEL_PF)  # vgpuctl's again in this boot: no --force

    # The next boot, a boot script enables VFs before vgpuctl's unit runs: they are not vgpuctl's.
    cli("vfs", "enable", INTEL_PF, "3")
    root.write_text(CONTROL, "reboot\n")
    root.write_text(f"/sys/bus/pci/devices/{INTEL_PF}/sriov_numvfs", "3\n")  # i915 binds them (autoprobe on)
    code, out, _ = cli("vfs", "restore", ok=False)
    assert code == 1 and out.startswith(f"{INTEL_PF}: failed (") and "not enabled by vgpuctl in this boot" in out
    assert root.readlink("/sys/bus/pci/devices/0000:00:02.1/driver").endswith("/i915")
    listed = cli.json("vfs", "list")
    assert isinstance(listed, dict) and not listed["pfs"][0]["enabled_by_vgpuctl"]
    _, out, _ = cli("vfs", "restore", "--force")
    assert "restored" in out
    assert root.readlink("/sys/bus/pci/devices/0000:00:02.1/driver").endswith("/vfio-pci")


def test_restore_waits_for_the_pf_driver_and_reports_a_damaged_definition(mount_host: MountFn,
                                                                          tmp_path: Path) -> None:
    root = mount_host("adl-sriov")
    state = StateDir(tmp_path / "state")
    vf_definitions.directory(state).mkdir(parents=True)
    (vf_definitions.directory(state) / "0000:00:05.0.json").write_text("{not json")
    vf_definitions.save(state, vf_definitions.VfDefinition("0000:00:09.0", "i915", 2, "vfio-pci"))
    vf_definitions.save(state, vf_definitions.VfDefinition(INTEL_PF, "i915", 1, "vfio-pci"))
    slept: list[float] = []
    results = vf_restore.restore(root, state, wait_s=0.5, sleep=slept.append)
    by_pf = {r.pf: r for r in results}
    assert by_pf[INTEL_PF].outcome == "restored"
    assert by_pf["0000:00:09.0"].outcome == "failed" and "not on this host" in by_pf["0000:00:09.0"].detail
    assert slept and all(s == vf_restore.POLL_S for s in slept)
    (damaged,) = [r for r in results if r.pf.endswith("0000:00:05.0.json")]
    assert damaged.outcome == "failed" and "is damaged" in damaged.detail


def test_xe_restore_after_a_reboot_provisions_before_enabling(mount_host: MountFn, tmp_path: Path) -> None:
    cli = Cli(mount_host("b60-xe"), tmp_path / "state")
    root = cli.root
    cli("vfs", "provision", B60_PF, "--vf", "1-2", "--ggtt", "512M", "--contexts", "4096", "--doorbells", "16",
        "--vram", "8G")
    cli("vfs", "enable", B60_PF, "2")
    root.write_text(CONTROL, "reboot\n")
    tile = f"/sys/kernel/debug/dri/{B60_PF}/sriov/vf2/tile0"
    assert sysfs(root, f"{tile}/vram_quota") == "0"
    assert cli("vfs", "restore")[1] == f"{B60_PF}: restored (provisioned, 2 VFs on xe-vfio-pci)\n"
    assert sysfs(root, f"{tile}/vram_quota") == str(8 << 30) and sysfs(root, f"{tile}/gt0/doorbells_quota") == "16"
    assert root.readlink("/sys/bus/pci/devices/0000:03:00.2/driver").endswith("/xe-vfio-pci")


def test_restore_with_nothing_defined_says_so(mount_host: MountFn, tmp_path: Path) -> None:
    cli = Cli(mount_host("adl-sriov"), tmp_path / "state")
    assert cli("vfs", "restore")[1] == "no VF definitions (vgpuctl vfs enable and vfs provision make them)\n"


def test_an_enable_after_a_reboot_puts_the_defined_quotas_back_first(mount_host: MountFn, tmp_path: Path) -> None:
    cli = Cli(mount_host("adl-sriov"), tmp_path / "state")
    root = cli.root
    cli("vfs", "provision", INTEL_PF, "--vf", "1-2", "--ggtt", "1G", "--contexts", "8192", "--doorbells", "32")
    cli("vfs", "enable", INTEL_PF, "2")
    root.write_text(CONTROL, "reboot\n")
    cli("vfs", "enable", INTEL_PF, "2")  # by hand, before (or instead of) the restore unit
    assert sysfs(root, f"{PRELIM}/vf2/gt0/ggtt_quota") == str(1 << 30)  # not a fair share
    assert cli("vfs", "restore")[1] == f"{INTEL_PF}: already (2 VFs on vfio-pci)\n"
    # A quota changed behind vgpuctl's back while the VFs are on: restore turns them off (they are its own),
    # puts the defined quotas back and enables them again; the definition stays as it was.
    root.write_text(f"{PRELIM}/vf2/gt0/doorbells_quota", "8\n")
    assert cli("vfs", "restore")[1] == f"{INTEL_PF}: restored (provisioned, 2 VFs on vfio-pci)\n"
    assert sysfs(root, f"{PRELIM}/vf2/gt0/doorbells_quota") == "32"
    assert sysfs(root, f"/sys/bus/pci/devices/{INTEL_PF}/sriov_numvfs") == "2"
    assert definition(cli.state, INTEL_PF)["count"] == 2  # type: ignore[index]


@pytest.mark.parametrize(("preset", "words"), [
    ("mtl-xe", "xe allows no VFs here"),
    ("adl-stock-i915", "it is the stock driver, not i915-sriov-dkms"),
    ("adl-sriov-nomaxvfs", "i915.max_vfs is 0 (or GuC submission is off)"),
])
def test_no_provisioning_interface_says_why(mount_host: MountFn, tmp_path: Path, preset: str, words: str) -> None:
    cli = Cli(mount_host(preset), tmp_path / "state")
    code, _, err = cli("vfs", "provision", INTEL_PF, "--ggtt", "64M", ok=False)
    assert code == 1 and f"{INTEL_PF} has no provisioning interface" in err and words in err, err
    assert definition(cli.state, INTEL_PF) is None
