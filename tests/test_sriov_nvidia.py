"""NVIDIA vendor-specific VFIO VFs (sriov.md 3.3, 3.4) on the simulated L40S: types, assign, release with EPERM."""

from __future__ import annotations

import errno
import subprocess
import time
from dataclasses import replace
from pathlib import Path

import pytest

from tests.conftest import MountFn, new_vm
from vgpuctl.backends import sriov_nvidia
from vgpuctl.base.errors import CapacityError, Conflict, InvalidInput, KernelError
from vgpuctl.base.state import StateDir
from vgpuctl.host import HostRoot, pci
from vgpuctl.vm import lifecycle
from vgpuctl.vm import spec as specs
from vgpuctl.vm.runtime import resolve_vgpu
from vgpuctl.vm.spec import VgpuRequest

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


def test_a_vm_on_an_nvidia_vf_gets_its_type_at_start_and_gives_it_back_after_stop(
        mount_host: MountFn, state: StateDir, guest: Path) -> None:
    root = mount_host("l40s-vfio")
    vfs = enabled(root)
    new_vm(state, "nv1", guest)
    spec = specs.load(state, "nv1")
    spec.vgpu, spec.vgpu_display, spec.ramfb = VgpuRequest(vf=PF, type="1159"), False, False
    specs.save(state, spec)
    vgpu = resolve_vgpu(root, spec)
    assert vgpu is not None and (vgpu.uuid, vgpu.type_id, vgpu.state) == (vfs[0], "nvidia-vfio:1159", "new")
    assert vgpu.backend.name == "nvidia-vfio" and vgpu.backend.attachment(vfs[0]).qemu_property == ("host", vfs[0])
    with pytest.raises(InvalidInput, match=r"needs vgpu\.type"):
        resolve_vgpu(root, replace(spec, vgpu=VgpuRequest(vf=PF)))
    started = lifecycle.start(root, state, "nv1", accel="tcg")
    try:
        assert started.state == "running" and started.vgpu == vfs[0]
        assert sriov_nvidia.current_type(root, vfs[0]) == 1159
        assert pci.read_function(root, vfs[0]).driver == "nvidia"  # never rebound
    finally:
        lifecycle.stop(root, state, "nv1", timeout_s=10)
    deadline = time.monotonic() + 20  # the wrapper's release-vgpu runs after QEMU has ended
    while sriov_nvidia.current_type(root, vfs[0]) != 0:
        assert time.monotonic() < deadline, "the VF's type was not released"
        time.sleep(0.1)
