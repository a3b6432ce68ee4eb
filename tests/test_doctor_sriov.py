"""The doctor on Intel SR-IOV hosts (sriov.md 2.2, 2.6): its sriov-* checks, and GVT-g's "not needed"."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from tests.conftest import GoldenFn, MountFn
from vgpuctl.cli.app import cli
from vgpuctl.host import HostRoot

pytestmark = pytest.mark.fuse

PF = "0000:00:02.0"
NO_QEMU = "/nonexistent/qemu-system-x86_64"
GVT_CHECKS = ("igpu", "kernel-config", "enable-gvt", "guc", "modules", "mdev-types", "aperture")
SRIOV_CHECKS = ("sriov-pf", "sriov-params", "sriov-vfs")


def doctor(root: HostRoot) -> dict[str, dict[str, Any]]:
    result = CliRunner().invoke(cli, ["--root", str(root.root), "doctor", "--json", "--no-guest", "--qemu", NO_QEMU])
    assert result.exception is None or isinstance(result.exception, SystemExit), result.output
    return {c["id"]: c for c in json.loads(result.stdout)["checks"]}


def statuses(checks: dict[str, dict[str, Any]], ids: tuple[str, ...]) -> dict[str, str]:
    return {i: checks[i]["status"] for i in ids}


def test_a_ready_sriov_host_needs_no_gvt(mount_host: MountFn) -> None:
    checks = doctor(mount_host("adl-sriov"))
    assert statuses(checks, SRIOV_CHECKS) == dict.fromkeys(SRIOV_CHECKS, "ok")
    igpu = checks["igpu"]
    assert igpu["status"] == "skip" and igpu["detail"].startswith(f"Not needed: {PF} has the SR-IOV")
    assert all(checks[c]["status"] == "skip" and "SR-IOV VFs of 0000:00:02.0" in checks[c]["detail"]
               for c in GVT_CHECKS[1:])
    assert "vgpuctl vfs enable 0000:00:02.0 N" in checks["sriov-vfs"]["detail"]


def test_the_stock_i915_is_told_to_install_i915_sriov_dkms(mount_host: MountFn) -> None:
    checks = doctor(mount_host("adl-stock-i915"))
    pf = checks["sriov-pf"]
    assert pf["status"] == "fail" and "it is the stock driver, not i915-sriov-dkms" in pf["detail"]
    assert "i915-sriov-dkms" in pf["fix"] and "i915.max_vfs=7 i915.enable_guc=3" in pf["fix"]
    assert checks["sriov-params"]["status"] == "skip" and checks["igpu"]["status"] == "skip"


@pytest.mark.parametrize(("preset", "words"), [("adl-sriov-nomaxvfs", "i915.max_vfs is 0"),
                                               ("adl-sriov-noguc", "GuC submission is off (i915.enable_guc=-1)")])
def test_max_vfs_and_guc(mount_host: MountFn, preset: str, words: str) -> None:
    checks = doctor(mount_host(preset))
    params = checks["sriov-params"]
    assert checks["sriov-pf"]["status"] == "ok" and params["status"] == "fail" and words in params["detail"]
    assert "i915.max_vfs=7 i915.enable_guc=3" in params["fix"]
    assert checks["sriov-vfs"]["status"] == "skip"


def test_vfs_on_the_host_driver_fail_and_on_vfio_are_ready(mount_host: MountFn, tmp_path: Path) -> None:
    root = mount_host("adl-sriov")
    root.path(f"/sys/bus/pci/devices/{PF}/sriov_numvfs").write_text("2\n")  # autoprobe on: i915 takes them
    vfs = doctor(root)["sriov-vfs"]
    assert vfs["status"] == "fail" and "0000:00:02.1 (i915), 0000:00:02.2 (i915)" in vfs["detail"]
    assert vfs["fix"].startswith(f"vgpuctl vfs enable {PF} 2 --force")
    result = CliRunner().invoke(cli, ["--root", str(root.root), "--state-dir", str(tmp_path / "s"), "vfs", "enable",
                                      PF, "2", "--force"])
    assert result.exit_code == 0, result.output
    vfs = doctor(root)["sriov-vfs"]
    assert vfs["status"] == "ok" and vfs["detail"].startswith("2 VFs on a VFIO driver")


def test_hosts_without_an_intel_sriov_gpu_do_not_need_the_checks(mount_host: MountFn) -> None:
    checks = doctor(mount_host("coffeelake"))
    assert statuses(checks, SRIOV_CHECKS) == dict.fromkeys(SRIOV_CHECKS, "skip")
    assert checks["sriov-pf"]["detail"].startswith("No Intel GPU with the SR-IOV capability")
    assert all("Not needed on this host: no Intel GPU with SR-IOV" in checks[c]["detail"] for c in SRIOV_CHECKS[1:])
    assert checks["igpu"]["status"] == "ok"


def test_doctor_goldens_of_an_sriov_host(mount_host: MountFn, tmp_path: Path, golden: GoldenFn) -> None:
    import resource

    before = resource.getrlimit(resource.RLIMIT_MEMLOCK)
    resource.setrlimit(resource.RLIMIT_MEMLOCK, (8 << 20, 8 << 20))  # as test_golden: the report shows it
    try:
        root = mount_host("adl-sriov")
        for suffix, extra in (("txt", []), ("json", ["--json"])):
            result = CliRunner().invoke(cli, ["--root", str(root.root), "--state-dir", str(tmp_path / "s"), "doctor",
                                              "--no-guest", "--qemu", NO_QEMU, *extra],
                                        env={"COLUMNS": "120", "NO_COLOR": "1"})
            text = result.stdout.replace(str(root.root), "<ROOT>").replace(str(tmp_path / "s"), "<STATE>")
            golden(f"doctor/adl-sriov.{suffix}", f"exit {result.exit_code}\n{text}")
    finally:
        resource.setrlimit(resource.RLIMIT_MEMLOCK, before)
