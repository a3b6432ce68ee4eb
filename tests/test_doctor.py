"""``vgpuctl doctor``: every scenario of the issue on a mounted simulated host, and the real machine.

Each scenario runs the CLI in-process (``vgpuctl --root DIR doctor --json``) and asserts the
statuses of the checks that matter for it and the fix text. Simulated hosts use ``--no-guest``
where the guest probe is irrelevant (it is not run on a simulated host anyway). QEMU is this
machine's real binary (Debian's qemu-system-x86), also for simulated hosts.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from tests.conftest import MountFn
from vgpuctl.backends.doctor import all_checks, run_doctor
from vgpuctl.backends.gvt_capacity import gvt_allows
from vgpuctl.cli.app import cli
from vgpuctl.host import HostRoot
from vgpuctl.host.doctor import Report
from vgpuctl.host.kvm import KvmReport
from vgpuctl.host.qemu import QEMU_ENV, probe_qemu

pytestmark = pytest.mark.fuse

ORDER = [spec.id for spec in all_checks()]
NO_GVT_FLAG = "BOOT_IMAGE=/boot/vmlinuz-{release} root=/dev/sda1 ro quiet intel_iommu=on kvm.ignore_msrs=1"
GVT_DEPENDENT = ("kernel-config", "enable-gvt", "guc", "iommu", "modules", "mdev-types", "aperture")
QEMU_CHECKS = ("qemu", "qemu-kvm", "qemu-vfio", "qemu-ramfb", "qemu-display")


@pytest.fixture(autouse=True)
def _qemu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(QEMU_ENV, raising=False)
    if shutil.which("qemu-system-x86_64") is None:
        pytest.fail("qemu-system-x86_64 is required: apt-get install qemu-system-x86 (make test does)")


class Result:
    def __init__(self, code: int, data: dict[str, Any]) -> None:
        self.code, self.data = code, data
        self.checks: dict[str, dict[str, Any]] = {c["id"]: c for c in data["checks"]}

    def status(self, check_id: str) -> str:
        return str(self.checks[check_id]["status"])

    def fix(self, check_id: str) -> str:
        return str(self.checks[check_id]["fix"] or "")

    def detail(self, check_id: str) -> str:
        return str(self.checks[check_id]["detail"])

    def evidence(self, check_id: str) -> dict[str, str]:
        return {e["path"]: e["value"] for e in self.checks[check_id]["evidence"]}

    def statuses(self, *ids: str) -> dict[str, str]:
        return {i: self.status(i) for i in ids}


def doctor(root: HostRoot | str, *args: str) -> Result:
    result = CliRunner().invoke(cli, ["--root", str(root.root if isinstance(root, HostRoot) else root),
                                      "doctor", "--json", *args])
    assert result.exception is None or isinstance(result.exception, SystemExit), result.output
    data = json.loads(result.stdout)
    assert [c["id"] for c in data["checks"]] == ORDER
    assert result.exit_code == (0 if data["ready"] else 1)
    return Result(result.exit_code, data)


def qemu_has_gl_display() -> bool:
    """Whether this machine's QEMU lists an OpenGL display (its UI modules come with qemu-system-gui)."""
    report = probe_qemu()
    return bool({"egl-headless", "gtk", "sdl", "dbus", "spice-app"} & set(report.displays)) or report.spice


def assert_qemu_ok(r: Result) -> None:
    """QEMU checks on a host with a DRM render node: all ok (qemu-display: if the QEMU has an OpenGL UI)."""
    display = "ok" if qemu_has_gl_display() else "warn"
    assert r.statuses(*QEMU_CHECKS) == {**dict.fromkeys(QEMU_CHECKS, "ok"), "qemu-display": display}
    assert re.fullmatch(r"\d+\.\d+(\.\d+)?", r.evidence("qemu")["/usr/bin/qemu-system-x86_64 -version"])


def assert_gvt_skipped(r: Result) -> None:
    for check_id in GVT_DEPENDENT:
        assert r.status(check_id) == "skip", check_id
        assert r.checks[check_id]["blocked_by"] == "igpu"
        assert "needs igpu" in r.detail(check_id) and "which failed" in r.detail(check_id)


# ---------------------------------------------------------------- ready hosts


def test_ready_skylake_on_6x(mount_host: MountFn) -> None:
    r = doctor(mount_host("skylake", kernel="6.8.0", aperture_mib=1024))
    skipped = tuple(i for i in ORDER if i.startswith(("sriov-", "nvidia-")))  # no SR-IOV GPU
    ok = [i for i in ORDER if i not in ("kvm-device", "kvm-guest", "qemu-display", "mdev-parents", *skipped)]
    assert r.statuses(*ok) == dict.fromkeys(ok, "ok")
    assert r.status("mdev-parents") == "skip"  # no mdev parent but GVT-g's
    assert r.statuses(*skipped) == dict.fromkeys(skipped, "skip")  # no Intel SR-IOV GPU
    assert all(r.fix(i) == "" for i in ok)
    assert "/dev/dri/renderD128" in r.detail("qemu-display") or r.status("qemu-display") == "warn"
    assert r.code == 0 and r.data["ready"] and r.data["simulated"] and r.data["kernel"] == "6.8.0"
    if qemu_has_gl_display():
        assert r.data["verdict"] == "READY: this host can run GVT-g vGPUs"
    # The simulated host's /dev/kvm is a node, not a KVM: never probed, never a failure.
    assert r.status("kvm-device") == "skip" and r.detail("kvm-device").startswith("simulated /dev/kvm: not probed")
    assert r.status("kvm-guest") == "skip" and "Simulated host" in r.detail("kvm-guest")
    assert "Skylake (Gen9)" in r.detail("igpu") and "i915-GVTg_V5_*" in r.detail("igpu")
    assert r.evidence("kernel-config")["/boot/config-6.8.0"]  # read from the simulated /boot
    assert "kvmgt: loaded" in r.checks["modules"]["evidence"][1]["value"]
    assert "i915-GVTg_V5_8" in r.detail("mdev-types")
    assert "up to 7 vGPUs" in r.detail("aperture")
    assert r.evidence("cpu-virt")["/proc/cpuinfo flags"] == "vmx"
    assert_qemu_ok(r)


def test_human_output_marks_evidence_fix_and_verdict_last(mount_host: MountFn) -> None:
    root = mount_host("skylake", aperture_mib=256)
    result = CliRunner().invoke(cli, ["--root", str(root.root), "doctor", "--no-guest"])
    assert result.exit_code == 0
    lines = result.stdout.rstrip("\n").splitlines()
    expected = "1 warning: aperture" if qemu_has_gl_display() else "2 warnings: aperture, qemu-display"
    assert lines[-1] == f"READY: this host can run GVT-g vGPUs ({expected})"
    assert any(line.startswith("✓ igpu ") for line in lines)
    assert any(line.startswith("! aperture ") for line in lines)
    assert any(line.startswith("- kvm-device ") for line in lines)
    assert any("· /sys/bus/pci/devices/0000:00:02.0/resource: BAR2 256 MiB" in line for line in lines)
    assert any("fix: In the firmware setup" in line for line in lines)


def test_broadwell_on_4_10(mount_host: MountFn) -> None:
    r = doctor(mount_host("broadwell", kernel="4.10.10"), "--no-guest")
    # Supported since 4.10, but 4.10 predates the vGPU display (dma-buf, 4.16).
    assert r.status("igpu") == "warn" and "Broadwell (Gen8)" in r.detail("igpu")
    assert "i915-GVTg_V4_*" in r.detail("igpu") and "4.16" in r.detail("igpu")
    assert "kernel >= 4.16" in r.fix("igpu")
    # The 4.10-5.13 era needs vfio_mdev (CONFIG_VFIO_MDEV_DEVICE) too.
    assert r.status("kernel-config") == "ok"
    assert "CONFIG_VFIO_MDEV_DEVICE=m" in r.checks["kernel-config"]["evidence"][6]["value"]
    assert r.status("modules") == "ok" and "vfio_mdev" in r.detail("modules")
    assert r.status("mdev-types") == "ok" and "i915-GVTg_V4_" in r.detail("mdev-types")
    assert r.statuses("enable-gvt", "guc", "ignore-msrs", "iommu", "aperture", "cpu-virt", "vfio-device") == \
        dict.fromkeys(("enable-gvt", "guc", "ignore-msrs", "iommu", "aperture", "cpu-virt", "vfio-device"), "ok")
    assert r.code == 0 and r.data["verdict"].startswith("READY") and "igpu" in r.data["verdict"]


# ---------------------------------------------------------------- the GPU


def test_coffeelake_on_4_19_needs_5_1(mount_host: MountFn) -> None:
    r = doctor(mount_host("coffeelake", kernel="4.19.0"), "--no-guest")
    assert r.status("igpu") == "fail"
    assert "Coffee Lake is supported by GVT-g from Linux 5.1; this kernel is 4.19.0" in r.detail("igpu")
    assert r.fix("igpu").startswith("Boot a kernel >= 5.1 built with the GVT-g options")
    assert_gvt_skipped(r)
    assert r.code == 1 and r.data["verdict"].startswith("NOT READY: 1 check failed (igpu)")


def test_kabylake_on_4_12_only_591d(mount_host: MountFn) -> None:
    r = doctor(mount_host("kabylake", kernel="4.12.0"), "--no-guest")
    assert r.status("igpu") == "fail" and "accepts only 0x591D" in r.detail("igpu")
    assert "Boot a kernel >= 4.13" in r.fix("igpu")


def test_tigerlake_explains_sriov(mount_host: MountFn) -> None:
    r = doctor(mount_host("tigerlake"), "--no-guest")
    assert r.status("igpu") == "fail"
    detail = r.detail("igpu")
    assert "Tiger Lake (Gen12) has no GVT-g" in detail and "SR-IOV" in detail and "vfio-pci" in detail
    assert "i915-sriov-dkms" in detail
    assert "i915.enable_guc=3 i915.max_vfs=7" in r.fix("igpu")
    assert "vgpuctl vfs enable 0000:00:02.0 7" in r.fix("igpu")
    assert_gvt_skipped(r)
    # KVM, VFIO and QEMU do not depend on the GPU: they are still checked.
    assert r.statuses("cpu-virt", "vfio-device", "ignore-msrs") == {"cpu-virt": "ok", "vfio-device": "ok",
                                                                   "ignore-msrs": "ok"}
    assert_qemu_ok(r)


def test_icelake_has_neither_gvt_nor_sriov(mount_host: MountFn) -> None:
    r = doctor(mount_host("icelake"), "--no-guest")
    assert r.status("igpu") == "fail" and "no SR-IOV either" in r.detail("igpu")
    assert "GVT-d" in r.fix("igpu")


def test_amd_host_has_no_intel_igpu(mount_host: MountFn) -> None:
    r = doctor(mount_host("amd"), "--no-guest")
    assert r.status("igpu") == "fail"
    assert r.detail("igpu").startswith(
        "No Intel iGPU: 0000:00:02.0 is a display controller from AMD (1002:1638).")
    assert r.fix("igpu").startswith("No software fix")
    assert r.evidence("igpu")["/sys/bus/pci/devices/0000:00:02.0/vendor"] == "0x1002"
    assert_gvt_skipped(r)
    assert r.status("cpu-virt") == "ok" and r.evidence("cpu-virt")["/proc/cpuinfo flags"] == "svm"
    assert "AMD Ryzen" in r.evidence("cpu-virt")["/proc/cpuinfo model name"]
    assert r.status("kvm-device") == "skip"  # kvm_amd loaded: a simulated /dev/kvm
    assert r.code == 1


def test_no_gpu_at_all(mount_host: MountFn) -> None:
    r = doctor(mount_host("amd"), "--no-guest")  # an AMD iGPU, no mdev parent at all
    assert r.status("igpu") == "fail" and r.detail("igpu").startswith("No Intel iGPU: 0000:00:02.0 is")
    assert r.status("mdev-parents") == "skip" and r.status("kernel-config") == "skip"


@pytest.mark.parametrize(("preset", "parents"), [("samples", ["mbochs", "mdpy", "mtty"]),
                                                 ("nvidia-t4", ["0000:3b:00.0"])])
def test_hosts_whose_vgpus_are_not_gvt_need_no_intel_igpu(mount_host: MountFn, preset: str,
                                                          parents: list[str]) -> None:
    r = doctor(mount_host(preset), "--no-guest")
    assert r.status("igpu") == "skip" and r.detail("igpu").startswith("No Intel iGPU, so no GVT-g: not needed here")
    assert all(r.detail(c).startswith("Not needed on this host: no Intel iGPU") for c in GVT_DEPENDENT)
    assert r.status("mdev-parents") == "ok"
    assert [p.rsplit("/", 2)[-2] for p in r.evidence("mdev-parents")] == parents
    assert "igpu" not in [c["id"] for c in r.data["checks"] if c["status"] == "fail"]


# ---------------------------------------------------------------- kernel configuration


def test_kernel_without_kvmgt(mount_host: MountFn) -> None:
    r = doctor(mount_host("skylake", kconfig=["CONFIG_DRM_I915_GVT_KVMGT=n", "CONFIG_VFIO_MDEV=n"]), "--no-guest")
    assert r.status("kernel-config") == "fail"
    assert "lacks CONFIG_DRM_I915_GVT_KVMGT, CONFIG_VFIO_MDEV" in r.detail("kernel-config")
    fix = r.fix("kernel-config")
    assert "scripts/kconfig/merge_config.sh .config gvt.config" in fix
    assert fix.splitlines()[1:] == [
        "# gvt.config: Intel GVT-g (KVMGT) host, Linux 6.8.0", "CONFIG_DRM_I915=m",
        "CONFIG_DRM_I915_GVT_KVMGT=m  # selects DRM_I915_GVT (hidden since 5.19)", "CONFIG_VFIO=m",
        "CONFIG_VFIO_GROUP=y", "CONFIG_VFIO_IOMMU_TYPE1=m", "CONFIG_VFIO_MDEV=m", "CONFIG_KVM=m",
        "CONFIG_KVM_INTEL=m", "CONFIG_INTEL_IOMMU=y"]
    for check_id in ("modules", "mdev-types"):
        assert r.status(check_id) == "skip" and r.checks[check_id]["blocked_by"] == "kernel-config"


def test_kconfig_fragment_for_the_4_x_era(mount_host: MountFn) -> None:
    r = doctor(mount_host("skylake", kernel="4.14.0", kconfig=["CONFIG_VFIO_MDEV_DEVICE=n"]), "--no-guest")
    assert r.status("kernel-config") == "fail" and "lacks CONFIG_VFIO_MDEV_DEVICE" in r.detail("kernel-config")
    fragment = r.fix("kernel-config").splitlines()
    assert "CONFIG_DRM_I915_GVT=y" in fragment and "CONFIG_VFIO_MDEV_DEVICE=m" in fragment
    assert "CONFIG_VFIO_GROUP=y" not in fragment


@pytest.mark.parametrize("where", ["proc", "none"])
def test_kernel_config_from_proc_or_module_files(mount_host: MountFn, where: str) -> None:
    r = doctor(mount_host("skylake", kconfig_file=where), "--no-guest")
    assert r.status("kernel-config") == "ok"
    if where == "proc":
        assert "/proc/config.gz" in r.evidence("kernel-config")
    else:
        assert "judged from the kernel's module files" in r.detail("kernel-config")
        assert r.evidence("kernel-config")["/lib/modules/6.8.0/modules.dep"].endswith("kvm-intel.ko")


def test_module_files_show_missing_kvmgt(mount_host: MountFn) -> None:
    r = doctor(mount_host("skylake", kconfig_file="none", kconfig=["CONFIG_DRM_I915_GVT_KVMGT=n"]), "--no-guest")
    assert r.status("kernel-config") == "fail" and "has no kvmgt module" in r.detail("kernel-config")
    assert "CONFIG_DRM_I915_GVT_KVMGT=m" in r.fix("kernel-config")


# ---------------------------------------------------------------- command line and modprobe.d


def test_enable_gvt_missing(mount_host: MountFn) -> None:
    r = doctor(mount_host("skylake", cmdline=NO_GVT_FLAG), "--no-guest")
    assert r.status("enable-gvt") == "fail"
    assert r.detail("enable-gvt").startswith("i915.enable_gvt=1 is not set")
    assert r.evidence("enable-gvt") == {"/proc/cmdline": "no i915.enable_gvt",
                                        "/sys/module/i915/parameters/enable_gvt": "N"}
    assert r.fix("enable-gvt").splitlines() == [
        "vgpuctl setup plan && vgpuctl setup apply  # any boot loader; backed up, 'setup revert' undoes it",
        "or add it to the kernel command line by hand:",
        "sed -i 's/^GRUB_CMDLINE_LINUX_DEFAULT=\"/&i915.enable_gvt=1 /' /etc/default/grub && update-grub && reboot",
        "or: echo 'options i915 enable_gvt=1' > /etc/modprobe.d/i915-gvt.conf && update-initramfs -u && reboot"]
    # 6.x: kvmgt loads anyway and registers nothing; that is reported as its own failure.
    assert r.status("modules") == "ok"
    assert r.status("mdev-types") == "fail"
    assert "kvmgt is loaded but registered no mdev types" in r.detail("mdev-types")
    assert "(1) i915.enable_gvt=1 is not in effect" in r.detail("mdev-types")
    assert r.fix("mdev-types") == r.fix("enable-gvt")
    assert r.code == 1


def test_enable_gvt_missing_on_5_15_kvmgt_refuses_to_load(mount_host: MountFn) -> None:
    r = doctor(mount_host("skylake", kernel="5.15.0", cmdline=NO_GVT_FLAG), "--no-guest")
    assert r.status("enable-gvt") == "fail"
    assert r.status("modules") == "fail" and "Not loaded: kvmgt" in r.detail("modules")
    assert "'modprobe kvmgt' fails with 'No such device'" in r.detail("modules")
    assert r.status("mdev-types") == "skip" and r.checks["mdev-types"]["blocked_by"] == "modules"


def test_enable_gvt_in_modprobe_d_not_yet_in_effect(mount_host: MountFn) -> None:
    root = mount_host("skylake", cmdline=NO_GVT_FLAG)
    Path(root.path("/etc/modprobe.d/i915.conf")).write_text("# GVT-g\noptions i915 enable_gvt=1 enable_guc=0\n")
    r = doctor(root, "--no-guest")
    assert r.status("enable-gvt") == "fail"
    assert "configured in /etc/modprobe.d/i915.conf but not in effect" in r.detail("enable-gvt")
    assert r.evidence("enable-gvt")["/etc/modprobe.d/i915.conf"] == "options i915 enable_gvt=1"
    assert r.fix("enable-gvt") == "update-initramfs -u && reboot"


def test_guc_submission_on(mount_host: MountFn) -> None:
    cmdline = "BOOT_IMAGE=/boot/vmlinuz-{release} root=/dev/sda1 ro quiet " \
              "intel_iommu=on i915.enable_gvt=1 i915.enable_guc=3 kvm.ignore_msrs=1"
    r = doctor(mount_host("skylake", cmdline=cmdline), "--no-guest")
    assert r.status("enable-gvt") == "ok"
    assert r.status("guc") == "fail"
    assert "GuC submission is requested (enable_guc=3)" in r.detail("guc")
    assert r.evidence("guc")["/sys/module/i915/parameters/enable_guc"] == "3"
    assert r.fix("guc").startswith("sed -i -e 's/i915.enable_guc=[0-9-]*/i915.enable_guc=0/'")
    assert "/etc/default/grub && update-grub && reboot" in r.fix("guc")
    assert r.status("mdev-types") == "fail" and "(1) GuC submission is requested" in r.detail("mdev-types")
    assert r.fix("mdev-types") == r.fix("guc")


def test_huc_only_is_fine(mount_host: MountFn) -> None:
    cmdline = "BOOT_IMAGE=/boot/vmlinuz-{release} root=/dev/sda1 ro intel_iommu=on i915.enable_gvt=1 i915.enable_guc=2"
    r = doctor(mount_host("skylake", cmdline=cmdline, aperture_mib=1024), "--no-guest")
    assert r.status("guc") == "ok" and "enable_guc=2" in r.detail("guc")
    # No kvm.ignore_msrs here: a warning (Windows guests), with the runtime and the persistent fix.
    assert r.status("ignore-msrs") == "warn" and "Windows guests" in r.detail("ignore-msrs")
    assert r.fix("ignore-msrs").splitlines() == [
        "echo 1 > /sys/module/kvm/parameters/ignore_msrs",
        "echo 'options kvm ignore_msrs=1 report_ignored_msrs=0' > /etc/modprobe.d/kvm-ignore-msrs.conf"]
    assert r.code == 0


def test_ignore_msrs_set_at_runtime_only_and_no_iommu(mount_host: MountFn) -> None:
    root = mount_host("skylake", cmdline="BOOT_IMAGE=/boot/vmlinuz-{release} root=/dev/sda1 ro i915.enable_gvt=1")
    root.write_text("/sys/module/kvm/parameters/ignore_msrs", "1")
    r = doctor(root, "--no-guest")
    assert r.status("ignore-msrs") == "warn" and "lost at the next boot" in r.detail("ignore-msrs")
    assert r.fix("ignore-msrs") == \
        "echo 'options kvm ignore_msrs=1 report_ignored_msrs=0' > /etc/modprobe.d/kvm-ignore-msrs.conf"
    assert r.status("iommu") == "warn" and "not required" in r.detail("iommu")
    assert "GRUB_CMDLINE_LINUX_DEFAULT=\"/&intel_iommu=on /" in r.fix("iommu")


# ---------------------------------------------------------------- modules and mdev types


def test_kvmgt_not_loaded_then_loaded(mount_host: MountFn) -> None:
    root = mount_host("skylake", defer=["kvmgt"], aperture_mib=1024)
    r = doctor(root, "--no-guest")
    assert r.status("modules") == "fail" and r.detail("modules").startswith("Not loaded: kvmgt.")
    assert r.fix("modules").splitlines() == [
        "modprobe -a kvmgt", "printf '%s\\n' kvmgt > /etc/modules-load.d/vgpuctl.conf  # load them at every boot"]
    assert r.status("mdev-types") == "skip" and r.checks["mdev-types"]["blocked_by"] == "modules"
    assert "kvmgt is not loaded" in r.detail("mdev-types")
    assert r.code == 1
    root.write_text("/.vgpuctl-sim-control", "load kvmgt\n")
    after = doctor(root, "--no-guest")
    assert after.statuses("modules", "mdev-types") == {"modules": "ok", "mdev-types": "ok"}
    assert after.code == 0


def test_i915_not_loaded(mount_host: MountFn) -> None:
    r = doctor(mount_host("skylake", modules=["mdev", "vfio", "vfio_iommu_type1", "kvm", "kvm_intel"]), "--no-guest")
    assert r.status("modules") == "fail" and r.detail("modules").startswith("Not loaded: i915, kvmgt.")
    assert r.fix("modules").splitlines()[:2] == ["modprobe i915 enable_gvt=1", "modprobe -a kvmgt"]
    assert r.evidence("enable-gvt")["/sys/module/i915/parameters/enable_gvt"] == "absent: i915 not loaded"
    assert r.status("enable-gvt") == "ok" and "not confirmed in effect" in r.detail("enable-gvt")


def test_kvmgt_loaded_but_no_types(mount_host: MountFn) -> None:
    root = mount_host("skylake", aperture_mib=128)
    assert root.listdir("/sys/bus/pci/devices/0000:00:02.0/mdev_supported_types") == []
    r = doctor(root, "--no-guest")
    assert r.statuses("enable-gvt", "guc", "modules") == {"enable-gvt": "ok", "guc": "ok", "modules": "ok"}
    assert r.status("mdev-types") == "fail"
    detail = r.detail("mdev-types")
    assert detail.startswith("kvmgt is loaded but registered no mdev types")
    assert "(1) the BIOS aperture is 128 MiB" in detail and "(2) GVT-g device init failed inside i915" in detail
    assert "dmesg | grep -iE 'gvt|kvmgt'" in detail
    assert r.evidence("mdev-types")["/sys/bus/pci/devices/0000:00:02.0/mdev_supported_types"] == "empty"
    assert "'Aperture Size' to 1024 MiB" in r.fix("mdev-types")
    assert r.status("aperture") == "fail" and "no vGPU type is registered" in r.detail("aperture")
    assert r.code == 1


# ---------------------------------------------------------------- aperture


def test_aperture_256_mib(mount_host: MountFn) -> None:
    r = doctor(mount_host("skylake", aperture_mib=256), "--no-guest")
    assert r.status("aperture") == "warn"
    assert r.detail("aperture") == ("256 MiB aperture: i915-GVTg_V5_8 x2, i915-GVTg_V5_4 x1 on an idle GPU: "
                                    "at most 2 vGPUs at once. A larger aperture allows more.")
    assert r.fix("aperture") == ("In the firmware setup (often Chipset > Graphics Configuration), set 'Aperture Size' "
                                 "to 1024 MiB: then i915-GVTg_V5_8 x7, i915-GVTg_V5_4 x5, i915-GVTg_V5_2 x2, "
                                 "i915-GVTg_V5_1 x1 (at most 7 vGPUs).")
    assert r.evidence("aperture")[
        "/sys/bus/pci/devices/0000:00:02.0/mdev_supported_types/i915-GVTg_V5_8/available_instances"] == "2"
    assert r.status("mdev-types") == "ok" and r.code == 0


def test_aperture_all_in_use(mount_host: MountFn) -> None:
    root = mount_host("skylake", aperture_mib=512)
    types = "/sys/bus/pci/devices/0000:00:02.0/mdev_supported_types"
    for n in range(3):
        root.write_text(f"{types}/i915-GVTg_V5_4/create", f"11111111-0000-4000-8000-00000000000{n}")
    r = doctor(root, "--no-guest")
    assert r.status("aperture") == "warn" and "the vGPUs in use hold all of it" in r.detail("aperture")


def test_gvt_allows_matches_the_spec_table() -> None:
    assert gvt_allows(128, (6, 8), 9) == []
    assert gvt_allows(512, (6, 8), 9) == [("i915-GVTg_V5_8", 6), ("i915-GVTg_V5_4", 3), ("i915-GVTg_V5_2", 1)]
    assert gvt_allows(2048, (6, 8), 8) == [("i915-GVTg_V4_8", 4), ("i915-GVTg_V4_4", 3), ("i915-GVTg_V4_2", 1),
                                           ("i915-GVTg_V4_1", 0)]


# ---------------------------------------------------------------- KVM


def test_no_dev_kvm_vtx_off(mount_host: MountFn) -> None:
    r = doctor(mount_host("skylake", virt=False), "--no-guest")
    assert r.status("kvm-device") == "fail"
    assert r.detail("kvm-device").startswith("No /dev/kvm: kvm_intel is not loaded")
    assert r.evidence("kvm-device") == {"/dev/kvm": "absent", "/proc/modules": "kvm_intel: not loaded"}
    assert r.fix("kvm-device") == ("Enable 'Intel Virtualization Technology' (VT-x) or AMD-V (SVM) in the firmware "
                                   "setup, then: modprobe kvm_intel")
    assert r.status("cpu-virt") == "fail" and "VT-x/AMD-V is off in the firmware" in r.detail("cpu-virt")
    assert r.evidence("cpu-virt")["/proc/cpuinfo flags"] == "no vmx, no svm"
    assert r.status("modules") == "fail" and "kvm_intel cannot load without VT-x" in r.detail("modules")
    assert r.status("kvm-guest") == "skip" and r.checks["kvm-guest"]["blocked_by"] == "kvm-device"
    assert r.status("qemu-kvm") == "skip"
    assert r.code == 1


def test_no_dev_kvm_module_not_loaded(mount_host: MountFn) -> None:
    modules = ["i915", "kvmgt", "mdev", "vfio", "vfio_iommu_type1", "kvm"]
    r = doctor(mount_host("skylake", modules=modules), "--no-guest")
    assert r.status("cpu-virt") == "ok"
    assert r.status("kvm-device") == "fail" and r.fix("kvm-device") == "modprobe kvm_intel"
    assert r.status("modules") == "fail" and r.fix("modules").startswith("modprobe -a kvm_intel")


def test_vfio_not_loaded(mount_host: MountFn) -> None:
    modules = ["i915", "kvmgt", "mdev", "kvm", "kvm_intel"]
    r = doctor(mount_host("skylake", modules=modules), "--no-guest")
    assert r.status("vfio-device") == "fail" and r.fix("vfio-device") == "modprobe -a vfio vfio_iommu_type1"


def _kvm(**changes: Any) -> KvmReport:
    fields: dict[str, Any] = {"device_present": True, "device_opens": True, "api_version": 12, "cpu_flag": "vmx",
                              "nested_hypervisor": False, "guest_runs": True, "guest_error": None,
                              "detail": "KVM works."}
    fields.update(changes)
    return KvmReport(**fields)


def test_kvm_guest_runs_with_a_working_kvm() -> None:
    """This machine's files, a KVM probe that says the guest ran: kvm-guest and qemu-kvm pass."""
    report = run_doctor(HostRoot(Path("/")), kvm_probe=lambda root, qemu, guest: _kvm())
    assert report.check("kvm-guest").status == "ok"
    assert report.check("qemu-kvm").status == "ok"
    assert "KVM runs guests here" in report.check("qemu-kvm").detail


def test_kvm_device_that_does_not_open() -> None:
    report = run_doctor(HostRoot(Path("/")), run_guest=False,
                        kvm_probe=lambda root, qemu, guest: _kvm(device_opens=False, guest_runs=None))
    check = report.check("kvm-device")
    assert check.status == "fail" and check.fix == "usermod -aG kvm $USER  # then log in again (or run as root)"
    assert report.check("kvm-guest").status == "skip"


def test_kvm_guest_timeout_is_not_a_verdict_on_kvm() -> None:
    report = run_doctor(HostRoot(Path("/")), kvm_probe=lambda root, qemu, guest: _kvm(
        guest_runs=False, guest_error="no result within 0.7 s"))
    check = report.check("kvm-guest")
    assert check.status == "warn" and "whether KVM runs guests here is unknown" in check.detail


def test_nested_kvm_internal_error_without_pvm() -> None:
    report = run_doctor(HostRoot(Path("/")), kvm_probe=lambda root, qemu, guest: _kvm(
        cpu_flag=None, nested_hypervisor=True, guest_runs=False, guest_error="KVM internal error. Suberror: 1"))
    check = report.check("kvm-guest")
    assert check.status == "fail" and check.detail.startswith("KVM cannot run ordinary guests here")
    assert "TCG" in check.detail and check.fix is not None and "nested=1" in check.fix


def test_a_broken_probe_does_not_break_the_report() -> None:
    def broken(root: HostRoot, qemu: str | None, guest: bool) -> KvmReport:
        raise RuntimeError("boom")

    report = run_doctor(HostRoot(Path("/")), kvm_probe=broken)
    assert report.check("kvm-device").status == "skip" and "boom" in report.check("kvm-device").detail
    assert len(report.checks) == len(all_checks())


def test_memlock_warns_without_cap_ipc_lock(monkeypatch: pytest.MonkeyPatch) -> None:
    import resource

    from vgpuctl.host import doctor as doctor_module

    monkeypatch.setattr(resource, "getrlimit", lambda which: (8 << 20, 8 << 20))
    monkeypatch.setattr(doctor_module, "_cap_ipc_lock", lambda: False)
    report = run_doctor(HostRoot(Path("/")), run_guest=False)
    check = report.check("memlock")
    assert check.status == "warn" and "RLIMIT_MEMLOCK is 8 MiB" in check.detail
    assert "5120 MiB for a 4 GiB guest" in check.detail and "unverified" in check.detail
    assert check.fix is not None and check.fix.startswith("ulimit -l unlimited")
    assert "/etc/security/limits.d/vgpuctl-memlock.conf" in check.fix


# ---------------------------------------------------------------- QEMU


def test_no_qemu(mount_host: MountFn) -> None:
    r = doctor(mount_host("skylake", aperture_mib=1024), "--no-guest", "--qemu", "/nonexistent/qemu")
    assert r.status("qemu") == "fail" and r.fix("qemu").startswith("apt-get install qemu-system-x86")
    assert "not found or not executable" in r.evidence("qemu")["QEMU probe"]
    for check_id in QEMU_CHECKS[1:]:
        assert r.status(check_id) == "skip" and r.checks[check_id]["blocked_by"] == "qemu"
    assert r.code == 1 and r.data["verdict"].startswith("NOT READY: 1 check failed (qemu)")


def test_qemu_that_hangs(tmp_path: Path) -> None:
    """Both probes time out (0.7 s): QEMU fails, the guest is 'unknown', and the run stays short."""
    fake = tmp_path / "qemu-system-x86_64"
    fake.write_text("#!/bin/sh\nexec sleep 30\n")
    fake.chmod(0o755)
    report = run_doctor(HostRoot(Path("/")), qemu=str(fake))
    qemu = report.check("qemu")
    assert qemu.status == "fail" and "no answer within 0.7 s" in qemu.detail
    assert qemu.fix is not None and qemu.fix.startswith(f"{fake} -version")
    assert all(report.check(i).status == "skip" for i in QEMU_CHECKS[1:])
    if os.path.exists("/dev/kvm"):
        assert report.check("kvm-guest").status == "warn"


# ---------------------------------------------------------------- the real machine


def test_real_machine() -> None:
    """This machine: no Intel iGPU, /dev/kvm from KVM-PVM, Debian's QEMU. Crash-free and correct."""
    r = doctor("/")
    assert r.code == 1 and not r.data["simulated"] and r.data["kernel"] == os.uname().release
    ids = _real_igpu()
    if ids is None or ids[0] != 0x8086:
        assert r.status("igpu") == "fail" and r.detail("igpu").startswith("No Intel iGPU")
        assert_gvt_skipped(r)
    assert r.status("qemu") == "ok"
    assert re.match(r"QEMU \d+\.\d+", r.detail("qemu"))
    if not os.path.exists("/dev/kvm"):
        assert r.status("kvm-device") == "fail"
        return
    assert r.status("kvm-device") == "ok" and "KVM API version 12" in r.detail("kvm-device")
    if os.path.exists("/sys/module/kvm_pvm"):
        assert r.status("kvm-guest") == "fail"
        detail = r.detail("kvm-guest")
        assert detail.startswith("KVM cannot run ordinary guests here")
        assert "KVM internal error" in detail and "KVM-PVM" in detail and "TCG" in detail
        assert "KVM internal error" in r.evidence("kvm-guest")["guest error"]
        assert r.status("qemu-kvm") == "skip" and r.checks["qemu-kvm"]["blocked_by"] == "kvm-guest"
        assert r.status("cpu-virt") == "fail" and "KVM-PVM" in r.detail("cpu-virt")
        assert "kvm-guest" in r.data["verdict"]


def test_real_machine_human_output_and_no_guest() -> None:
    result = CliRunner().invoke(cli, ["--root", "/", "doctor", "--no-guest"])
    assert result.exit_code == 1, result.output
    lines = result.stdout.rstrip("\n").splitlines()
    assert lines[0].startswith("vgpuctl doctor: host /, Linux ")
    assert lines[-1].startswith("NOT READY: ")
    assert any(line.startswith("- kvm-guest ") for line in lines)


def _real_igpu() -> tuple[int, int] | None:
    base = Path("/sys/bus/pci/devices/0000:00:02.0")
    try:
        return int((base / "vendor").read_text(), 16), int((base / "device").read_text(), 16)
    except OSError:
        return None


def test_report_json_shape() -> None:
    report: Report = run_doctor(HostRoot(Path("/")), run_guest=False)
    data = report.to_json()
    assert set(data) == {"ready", "verdict", "root", "kernel", "simulated", "checks"}
    for check in data["checks"]:
        assert set(check) == {"id", "title", "status", "detail", "evidence", "fix", "blocked_by"}
        assert check["status"] in ("ok", "warn", "fail", "skip")
        assert all(set(e) == {"path", "value"} for e in check["evidence"])


# ---------------------------------------------------------------- what the simulator added for the doctor


def test_sim_cpuinfo_follows_the_cpu_and_firmware() -> None:
    from vgpuctl.sim.host import SimHost

    intel = SimHost.from_preset("coffeelake")
    text = intel.read_text("/proc/cpuinfo")
    assert "vendor_id\t: GenuineIntel" in text and "i7-8700" in text
    assert " vmx" in text and text.count("processor\t:") == 4 and "vmx flags\t:" in text
    assert "kvm_intel" in intel.modules and intel.exists("/dev/kvm")
    off = SimHost.from_preset("coffeelake", virt=False)
    assert " vmx" not in off.read_text("/proc/cpuinfo") and "kvm_intel" not in off.modules
    assert "kvm" in off.modules and not off.exists("/dev/kvm")
    amd = SimHost.from_preset("amd")
    assert "AuthenticAMD" in amd.read_text("/proc/cpuinfo") and " svm" in amd.read_text("/proc/cpuinfo")
    assert "kvm_amd" in amd.modules and "kvm_intel" not in amd.modules
    assert "vmx flags" not in SimHost.from_preset("skylake", kernel="5.4.0").read_text("/proc/cpuinfo")


def test_sim_kernel_config_places_and_module_files() -> None:
    import gzip

    from vgpuctl.sim.host import SimHost

    proc = SimHost.from_preset("skylake", kconfig_file="proc")
    config = gzip.decompress(proc.read("/proc/config.gz")).decode()
    assert "CONFIG_IKCONFIG_PROC=y" in config and "CONFIG_DRM_I915_GVT_KVMGT=m" in config
    assert proc.listdir("/boot") == []
    none = SimHost.from_preset("skylake", kconfig_file="none")
    assert not none.exists("/proc/config.gz") and none.listdir("/boot") == []
    dep = none.read_text("/lib/modules/6.8.0/modules.dep")
    assert "kernel/drivers/gpu/drm/i915/kvmgt.ko: " in dep and "kernel/arch/x86/kvm/kvm-intel.ko: " in dep
    old = SimHost.from_preset("skylake", kernel="5.4.0", kconfig=["CONFIG_VFIO=y"])
    assert "kernel/drivers/gpu/drm/i915/gvt/kvmgt.ko" in old.read_text("/lib/modules/5.4.0/modules.dep")
    assert "kernel/drivers/vfio/mdev/vfio_mdev.ko" in old.read_text("/lib/modules/5.4.0/modules.dep")
    assert old.read_text("/lib/modules/5.4.0/modules.builtin") == "kernel/drivers/vfio/vfio.ko\n"
    with pytest.raises(ValueError, match="kconfig file"):
        SimHost.from_preset("skylake", kconfig_file="elsewhere")


def test_sim_drm_nodes_come_with_the_driver() -> None:
    from vgpuctl.sim.host import SimHost

    host = SimHost.from_preset("skylake")
    assert host.listdir("/dev/dri") == ["card0", "renderD128"]
    assert host.read_text("/sys/class/drm/renderD128/dev") == "226:128\n"
    assert not SimHost.from_preset("skylake", modules=["kvm", "kvm_intel"]).exists("/dev/dri")
