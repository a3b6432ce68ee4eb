"""Benchmark: from `vgpuctl vm start` until QMP reports `running`, against bare QEMU with the same argv.

Both run the project's test guest on a mounted simulated Coffee Lake (1 GiB aperture); the accelerator
is TCG (pinned with --accel tcg, the same the probe picks on these KVM-PVM machines). Rows:
  bare QEMU       Popen(qemu-system-x86_64 with the argv `vgpuctl vm argv` prints) -> QMP query-status ==
                  running, waited for the fastest way we know (the way vgpuctl itself waits): the QMP
                  socket bound before QEMU starts and passed to it (-chardev socket,fd=N), one
                  connection that QEMU's monitor greets as soon as it runs
  vgpuctl CLI     `vgpuctl vm start NAME --accel tcg` as a whole process (returns once QMP says running)
  vgpuctl library vgpuctl.vm.lifecycle.start() in this process
  vgpuctl service POST /api/v1/vms/NAME/start to a running `vgpuctl serve` (keep-alive HTTP connection,
                  bearer token), until the response (sent once QMP says running)
  7 VMs at once   seven `vgpuctl vm start` processes in parallel, wall time until all return
Targets: CLI <= 3x bare QEMU, service <= 1.3x. Run: make bench (or .venv/bin/python bench/bench_vm.py
[--runs N]).
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from vgpuctl.base.state import StateDir
from vgpuctl.host import HostRoot
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
    paths.pidfile.unlink(missing_ok=True)
    started = time.perf_counter()
    listener = lifecycle.listen_qmp(paths.qmp_socket)
    process = subprocess.Popen(lifecycle.preopened_qmp_argv(argv, listener), stdin=subprocess.DEVNULL,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, pass_fds=(listener,))
    os.close(listener)
    try:
        lifecycle.wait_running(paths.qmp_socket, lambda: process.poll() is not None, 10.0, "bare QEMU: no 'running'")
        return time.perf_counter() - started
    finally:
        process.kill()
        process.wait()


class Service:
    """`vgpuctl serve` on a free loopback port, and one keep-alive HTTP connection to it."""

    def __init__(self, env: dict[str, str], state: StateDir) -> None:
        import socket

        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        self.process = subprocess.Popen([VGPUCTL, "serve", "--port", str(self.port)], env=env,
                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 30
        while True:
            try:
                self.token = (state.path / "token").read_text().strip()
                self.connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
                self.request("GET", "/api/v1/vms")
                break
            except (OSError, http.client.HTTPException):
                if time.monotonic() > deadline or self.process.poll() is not None:
                    raise SystemExit("vgpuctl serve did not come up") from None
                time.sleep(0.1)

    def request(self, method: str, path: str, body: dict[str, str] | None = None) -> dict[str, object]:
        headers = {"Authorization": f"Bearer {self.token}", "Content-Type": "application/json"}
        self.connection.request(method, path, json.dumps(body) if body is not None else None, headers)
        response = self.connection.getresponse()
        data = response.read()
        if response.status != 200:
            raise SystemExit(f"{method} {path}: {response.status} {data.decode()}")
        return json.loads(data)  # type: ignore[no-any-return]

    def start(self, name: str) -> float:
        started = time.perf_counter()
        answer = self.request("POST", f"/api/v1/vms/{name}/start", {"accel": "tcg"})
        elapsed = time.perf_counter() - started
        if answer.get("state") != "running":
            raise SystemExit(f"service start: {answer}")
        return elapsed

    def close(self) -> None:
        self.connection.close()
        self.process.terminate()
        self.process.wait(10)


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
    rows: dict[str, list[float]] = {"bare QEMU": [], "vgpuctl CLI": [], "vgpuctl library": [],
                                    "vgpuctl service": []}
    service: Service | None = None
    try:
        for index in range(8):
            new_vm(state, f"car{index}", guest)
        argv = lifecycle.prepare(root, state, "car0", accel="tcg").command.argv
        lifecycle.start(root, state, "car0", accel="tcg")  # warm-up: the vGPU exists from now on
        lifecycle.kill(root, state, "car0")
        service = Service(env, state)
        service.start("car0")  # warm-up: the service's first start imports the VM modules
        lifecycle.kill(root, state, "car0")
        for _ in range(options.runs):
            rows["bare QEMU"].append(bare_qemu(argv, RuntimePaths.for_vm(state, "car0")))
            rows["vgpuctl CLI"].append(timed([VGPUCTL, "vm", "start", "car0", "--accel", "tcg"], env))
            lifecycle.kill(root, state, "car0")
            started = time.perf_counter()
            lifecycle.start(root, state, "car0", accel="tcg")
            rows["vgpuctl library"].append(time.perf_counter() - started)
            lifecycle.kill(root, state, "car0")
            rows["vgpuctl service"].append(service.start("car0"))
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
        if service is not None:
            service.close()
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
