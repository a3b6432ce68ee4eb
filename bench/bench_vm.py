"""Benchmark: from `vgpuctl vm start` until QMP reports `running`, against bare QEMU with the same argv.

Both run the project's test guest on a mounted simulated Coffee Lake (1 GiB aperture); the accelerator
is TCG (pinned with --accel tcg, the same the probe picks on these KVM-PVM machines). Rows:
  bare QEMU       Popen(the exact argv `vgpuctl vm argv` prints) -> QMP query-status == running
  vgpuctl CLI     `vgpuctl vm start NAME --accel tcg` as a whole process (returns once QMP says running)
  vgpuctl library vgpuctl.vm.lifecycle.start() in this process (what the service will call)
  7 VMs at once   seven `vgpuctl vm start` processes in parallel, wall time until all return
Target: CLI <= 3x bare QEMU. Run: make bench (or .venv/bin/python bench/bench_vm.py [--runs N]).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from vgpuctl.host import HostRoot
from vgpuctl.mdev.state import StateDir
from vgpuctl.sim import mount
from vgpuctl.sim.presets import preset
from vgpuctl.vm import lifecycle, profiles
from vgpuctl.vm import spec as specs
from vgpuctl.vm.runtime import RuntimePaths
from vgpuctl.vm.testguest import build_test_guest

VGPUCTL = str(Path(sys.executable).with_name("vgpuctl"))


def new_vm(state: StateDir, name: str, guest: Path) -> None:
    spec = profiles.new_spec(name, "automotive")
    spec.kernel, spec.boot, spec.memory_mib, spec.cpus = str(guest), "kernel", 64, 1
    spec.display.backend = "vnc"
    specs.save(state, spec, new=True)


def bare_qemu(argv: list[str], paths: RuntimePaths) -> float:
    for stale in (paths.pidfile, paths.qmp_socket):
        stale.unlink(missing_ok=True)
    started = time.perf_counter()
    process = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        while True:
            if paths.qmp_socket.exists():
                try:
                    if lifecycle.qmp(paths, "query-status", timeout_s=2.0).get("status") == "running":
                        return time.perf_counter() - started
                except Exception:  # not listening yet
                    pass
            time.sleep(0.005)
    finally:
        process.kill()
        process.wait()


def timed(command: list[str], env: dict[str, str]) -> float:
    started = time.perf_counter()
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    elapsed = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed: {done.stderr}")
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=10)
    options = parser.parse_args()
    guest = build_test_guest()
    directory = Path(tempfile.mkdtemp(prefix="vgpuctl-bench-vm-"))
    state = StateDir(Path(tempfile.mkdtemp(prefix="vgb-")))
    mount.mount(preset("coffeelake").with_overrides(aperture_mib=1024).to_json(), directory, "coffeelake")
    root = HostRoot(directory)
    env = {**os.environ, "VGPUCTL_ROOT": str(directory), "VGPUCTL_STATE_DIR": str(state.path)}
    rows: dict[str, list[float]] = {"bare QEMU": [], "vgpuctl CLI": [], "vgpuctl library": []}
    try:
        for index in range(8):
            new_vm(state, f"car{index}", guest)
        argv = lifecycle.prepare(root, state, "car0", accel="tcg").command.argv
        lifecycle.start(root, state, "car0", accel="tcg")  # warm-up: the vGPU exists from now on
        lifecycle.kill(root, state, "car0")
        for _ in range(options.runs):
            rows["bare QEMU"].append(bare_qemu(argv, RuntimePaths.for_vm(state, "car0")))
            rows["vgpuctl CLI"].append(timed([VGPUCTL, "vm", "start", "car0", "--accel", "tcg"], env))
            lifecycle.kill(root, state, "car0")
            started = time.perf_counter()
            lifecycle.start(root, state, "car0", accel="tcg")
            rows["vgpuctl library"].append(time.perf_counter() - started)
            lifecycle.kill(root, state, "car0")
        lifecycle.release_vgpu(root, state, "car0")  # kept for reuse otherwise: seven is the GPU's limit
        started = time.perf_counter()
        racers = [subprocess.Popen([VGPUCTL, "vm", "start", f"car{i}", "--accel", "tcg"], env=env,
                                   stdout=subprocess.DEVNULL, stderr=subprocess.PIPE) for i in range(1, 8)]
        codes = [p.wait() for p in racers]
        errors = [p.stderr.read().strip() for p in racers if p.stderr and p.returncode]
        seven = time.perf_counter() - started
        running = sum(lifecycle.status(root, state, f"car{i}").state == "running" for i in range(1, 8))
    finally:
        for name in specs.names(state):
            if lifecycle.status(root, state, name).pid:
                lifecycle.kill(root, state, name)
        mount.umount(directory, lazy=True)
        directory.rmdir()
    bare = statistics.median(rows["bare QEMU"])
    print(f"VM start until QMP 'running' ({options.runs} runs, TCG, test guest, simulated host; "
          f"{os.cpu_count()} CPUs, {os.uname().release})")
    print(f"{'what':<18} {'median ms':>10} {'p95 ms':>8} {'x bare':>7}")
    for name, values in rows.items():
        values.sort()
        p95 = values[min(len(values) - 1, int(len(values) * 0.95))]
        print(f"{name:<18} {statistics.median(values) * 1e3:>10.1f} {p95 * 1e3:>8.1f} "
              f"{statistics.median(values) / bare:>7.2f}")
    print(f"{'7 VMs at once':<18} {seven * 1e3:>10.1f} {'':>8} {'':>7}  ({running}/7 running, exit codes {codes})")
    for error in errors:
        print(f"  error: {error}")
    print(json.dumps({k: statistics.median(v) for k, v in rows.items()} | {"seven": seven}))


if __name__ == "__main__":
    main()
