"""Benchmark: SR-IOV VFs on a mounted simulated Alder Lake (i915-sriov-dkms) — enabling VFs, and a VM on a VF.

Rows, each against its peer in the same run (interleaved round by round):
  VF enable, by hand   the how-tos' shell sequence (sriov.md 2.6): ``echo 0 > sriov_drivers_autoprobe``,
                       ``echo 2 > sriov_numvfs``, then per VF ``echo vfio-pci > driver_override`` and
                       ``echo VF > /sys/bus/pci/drivers_probe`` — one ``sh -c``; then ``echo 0 > sriov_numvfs``
  VF enable, vgpuctl   ``vgpuctl vfs enable PF 2`` as a whole process (the same steps, with the ownership
                       record, the checks and a timeout on every sriov_numvfs write); then ``vfs disable``
  VM start, VF         ``vgpuctl vm start`` of a VM on a VF of the PF (``vgpu.vf = PF``: the first free VF)
                       until QMP says running; then killed
  VM start, mdev       the same VM on a GVT-g vGPU of a mounted Coffee Lake: the mdev figure beside it
  VM start, bare QEMU  Popen of the VF VM's own argv (``vgpuctl vm argv``) until QMP says running
The guest is the project's bare-metal test guest under **TCG** (pinned: /dev/kvm on these machines is
KVM-PVM, where guests stop at once). On a simulated host the VF is replaced by an emulated display adapter,
as an mdev vGPU is, so the VM rows compare vgpuctl's work, not the hardware's.
Run (as root: FUSE): ``.venv/bin/python bench/bench_sriov.py [--runs N]``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

from bench_vm import bare_qemu, timed  # bench/ is on sys.path when a bench runs as a script
from vgpuctl.base.state import StateDir
from vgpuctl.host import HostRoot
from vgpuctl.sim import mount
from vgpuctl.sim.presets import preset
from vgpuctl.vm import lifecycle, profiles
from vgpuctl.vm import spec as specs
from vgpuctl.vm.runtime import RuntimePaths
from vgpuctl.vm.spec import VgpuRequest
from vgpuctl.vm.testguest import build_test_guest

PF = "0000:00:02.0"
VGPUCTL = [sys.executable, "-m", "vgpuctl"]


def by_hand(root: HostRoot, count: int) -> str:
    """The shell a how-to gives, on the mounted host's files."""
    base = root.path(f"/sys/bus/pci/devices/{PF}")
    vfs = [f"0000:00:02.{n}" for n in range(1, count + 1)]
    lines = [f"echo 0 > {base}/sriov_drivers_autoprobe", f"echo {count} > {base}/sriov_numvfs"]
    for vf in vfs:
        lines += [f"echo vfio-pci > {root.path(f'/sys/bus/pci/devices/{vf}')}/driver_override",
                  f"echo {vf} > {root.path('/sys/bus/pci/drivers_probe')}"]
    return "; ".join(lines)


def new_vm(state: StateDir, name: str, guest: Path, *, vf: bool) -> None:
    spec = profiles.new_spec(name, "automotive")
    spec.kernel, spec.boot, spec.memory_mib, spec.cpus = str(guest), "kernel", 64, 1
    spec.display.backend = "vnc"
    if vf:
        spec.vgpu, spec.vgpu_display, spec.ramfb = VgpuRequest(vf=PF), False, False
    specs.save(state, spec, new=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=11)
    runs = parser.parse_args().runs
    guest = build_test_guest()
    tmp = Path(tempfile.mkdtemp(prefix="vgb-"))
    sriov_dir, gvt_dir = tmp / "adl", tmp / "cfl"
    sriov_dir.mkdir()
    gvt_dir.mkdir()
    mount.mount(preset("adl-sriov").to_json(), sriov_dir, "adl-sriov")
    mount.mount(preset("coffeelake").with_overrides(aperture_mib=1024).to_json(), gvt_dir, "coffeelake")
    sriov_root, gvt_root = HostRoot(sriov_dir), HostRoot(gvt_dir)
    state = StateDir(tmp / "s")
    env = {**os.environ, "VGPUCTL_STATE_DIR": str(state.path)}
    sriov_env, gvt_env = {**env, "VGPUCTL_ROOT": str(sriov_dir)}, {**env, "VGPUCTL_ROOT": str(gvt_dir)}
    new_vm(state, "onvf", guest, vf=True)
    new_vm(state, "onmdev", guest, vf=False)
    samples: dict[str, list[float]] = {}

    def sample(row: str, run: Callable[[], float]) -> None:
        samples.setdefault(row, []).append(run())

    try:
        hand = by_hand(sriov_root, 2)
        off = f"echo 0 > {sriov_root.path(f'/sys/bus/pci/devices/{PF}')}/sriov_numvfs"
        for _ in range(runs):
            sample("VF enable, by hand (sh)", lambda: timed(["sh", "-c", hand], sriov_env))
            timed(["sh", "-c", off], sriov_env)
            sample("VF enable, vgpuctl vfs enable", lambda: timed([*VGPUCTL, "vfs", "enable", PF, "2"], sriov_env))
            timed([*VGPUCTL, "vfs", "disable", PF], sriov_env)
        timed([*VGPUCTL, "vfs", "enable", PF, "2"], sriov_env)
        argv = lifecycle.prepare(sriov_root, state, "onvf", accel="tcg").command.argv
        RuntimePaths.for_vm(state, "onvf").directory.mkdir(parents=True, exist_ok=True)
        for _ in range(runs):
            sample("VM start, bare QEMU (the VF VM's argv)",
                   lambda: bare_qemu(argv, RuntimePaths.for_vm(state, "onvf")))
            for name, vm_env in (("onvf", sriov_env), ("onmdev", gvt_env)):
                row = f"VM start on {'a VF' if name == 'onvf' else 'an mdev'}, vgpuctl vm start"
                sample(row, lambda n=name, e=vm_env: timed([*VGPUCTL, "vm", "start", n, "--accel", "tcg"], e))
                timed([*VGPUCTL, "vm", "kill", name], vm_env)
    finally:
        for name, root in (("onvf", sriov_root), ("onmdev", gvt_root)):
            if lifecycle.status(root, state, name).pid:
                lifecycle.kill(root, state, name)
        mount.umount(sriov_dir, lazy=True)
        mount.umount(gvt_dir, lazy=True)
    medians = {row: statistics.median(v) * 1e3 for row, v in samples.items()}
    peers = {"VF enable, vgpuctl vfs enable": "VF enable, by hand (sh)",
             "VM start on a VF, vgpuctl vm start": "VM start, bare QEMU (the VF VM's argv)",
             "VM start on an mdev, vgpuctl vm start": "VM start on a VF, vgpuctl vm start"}
    print(f"{runs} interleaved rounds, TCG, {os.cpu_count()} CPUs, {os.uname().release}")
    print(f"{'what':40} {'median ms':>10}  ratio")
    for row, ms in medians.items():
        peer = peers.get(row)
        print(f"{row:40} {ms:10.1f}  " + (f"{ms / medians[peer]:.2f}x of '{peer}'" if peer else ""))

if __name__ == "__main__":
    main()
