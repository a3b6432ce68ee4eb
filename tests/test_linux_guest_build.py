"""The Linux test guest's build (vgpuctl.vm.linuxguest), without booting it: its initramfs as the kernel unpacks
it, the kernel package's cache, and the report format."""

from __future__ import annotations

import gzip
import os
import re
import stat
import subprocess
from pathlib import Path

import pytest

from vgpuctl.vm.linuxguest import (
    BUSYBOX,
    MODULES,
    LinuxGuest,
    LinuxGuestBuildError,
    default_cache_dir,
    kernel_cmdline,
    kernel_deb,
    read_report,
)

SIGNATURE_MAGIC = b"~Module signature appended~\n"


def test_the_initramfs_unpacks_into_init_busybox_and_the_modules_in_dependency_order(
        linux_guest: LinuxGuest, tmp_path: Path) -> None:
    archive = gzip.decompress(linux_guest.initrd.read_bytes())
    subprocess.run([str(BUSYBOX), "cpio", "-i", "-d"], input=archive, cwd=tmp_path, check=True,
                   capture_output=True)  # busybox's own newc reader, as the kernel's
    init = tmp_path / "init"
    assert init.read_text().startswith("#!/bin/busybox sh\n") and os.access(init, os.X_OK)
    console = (tmp_path / "dev" / "console").lstat()
    assert stat.S_ISCHR(console.st_mode) and (os.major(console.st_rdev), os.minor(console.st_rdev)) == (5, 1)
    assert os.readlink(tmp_path / "bin" / "sh") == "busybox"
    assert (tmp_path / "bin" / "busybox").read_bytes() == BUSYBOX.read_bytes()

    order = (tmp_path / "etc" / "modules").read_text().split()
    loaded: set[str] = set()
    for name in order:
        module = (tmp_path / "lib" / "modules" / f"{name}.ko").read_bytes()
        assert not module.endswith(SIGNATURE_MAGIC), f"{name} still carries its signature"
        match = re.search(rb"\0depends=([^\0]*)\0", module)
        depends = {d.replace("-", "_") for d in match[1].decode().split(",") if d} if match else set()
        assert depends <= loaded, f"{name} comes before {depends - loaded}"
        loaded.add(name.replace("-", "_"))
    assert set(MODULES) <= loaded  # none is built into Debian 12's kernel (CONFIG_...=m)


def test_a_kept_kernel_package_needs_no_apt_and_without_one_the_error_says_what_to_do(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, linux_guest: LinuxGuest) -> None:
    kept = sorted((default_cache_dir() / "linuxguest" / "debs").glob("linux-image-*.deb"))
    assert kept, "the linux_guest fixture keeps the kernel package it used"
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))  # no apt-get, no apt-cache
    (tmp_path / "kept" / "debs").mkdir(parents=True)
    (tmp_path / "kept" / "debs" / kept[-1].name).symlink_to(kept[-1])
    assert kernel_deb(tmp_path / "kept") == tmp_path / "kept" / "debs" / kept[-1].name
    with pytest.raises(LinuxGuestBuildError, match=r"apt-cache.*Debian's package repository"):
        kernel_deb(tmp_path / "none")


def test_reports_are_read_after_the_kernels_timestamp_and_after_other_output() -> None:
    log = ("[    4.4] VGPUCTL-GUEST kernel=6.1.0-57-amd64\r\n"
           "/ # \x1b[6n[   16.5] VGPUCTL-GUEST input.event=AT Translated Set 2 keyboard\r\n"
           "[   16.6] VGPUCTL-GUEST input.event=QEMU QEMU USB Tablet\r\n"
           "VGPUCTL-GUEST modules.failed=\n"
           "VGPUCTL-GUEST ready=1")  # still being written: no newline yet
    assert read_report(log) == {"kernel": ["6.1.0-57-amd64"], "modules.failed": [""],
                                "input.event": ["AT Translated Set 2 keyboard", "QEMU QEMU USB Tablet"]}


def test_the_kernel_command_line_takes_the_guests_parameters() -> None:
    assert kernel_cmdline(fs="vda") == "console=tty0 console=ttyS0 vgpuctl.fs=vda"
    with pytest.raises(ValueError, match="spaces"):
        kernel_cmdline(url="http://x/ y")

