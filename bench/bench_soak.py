"""Soak ``vgpuctl serve``: viewers joining and leaving (H.264 and JPEG) plus API churn, and the server's RSS.

Run with ``.venv/bin/python bench/bench_soak.py [--duration 75] [--vms 3]``. Needs root (FUSE for the
simulated host), ``qemu-system-x86_64`` and gcc (the test guest). It

1. mounts a simulated Coffee Lake (FUSE) and starts ``--vms`` VMs on it through vgpuctl's own lifecycle
   (the test guest under TCG, 64 MiB, a vGPU each, ``display.backend = "vnc"``): what the dashboard streams;
2. starts ``vgpuctl serve`` on 127.0.0.1 in a subprocess, exactly as a user would (``--print-token``);
3. for ``--duration`` seconds runs, all against 127.0.0.1 only:
   - per VM but the last, *waves* of viewers (1-3 at a time, codec by turns H.264 and JPEG): all join, watch
     for 0.5-2 s, all leave — so the VM's display hub is made and torn down once per wave;
   - on the last VM, overlapping viewers that come and go at random (its hub lives on, its viewer list churns);
   - API churn: create a vGPU, list vGPUs, GPUs, types and VMs, read /metrics, remove the vGPU; now and then an
     SSE client (``/api/v1/events``) that reads its first snapshots and leaves;
4. samples the server's RSS (``/proc/PID/status``, VmRSS) every second, prints a table row every ``--interval``
   seconds, then the verdict: flat when the peak of the last third is within ``--tolerance`` MB of the middle
   third's (the first third is warm-up). Exit status 1 when it is not flat.

Every loop is bounded by the deadline; the VMs are killed and the host unmounted at the end, whatever happens.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT))

PARENT = "0000:00:02.0"
LOOPBACK = "127.0.0.1"


@dataclass
class Counters:
    hub_waves: int = 0
    viewer_sessions: int = 0
    frames: dict[str, int] = field(default_factory=lambda: {"h264": 0, "jpeg": 0})
    api_requests: int = 0
    sse_clients: int = 0
    errors: list[str] = field(default_factory=list)
    viewers_now: int = 0

    def error(self, what: str) -> None:
        if len(self.errors) < 50:
            self.errors.append(what)


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def threads_of(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/task"))


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind((LOOPBACK, 0))
        port: int = s.getsockname()[1]
        return port


async def watch(url: str, token: str, codec: str, seconds: float, counters: Counters, deadline: float) -> None:
    """One viewer: connect, read frames for ``seconds`` (or to the deadline), leave."""
    from websockets.asyncio.client import connect

    counters.viewers_now += 1
    try:
        async with connect(f"{url}?codec={codec}", additional_headers={"Authorization": f"Bearer {token}"},
                           max_size=None, open_timeout=10, close_timeout=2) as ws:
            counters.viewer_sessions += 1
            until = min(time.monotonic() + seconds, deadline)
            sent_input = False
            while (left := until - time.monotonic()) > 0:
                try:
                    message = await asyncio.wait_for(ws.recv(), left)
                except TimeoutError:
                    break
                if isinstance(message, bytes) and message[:1] in (b"\x02", b"\x03"):  # a frame end / a picture
                    counters.frames["h264" if message[:1] == b"\x03" else "jpeg"] += 1
                if not sent_input:
                    await ws.send(json.dumps({"type": "pointer", "x": 5, "y": 5, "buttons": 0}))
                    sent_input = True
    except Exception as exc:  # counted; the soak goes on
        if time.monotonic() < deadline:
            counters.error(f"viewer {codec}: {type(exc).__name__}: {exc}")
    finally:
        counters.viewers_now -= 1


async def waves(url: str, token: str, counters: Counters, deadline: float, rng: random.Random) -> None:
    """All viewers of this VM join, watch, leave: the hub is made and torn down once per wave."""
    turn = 0
    while time.monotonic() < deadline - 1:
        n = rng.randint(1, 3)
        codecs = [("h264", "jpeg")[(turn + i) % 2] for i in range(n)]
        turn += 1
        seconds = rng.uniform(0.5, 2.0)
        await asyncio.gather(*(watch(url, token, c, seconds, counters, deadline) for c in codecs))
        counters.hub_waves += 1
        await asyncio.sleep(0.3)  # the hub closes when its last viewer has gone


async def churn_viewers(url: str, token: str, counters: Counters, deadline: float, rng: random.Random) -> None:
    """Viewers that overlap: the hub stays, its viewer list changes."""
    tasks: set[asyncio.Task[None]] = set()
    while time.monotonic() < deadline - 1:
        if len(tasks) < 3:
            task = asyncio.create_task(watch(url, token, rng.choice(("h264", "jpeg")), rng.uniform(0.5, 4.0),
                                             counters, deadline))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
        await asyncio.sleep(rng.uniform(0.2, 1.0))
    await asyncio.gather(*tasks, return_exceptions=True)


async def api_churn(base: str, token: str, counters: Counters, deadline: float, rng: random.Random) -> None:
    import httpx

    api = f"{base}/api/v1"
    async with httpx.AsyncClient(headers={"Authorization": f"Bearer {token}"}, timeout=30) as http:
        async def call(method: str, path: str, expected: tuple[int, ...], **kwargs: Any) -> httpx.Response | None:
            try:
                response = await http.request(method, f"{api}{path}" if path.startswith("/") else path, **kwargs)
            except httpx.HTTPError as exc:
                counters.error(f"{method} {path}: {type(exc).__name__}: {exc}")
                return None
            counters.api_requests += 1
            if response.status_code not in expected:
                counters.error(f"{method} {path}: {response.status_code} {response.text[:200]}")
            return response

        rounds = 0
        while time.monotonic() < deadline - 1:
            rounds += 1
            created = await call("POST", "/vgpus", (201,), json={"parent": PARENT, "type": "i915-GVTg_V5_8"})
            await call("GET", "/vgpus", (200,))
            await call("GET", "/gpus", (200,))
            await call("GET", "/types", (200,))
            await call("GET", "/vms", (200,))
            await call("GET", f"{base}/metrics", (200,))
            if created is not None and created.status_code == 201:
                await call("DELETE", f"/vgpus/{created.json()['uuid']}", (204,))
            if rounds % 10 == 0:
                await sse_client(http, api, counters)
            await asyncio.sleep(rng.uniform(0.05, 0.2))


async def sse_client(http: Any, api: str, counters: Counters) -> None:
    seen = set()
    try:
        async with http.stream("GET", f"{api}/events") as response:
            async for line in response.aiter_lines():
                if line.startswith("event: "):
                    seen.add(line[7:])
                if {"gpus", "vgpus", "vms"} <= seen:
                    break
        counters.sse_clients += 1
    except Exception as exc:
        counters.error(f"SSE: {type(exc).__name__}: {exc}")


async def sample(pid: int, counters: Counters, started: float, deadline: float, interval: float,
                 rows: list[dict[str, Any]], samples: list[tuple[float, float]]) -> None:
    """RSS every second (for the verdict: it swings with how many hubs and encoders are live at that instant);
    a table row every ``interval`` seconds."""
    header = (f"{'t s':>6} {'RSS MB':>8} {'threads':>7} {'viewers':>7} {'hub waves':>9} {'sessions':>8} "
              f"{'h264 pics':>9} {'jpeg frames':>11} {'API reqs':>8} {'SSE':>4} {'errors':>6}")
    print(header)
    print("-" * len(header))
    next_row = started
    while True:
        now = time.monotonic()
        samples.append((now - started, rss_mb(pid)))
        if now >= next_row or now >= deadline:
            next_row += interval
            row = {"t": now - started, "rss_mb": samples[-1][1], "threads": threads_of(pid),
                   "viewers": counters.viewers_now, "hub_waves": counters.hub_waves,
                   "sessions": counters.viewer_sessions, "h264": counters.frames["h264"],
                   "jpeg": counters.frames["jpeg"], "api": counters.api_requests, "sse": counters.sse_clients,
                   "errors": len(counters.errors)}
            rows.append(row)
            print(f"{row['t']:6.0f} {row['rss_mb']:8.1f} {row['threads']:7d} {row['viewers']:7d} "
                  f"{row['hub_waves']:9d} {row['sessions']:8d} {row['h264']:9d} {row['jpeg']:11d} {row['api']:8d} "
                  f"{row['sse']:4d} {row['errors']:6d}", flush=True)
        if now >= deadline:
            return
        await asyncio.sleep(min(1.0, max(0.0, deadline - now)))


async def soak(base: str, token: str, pid: int, vms: list[str], args: argparse.Namespace) -> list[dict[str, Any]]:
    counters = Counters()
    rng = random.Random(args.seed)
    started = time.monotonic()
    deadline = started + args.duration
    ws = base.replace("http://", "ws://")
    rows: list[dict[str, Any]] = []
    samples: list[tuple[float, float]] = []
    loads = [waves(f"{ws}/api/v1/vms/{name}/display", token, counters, deadline, random.Random(rng.random()))
             for name in vms[:-1]]
    loads.append(churn_viewers(f"{ws}/api/v1/vms/{vms[-1]}/display", token, counters, deadline,
                               random.Random(rng.random())))
    loads.append(api_churn(base, token, counters, deadline, random.Random(rng.random())))
    sampler = asyncio.create_task(sample(pid, counters, started, deadline, args.interval, rows, samples))
    await asyncio.gather(*loads)
    await sampler
    if counters.errors:
        print(f"\n{len(counters.errors)} errors (first ones):")
        for line in counters.errors[:10]:
            print("  " + line)
    return rows, samples


def verdict(samples: list[tuple[float, float]], duration: float, tolerance_mb: float) -> bool:
    """Flat: the RSS's peak in the last third of the run is within ``tolerance_mb`` of the middle third's (the
    first third is warm-up). Peaks, not single samples or lows: RSS swings by ~30-50 MB per live encoder with the
    viewers connected at the instant of a sample; a leak raises the peaks."""
    middle = [mb for t, mb in samples if duration / 3 <= t < 2 * duration / 3]
    last = [mb for t, mb in samples if t >= 2 * duration / 3]
    if not (middle and last):
        print("too short for a verdict")
        return True
    growth = max(last) - max(middle)
    print(f"\nRSS: {samples[0][1]:.0f} MB at start; middle third {min(middle):.0f}-{max(middle):.0f} MB, last third "
          f"{min(last):.0f}-{max(last):.0f} MB (1 s samples): peak growth after warm-up {growth:+.1f} MB "
          f"(tolerance {tolerance_mb:.0f} MB)")
    flat = growth <= tolerance_mb
    print("FLAT after warm-up" if flat else "GROWING after warm-up")
    return flat


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=75.0, help="seconds of load (default 75)")
    parser.add_argument("--vms", type=int, default=3, help="VMs (default 3; the last one gets overlapping viewers)")
    parser.add_argument("--interval", type=float, default=5.0, help="seconds between table rows (RSS is sampled "
                                                                    "every second)")
    parser.add_argument("--tolerance", type=float, default=25.0, help="MB of growth after warm-up still 'flat'")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--json", type=Path, help="also write the samples here")
    args = parser.parse_args()
    if args.vms < 2:
        parser.error("--vms must be at least 2 (waves on all but the last, overlapping viewers on the last)")

    from vgpuctl.base.state import StateDir
    from vgpuctl.host import HostRoot
    from vgpuctl.sim import mount
    from vgpuctl.sim.presets import preset
    from vgpuctl.vm import lifecycle, profiles
    from vgpuctl.vm import spec as specs
    from vgpuctl.vm.testguest import build_test_guest

    guest = str(build_test_guest())
    names = [f"soak{i}" for i in range(args.vms)]
    with tempfile.TemporaryDirectory(prefix="vgsk-") as tmp:  # short: QMP/VNC socket paths must fit in 107 bytes
        directory, state = Path(tmp) / "host", StateDir(Path(tmp) / "s")
        directory.mkdir()
        mount.mount(preset("coffeelake").with_overrides(aperture_mib=1024).to_json(), directory, "coffeelake")
        root = HostRoot(directory)
        server: subprocess.Popen[str] | None = None
        try:
            accels = []
            for name in names:
                vm = profiles.new_spec(name, "automotive")
                vm.kernel, vm.boot, vm.memory_mib, vm.cpus = guest, "kernel", 64, 1
                vm.display.backend = "vnc"
                specs.save(state, vm, new=True)
                status = lifecycle.start(root, state, name)
                accels.append(status.accel)
            port = free_port()
            server = subprocess.Popen(
                [sys.executable, "-m", "vgpuctl", "--root", str(directory), "--state-dir", str(state.path),
                 "serve", "--host", LOOPBACK, "--port", str(port), "--print-token"],
                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                env={**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(ROOT / "src")})
            assert server.stdout is not None
            token = ""
            for _ in range(5):
                line = server.stdout.readline()
                if line.startswith("token "):
                    token = line.split(" ", 1)[1].strip()
                    break
            if not token:
                raise SystemExit(f"vgpuctl serve did not start (exit {server.poll()})")
            import platform

            print(f"vgpuctl serve pid {server.pid} on {LOOPBACK}:{port}; {len(names)} VMs under "
                  f"{', '.join(sorted(set(a or '?' for a in accels)))} (test guest, 1024x768); "
                  f"Python {platform.python_version()}; {os.cpu_count()} CPUs; {args.duration:.0f} s\n", flush=True)
            rows, samples = asyncio.run(soak(f"http://{LOOPBACK}:{port}", token, server.pid, names, args))
            flat = verdict(samples, args.duration, args.tolerance)
            if args.json:
                args.json.write_text(json.dumps({"accel": accels, "rows": rows, "samples": samples}, indent=1))
            return 0 if flat else 1
        finally:
            if server is not None:
                server.terminate()
                with contextlib.suppress(subprocess.TimeoutExpired):
                    server.wait(15)
                if server.poll() is None:
                    server.kill()
            for name in names:
                with contextlib.suppress(Exception):
                    if specs.exists(state, name) and lifecycle.status(root, state, name).pid:
                        lifecycle.kill(root, state, name)
            mount.umount(directory, lazy=True)


if __name__ == "__main__":
    sys.exit(main())
