"""The doctor on SR-IOV hosts (sriov.md 2.2, 2.6, 3, 6): the Intel sriov-* checks and the NVIDIA nvidia-* checks,
one test per pain a simulated host shows (its SriovSpec knobs: dkms, secure_boot, module_key, guc_firmware,
vgpu_driver), and GVT-g's "not needed"."""

from __future__ import annotations

import json
import os
import subprocess
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
SRIOV_CHECKS = ("sriov-pf", "sriov-dkms", "sriov-secboot", "sriov-guc-fw", "sriov-params", "sriov-iommu", "sriov-vfs",
                "sriov-boot")
NVIDIA_CHECKS = ("nvidia-pf", "nvidia-vfs", "nvidia-boot")
NVIDIA_PF = "0000:41:00.0"
NO_IOMMU = "BOOT_IMAGE=/boot/vmlinuz-{release} root=/dev/sda1 ro quiet i915.enable_guc=3 i915.max_vfs=7"


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
    assert statuses(checks, NVIDIA_CHECKS) == dict.fromkeys(NVIDIA_CHECKS, "skip")
    assert all("no NVIDIA GPU with SR-IOV" in checks[c]["detail"] for c in NVIDIA_CHECKS[1:])


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


# ---------------------------------------------------------------- Intel: around the driver (pains 3, 10, 8)


def test_dkms_not_built_for_the_new_kernel(mount_host: MountFn) -> None:
    checks = doctor(mount_host("adl-sriov-newkernel"))  # built for 6.7.0, booted 6.8.0: the stock i915 loaded
    dkms = checks["sriov-dkms"]
    assert dkms["status"] == "fail" and dkms["detail"].startswith(
        "i915-sriov-dkms is built for 6.7.0 but not for the running kernel 6.8.0")
    assert dkms["fix"].startswith("dkms install i915-sriov-dkms/2026.05.06 -k 6.8.0 && reboot")
    assert {"path": "/var/lib/dkms/i915-sriov-dkms", "value": "2026.05.06: built for 6.7.0"} in dkms["evidence"]
    assert checks["sriov-pf"]["status"] == "fail" and "stock driver" in checks["sriov-pf"]["detail"]


def test_a_module_of_another_kernels_vermagic(mount_host: MountFn) -> None:
    checks = doctor(mount_host("adl-sriov", sriov={"dkms": "wrong-kernel"}))
    dkms = checks["sriov-dkms"]
    assert dkms["status"] == "fail" and dkms["detail"] == (
        "/lib/modules/6.8.0/updates/dkms/i915.ko was built for Linux 6.7.0, not for the running 6.8.0: modprobe "
        "refuses it ('Exec format error'), so i915 does not load.")
    assert dkms["fix"].startswith("dkms install i915-sriov-dkms/2026.05.06 -k 6.8.0 --force")
    pf = checks["sriov-pf"]
    assert pf["status"] == "fail" and "no driver is bound" in pf["detail"] and "sriov-dkms" in pf["fix"]


@pytest.mark.parametrize(("key", "status", "words"), [
    ("unsigned", "fail", "module is not signed: the kernel refuses it ('Key was rejected by service')"),
    ("not-enrolled", "fail", "its key is not enrolled as a Machine Owner Key"),
    ("enrolled", "ok", "Secure Boot is on, and the loaded i915 passed its signature check.")])
def test_secure_boot(mount_host: MountFn, key: str, status: str, words: str) -> None:
    checks = doctor(mount_host("adl-sriov", sriov={"secure_boot": True, "module_key": key}))
    boot = checks["sriov-secboot"]
    assert boot["status"] == status and words in boot["detail"], boot
    if status == "fail":
        assert "mokutil --import /var/lib/dkms/mok.pub" in boot["fix"]
        assert checks["sriov-dkms"]["status"] == "warn" and "see sriov-secboot" in checks["sriov-dkms"]["detail"]
    else:
        assert checks["sriov-dkms"]["status"] == "ok" and checks["sriov-pf"]["status"] == "ok"
    assert doctor(mount_host("adl-sriov"))["sriov-secboot"]["detail"].startswith("Secure Boot is off")


def test_guc_firmware_missing(mount_host: MountFn) -> None:
    checks = doctor(mount_host("adl-sriov", sriov={"guc_firmware": False}))
    guc = checks["sriov-guc-fw"]
    assert guc["status"] == "fail" and "No GuC firmware for Alder Lake-S (/lib/firmware/i915/tgl_guc_*.bin)" \
        in guc["detail"] and "linux-firmware" in guc["fix"]
    assert checks["sriov-params"]["blocked_by"] == "sriov-guc-fw" and checks["sriov-vfs"]["status"] == "skip"
    assert doctor(mount_host("n100-sriov"))["sriov-guc-fw"]["detail"] == (
        "GuC firmware for Alder Lake-N is installed (adlp_guc_70.bin).")


def test_iommu_off(mount_host: MountFn) -> None:
    checks = doctor(mount_host("adl-sriov", cmdline=NO_IOMMU))
    iommu = checks["sriov-iommu"]
    assert iommu["status"] == "fail" and iommu["detail"].startswith("The IOMMU (VT-d) is off: vfio-pci")
    assert "intel_iommu=on" in iommu["fix"] and checks["sriov-vfs"]["blocked_by"] == "sriov-iommu"


def test_xe_on_an_alder_lake_igpu_is_experimental(mount_host: MountFn) -> None:
    pf = doctor(mount_host("mtl-xe", sriov={"device_id": 0x4680, "xe_has_sriov": True}))["sriov-pf"]
    assert pf["status"] == "warn" and "xe's SR-IOV on Alder Lake-S is experimental" in pf["detail"]
    assert "i915-sriov-dkms" in pf["fix"] and "module_blacklist=xe" in pf["fix"]


def test_xe_max_vfs(mount_host: MountFn) -> None:
    params = doctor(mount_host("b60-xe", cmdline="BOOT_IMAGE=/boot/vmlinuz ro intel_iommu=on xe.max_vfs=0"))[
        "sriov-params"]
    assert params["status"] == "fail" and "xe.max_vfs is 0" in params["detail"]
    assert params["fix"].startswith("remove xe.max_vfs=0")
    assert {"path": "/sys/kernel/config/xe/0000:03:00.0/sriov/max_vfs", "value": "unlimited"} in params["evidence"]
    params = doctor(mount_host("mtl-xe"))["sriov-params"]
    assert params["status"] == "fail" and "Meteor Lake has no SR-IOV under xe" in params["detail"]
    assert params["fix"].startswith("use i915-sriov-dkms for this iGPU")


def test_vfs_that_do_not_come_back_at_boot(mount_host: MountFn, tmp_path: Path) -> None:
    root = mount_host("adl-sriov")
    result = CliRunner().invoke(cli, ["--root", str(root.root), "--state-dir", str(tmp_path / "s"), "vfs", "enable",
                                      PF, "2"])
    assert result.exit_code == 0, result.output
    boot = doctor(root)["sriov-boot"]
    assert boot["status"] == "warn" and boot["detail"].startswith(f"VFs are enabled now ({PF}: 2) but nothing makes")
    assert "vgpuctl-vfs.service" in boot["fix"]
    units = root.path("/etc/systemd/system")
    units.mkdir(parents=True, exist_ok=True)
    (units / "vgpuctl-vfs.service").write_text("[Unit]\n")
    boot = doctor(root)["sriov-boot"]
    assert boot["status"] == "warn" and boot["fix"] == "systemctl enable vgpuctl-vfs.service"
    (units / "multi-user.target.wants").mkdir()
    os.symlink("/etc/systemd/system/vgpuctl-vfs.service", units / "multi-user.target.wants/vgpuctl-vfs.service")
    boot = doctor(root)["sriov-boot"]
    assert boot["status"] == "ok" and boot["detail"].startswith("vgpuctl-vfs.service makes the VFs again at boot")


# ---------------------------------------------------------------- NVIDIA vendor-specific VFIO


def sriov_manage(root: HostRoot, *args: str) -> None:
    done = subprocess.run(["sh", str(root.path("/usr/lib/nvidia/sriov-manage")), *args], capture_output=True,
                          text=True, timeout=30)
    assert done.returncode == 0, done.stderr


def test_nvidia_vfs_enabled_ready_and_not_persisted(mount_host: MountFn) -> None:
    root = mount_host("l40s-vfio")
    checks = doctor(root)
    assert checks["nvidia-pf"]["status"] == "ok" and "under nvidia, up to 32 VFs" in checks["nvidia-pf"]["detail"]
    vfs = checks["nvidia-vfs"]
    assert vfs["status"] == "warn" and vfs["detail"].startswith(f"No VFs enabled on {NVIDIA_PF}")
    assert vfs["fix"].startswith(f"/usr/lib/nvidia/sriov-manage -e {NVIDIA_PF}")
    assert checks["nvidia-boot"]["status"] == "ok" and statuses(checks, SRIOV_CHECKS) == dict.fromkeys(
        SRIOV_CHECKS, "skip")
    sriov_manage(root, "-e", "ALL")
    checks = doctor(root)
    assert checks["nvidia-vfs"]["status"] == "ok" and checks["nvidia-vfs"]["detail"].startswith("32 VFs on nvidia")
    assert checks["nvidia-boot"]["status"] == "warn" and "pve-nvidia-sriov@ALL.service" in checks["nvidia-boot"]["fix"]
    wants = root.path("/etc/systemd/system/multi-user.target.wants")
    wants.mkdir(parents=True)
    os.symlink("/lib/systemd/system/pve-nvidia-sriov@.service", wants / "pve-nvidia-sriov@ALL.service")
    assert doctor(root)["nvidia-boot"]["detail"] == "pve-nvidia-sriov@ALL.service enables the VFs again at boot."


def test_nvidia_vf_rebound_away_from_nvidia_is_broken(mount_host: MountFn) -> None:
    root = mount_host("l40s-vfio")
    sriov_manage(root, "-e", "ALL")
    root.write_text("/sys/bus/pci/drivers/nvidia/unbind", "0000:41:00.4\n")
    vfs = doctor(root)["nvidia-vfs"]
    assert vfs["status"] == "fail" and vfs["detail"].startswith("VFs not usable for vGPUs: 0000:41:00.4 (no driver)")
    assert vfs["fix"].startswith(f"/usr/lib/nvidia/sriov-manage -d {NVIDIA_PF} && /usr/lib/nvidia/sriov-manage -e")


def test_nvidia_without_the_vgpu_host_driver(mount_host: MountFn) -> None:
    checks = doctor(mount_host("l40s-vfio", sriov={"vgpu_driver": False}))
    pf = checks["nvidia-pf"]
    assert pf["status"] == "fail" and "not NVIDIA's vGPU host driver (no sriov-manage)" in pf["detail"]
    assert "vGPU host driver for KVM" in pf["fix"] and checks["nvidia-vfs"]["blocked_by"] == "nvidia-pf"


def test_nvidia_vfs_without_iommu_groups(mount_host: MountFn) -> None:
    root = mount_host("l40s-vfio", cmdline="BOOT_IMAGE=/boot/vmlinuz ro quiet")
    sriov_manage(root, "-e", "ALL")
    vfs = doctor(root)["nvidia-vfs"]
    assert vfs["status"] == "fail" and "without an IOMMU group" in vfs["detail"] and "intel_iommu=on" in vfs["fix"]
