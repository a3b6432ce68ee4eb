"""host/facts.py: one reading of the host, by the kernel's, kmod's and systemd's rules, used by the doctor,
setup and the simulator alike; and the proof that they agree: after ``setup apply`` and a reboot of a
simulated host, the doctor passes every check that setup fixes."""

from __future__ import annotations

import gzip
import json
import os
from pathlib import Path

import pytest
from click.testing import CliRunner

from tests.conftest import MountFn
from vgpuctl.cli.app import cli
from vgpuctl.host import HostRoot, facts
from vgpuctl.sim.host import SIM_CONTROL


@pytest.mark.parametrize(("text", "value"), [
    ("1", True), ("y", True), ("Y", True), ("yes", True), ("on", True), ("ON", True), ("onx", True),
    ("0", False), ("n", False), ("N", False), ("no", False), ("off", False), ("of", False),
    ("", None), ("2", None), ("o", None), ("true", None), ("-1", None)])
def test_kstrtobool_reads_as_the_kernel(text: str, value: bool | None) -> None:
    assert facts.kstrtobool(text) is value


def test_a_bare_bool_parameter_is_true() -> None:
    assert facts.param_bool(None) is True and facts.param_bool("0") is False


def test_the_command_line_is_read_as_the_kernel_reads_it() -> None:
    line = 'BOOT_IMAGE=/vmlinuz root=/dev/sda1 ro "quiet splash" i915.enable-gvt=0 dyndbg="file x +p" ' \
           'i915.enable_gvt=1 kvm.ignore_msrs -- i915.enable_gvt=0'
    assert facts.cmdline_param(line, "i915.enable_gvt") == "1"  # '-' and '_' alike; the last one wins
    assert facts.cmdline_param(line, "dyndbg") == "file x +p"  # quotes hold spaces
    assert facts.cmdline_param(line, "kvm.ignore_msrs") == ""  # a bare flag
    assert facts.cmdline_param(line, "splash") is None  # inside quotes: part of one parameter
    assert facts.cmdline_param(line, "intel_iommu") is None


def test_kernel_config_from_boot_else_proc_config_gz(tmp_path: Path) -> None:
    root = HostRoot(tmp_path)
    (tmp_path / "proc").mkdir()
    (tmp_path / "proc/config.gz").write_bytes(gzip.compress(b"CONFIG_KVM=m\n# CONFIG_VFIO_MDEV is not set\n"))
    assert facts.kernel_config(root, "6.8.0") == ("/proc/config.gz", {"CONFIG_KVM": "m", "CONFIG_VFIO_MDEV": "n"})
    (tmp_path / "boot").mkdir()
    (tmp_path / "boot/config-6.8.0").write_text('CONFIG_KVM=y\nCONFIG_LOCALVERSION=""\n')
    assert facts.kernel_config(root, "6.8.0") == ("/boot/config-6.8.0", {"CONFIG_KVM": "y", "CONFIG_LOCALVERSION": ""})


def test_modprobe_d_precedence_is_kmods(tmp_path: Path) -> None:
    root = HostRoot(tmp_path)
    for directory, name, text in [
        ("lib/modprobe.d", "50-i915.conf", "options i915 enable_gvt=0\n"),  # overridden by /etc's file of that name
        ("etc/modprobe.d", "50-i915.conf", "options i915 enable_gvt=1  # ours\n"),
        ("run/modprobe.d", "50-i915.conf", "options i915 enable_gvt=0\n"),  # /etc wins a name over /run
        ("usr/local/lib/modprobe.d", "90-kvm.conf", "options kvm ignore-msrs=1\n"),
        ("lib/modprobe.d", "95-guc.conf", "options i915 enable_guc=3\n"),
        ("etc/modprobe.d", "99-late.conf", "options kvm ignore_msrs=0\n")]:
        (tmp_path / directory).mkdir(parents=True, exist_ok=True)
        (tmp_path / directory / name).write_text(text)
    os.symlink("/dev/null", tmp_path / "etc/modprobe.d/95-guc.conf")  # masks /lib's file
    assert facts.modprobe_option(root, "i915", "enable_gvt") == ("1", "/etc/modprobe.d/50-i915.conf")
    assert facts.modprobe_option(root, "kvm", "ignore_msrs") == ("0", "/etc/modprobe.d/99-late.conf")  # later file
    assert facts.modprobe_option(root, "i915", "enable_guc") is None


def test_modules_load_d_and_etc_modules(tmp_path: Path) -> None:
    root = HostRoot(tmp_path)
    (tmp_path / "etc/modules-load.d").mkdir(parents=True)
    (tmp_path / "etc/modules-load.d/gvt.conf").write_text("# GVT-g\nkvmgt\nvfio-iommu-type1 ; x\n;mdev\n")
    (tmp_path / "etc/modules").write_text("kvmgt\nloop\n")
    assert facts.modules_loaded_at_boot(root) == {"kvmgt": "/etc/modules-load.d/gvt.conf",
                                                  "vfio_iommu_type1": "/etc/modules-load.d/gvt.conf",
                                                  "loop": "/etc/modules"}


@pytest.mark.parametrize(("wanted", "given", "result"), [
    ("1", "Y", True), ("1", None, True), ("1", "0", False), ("1", "2", None),  # a bool: a bare name is true
    ("7", "7", True), ("7", "0x7", True), ("7", "4", False), ("7", "x", False), ("7", None, False),  # an int
    ("3", "3", True), ("unlimited", "unlimited", True), ("unlimited", "7", False)])  # else a string
def test_param_matches(wanted: str, given: str | None, result: bool | None) -> None:
    assert facts.param_matches(wanted, given) is result


def test_a_modules_modinfo_signature_and_compression(tmp_path: Path) -> None:
    import lzma

    modinfo = b"\x7fELF\x02\x01junk=1\0license=GPL\0vermagic=6.8.0-45-generic SMP preempt mod_unload \0name=i915\0"
    signed = modinfo + b"\x01\x02" + facts.MODULE_SIGNATURE
    assert facts.parse_modinfo(modinfo) == {"vermagic": "6.8.0-45-generic SMP preempt mod_unload ", "name": "i915"}
    assert facts.vermagic_release(facts.parse_modinfo(signed)["vermagic"]) == "6.8.0-45-generic"
    assert facts.module_signed(signed) and not facts.module_signed(modinfo)
    root = HostRoot(tmp_path)
    (tmp_path / "i915.ko.xz").write_bytes(lzma.compress(signed, format=lzma.FORMAT_XZ))
    (tmp_path / "i915.ko.zst").write_bytes(b"(\xb5/\xfd")
    assert facts.read_module(root, "/i915.ko.xz") == signed and facts.read_module(root, "/i915.ko.zst") is None


def test_efivarfs_booleans() -> None:
    assert facts.parse_efi_bool(b"\x06\0\0\0\x01") is True and facts.parse_efi_bool(b"\x06\0\0\0\0") is False
    assert facts.parse_efi_bool(b"\x06") is None


def _doctor(root: HostRoot) -> dict[str, str]:
    result = CliRunner().invoke(cli, ["--root", str(root.root), "doctor", "--json", "--no-guest", "--qemu",
                                      "/nonexistent/qemu"])
    return {c["id"]: c["status"] for c in json.loads(result.stdout)["checks"]}


@pytest.mark.fuse
def test_after_setup_apply_and_a_reboot_the_doctor_passes_what_setup_fixed(mount_host: MountFn,
                                                                          tmp_path: Path) -> None:
    root = mount_host("coffeelake-bare")
    root.path("/etc/os-release").write_text('PRETTY_NAME="Debian GNU/Linux 12"\nID=debian\n')
    tools = tmp_path / "bin"
    tools.mkdir()
    (tools / "update-grub").write_text("#!/bin/sh\nexit 0\n")
    (tools / "update-grub").chmod(0o755)
    fixed_by_setup = ["enable-gvt", "ignore-msrs", "iommu", "modules", "mdev-types"]
    before = _doctor(root)
    assert [before[c] for c in fixed_by_setup] == ["fail", "warn", "warn", "fail", "skip"]
    state = ["--root", str(root.root), "--state-dir", str(tmp_path / "state")]
    applied = CliRunner().invoke(cli, [*state, "setup", "apply", "--tools-dir", str(tools)])
    assert applied.exit_code == 0, applied.output
    root.write_text(SIM_CONTROL, "reboot\n")  # as 'vgpuctl sim ctl DIR reboot' does
    after = _doctor(root)
    assert {c: after[c] for c in fixed_by_setup} == dict.fromkeys(fixed_by_setup, "ok")
    assert "i915.enable_gvt=1" in root.read_text("/proc/cmdline")
    # And setup agrees with the doctor: nothing left to do.
    again = CliRunner().invoke(cli, [*state, "setup", "plan", "--tools-dir", str(tools)])
    assert "nothing to do" in again.stdout, again.stdout
