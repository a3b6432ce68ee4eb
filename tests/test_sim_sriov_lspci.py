"""Debian's lspci (pciutils) over the mounted simulated sysfs, in a private mount namespace: the PF, its VFs and
the SR-IOV extended capability read from the simulated 4096-byte ``config``."""

from __future__ import annotations

import re
import shutil

import pytest

from tests.conftest import MountFn, in_namespace
from vgpuctl.host import HostRoot

pytestmark = pytest.mark.fuse


def lspci(root: HostRoot, *args: str) -> str:
    if shutil.which("lspci") is None:
        pytest.fail("lspci not found: run 'make test', which installs Debian's pciutils")
    done = in_namespace(root, "lspci " + " ".join(args))
    assert done.rc == 0, done
    return done.out


def test_lspci_lists_the_intel_pf_and_its_vfs(mount_host: MountFn) -> None:
    root = mount_host("adl-sriov")
    root.write_text("/sys/bus/pci/devices/0000:00:02.0/sriov_numvfs", "7")
    lines = lspci(root, "-nn", "-D").splitlines()
    assert "0000:00:02.0 VGA compatible controller [0300]: Intel Corporation" in lines[1]
    assert lines[1].endswith("[8086:4680]")
    vfs = [line for line in lines if re.match(r"0000:00:02\.[1-7] ", line)]
    assert [line.split()[0] for line in vfs] == [f"0000:00:02.{n}" for n in range(1, 8)]
    assert all("Display controller [0380]" in line and line.endswith("[8086:4680]") for line in vfs)


def test_lspci_shows_the_sriov_capability(mount_host: MountFn) -> None:
    root = mount_host("adl-sriov")
    before = lspci(root, "-vv", "-s", "00:02.0")
    assert "Capabilities: [100 v1] Single Root I/O Virtualization (SR-IOV)" in before
    assert "Initial VFs: 7, Total VFs: 7, Number of VFs: 0" in before
    assert "VF offset: 1, stride: 1, Device ID: 4680" in before
    assert "IOVCtl:\tEnable-" in before
    assert "Kernel driver in use: i915" in before
    root.write_text("/sys/bus/pci/devices/0000:00:02.0/sriov_numvfs", "3")
    after = lspci(root, "-vv", "-s", "00:02.0")
    assert "Number of VFs: 3" in after and "IOVCtl:\tEnable+" in after
    vf = lspci(root, "-vv", "-s", "00:02.1")
    assert "Single Root I/O Virtualization" not in vf and "Kernel driver in use: i915" in vf


def test_lspci_on_the_nvidia_host(mount_host: MountFn) -> None:
    root = mount_host("l40s-vfio")
    pf = lspci(root, "-vv", "-s", "41:00.0")
    assert "Total VFs: 32" in pf and "VF offset: 4, stride: 1, Device ID: 26b9" in pf
    assert "Kernel driver in use: nvidia" in pf
    lines = lspci(root, "-nn", "-D").splitlines()
    assert any(line.startswith("0000:41:00.0 3D controller [0302]: NVIDIA Corporation") and "[10de:26b9]" in line
               for line in lines), lines
