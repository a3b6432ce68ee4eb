"""NVIDIA vendor-specific VFIO VFs (sriov.md 3.3, 3.4) on the simulated L40S: types, assign, release with EPERM."""

from __future__ import annotations

import errno
import subprocess

import pytest

from tests.conftest import MountFn
from vgpuctl.backends import sriov_nvidia
from vgpuctl.base.errors import CapacityError, Conflict, KernelError
from vgpuctl.host import HostRoot, pci

pytestmark = pytest.mark.fuse

PF = "0000:41:00.0"
CONTROL = "/.vgpuctl-sim-control"


def enabled(root: HostRoot) -> list[str]:
    done = subprocess.run(["sh", str(root.path("/usr/lib/nvidia/sriov-manage")), "-e", "ALL"], capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return [vf.address for vf in pci.read_pf(root, PF).vfs]


def test_parse_is_lenient() -> None:
    text = "ID    : vGPU Name\n1159 : NVIDIA L40S-8Q\n  1172:NVIDIA L40S-8C \nNVIDIA A16-2Q : 694\nbad line\n"
    assert sriov_nvidia.parse_creatable(text) == [
        sriov_nvidia.VgpuType(1159, "NVIDIA L40S-8Q"), sriov_nvidia.VgpuType(1172, "NVIDIA L40S-8C"),
        sriov_nvidia.VgpuType(694, "NVIDIA A16-2Q")]


def test_assign_and_release_on_an_l40s(mount_host: MountFn) -> None:
    root = mount_host("l40s-vfio")
    vfs = enabled(root)
    assert sriov_nvidia.is_vendor_vf(root, vfs[0]) and not sriov_nvidia.is_vendor_vf(root, PF)
    assert any(t.name == "NVIDIA L40S-8Q" for t in sriov_nvidia.creatable_types(root, vfs[0]))
    sriov_nvidia.assign(root, vfs[0], 1159)
    sriov_nvidia.assign(root, vfs[0], 1159)  # again: nothing to do
    assert sriov_nvidia.current_type(root, vfs[0]) == 1159
    assert pci.read_function(root, vfs[0]).driver == "nvidia"  # never rebound
    with pytest.raises(Conflict, match="already holds vGPU type 1159"):
        sriov_nvidia.assign(root, vfs[0], 1160)
    with pytest.raises(CapacityError, match=r"cannot take vGPU type 1155 now; creatable: 1159 \(NVIDIA L40S-8Q\)"):
        sriov_nvidia.assign(root, vfs[1], 1155)  # homogeneous placement: 8 GiB types only now
    assert sriov_nvidia.release(root, vfs[0]) and sriov_nvidia.current_type(root, vfs[0]) == 0


def test_release_retries_eperm_until_qemu_has_let_go(mount_host: MountFn) -> None:
    root = mount_host("l40s-vfio")
    vf = enabled(root)[0]
    sriov_nvidia.assign(root, vf, 1159)
    root.write_text(CONTROL, f"open {vf}\n")
    sleeps: list[float] = []
    with pytest.raises(KernelError, match="still in use after 3 attempts") as caught:
        sriov_nvidia.release(root, vf, attempts=3, interval_s=0.01, sleep=sleeps.append)
    assert caught.value.errno == errno.EPERM and sleeps == [0.01, 0.01]
    root.write_text(CONTROL, f"close {vf}\n")  # the simulated driver still refuses for ~0.3 s after the close
    assert sriov_nvidia.release(root, vf, attempts=50, interval_s=0.05)
    assert sriov_nvidia.current_type(root, vf) == 0
