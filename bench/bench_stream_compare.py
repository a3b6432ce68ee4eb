"""vgpuctl's display stream against noVNC on QEMU's own WebSocket listener, in one run, in headless Chromium.

Run with ``.venv/bin/python bench/bench_stream_compare.py`` (about 4 min on 2 cores; ``--help`` for the knobs).
Needs ``qemu-system-x86_64``, gcc (the test guest), Debian's ``chromium`` and Debian's ``novnc``
(``/usr/share/novnc``). Playwright is not used.

Setups, each with its own QEMU (one per workload) booting the test guest under TCG at 1920x1080, with the same
arguments but ``-vnc``:

``vgpuctl``
    ``-vnc unix:<state>/vms/<name>/vnc.sock``; the display route (``vgpuctl.service.stream``, no auth) in a uvicorn
    **subprocess** configured as ``vgpuctl serve`` configures it (permessage-deflate on: uvicorn's default), and a
    page that plays it with the dashboard's player (``service/web/display.js``).
``vgpuctl-nodeflate``
    the same with ``ws_per_message_deflate=False``.
``novnc``
    ``-vnc 127.0.0.1:<N>,websocket=127.0.0.1:<port>`` (QEMU's built-in listener; it answers only the path ``/``, so
    the page gets ``path=``), Debian's noVNC 1.3.0 ``vnc_lite.html`` served by a loopback static HTTP server in a
    thread, noVNC's default encodings and settings (QEMU then sends Tight without JPEG: its ``lossy`` is off by
    default) — what a user who puts noVNC in front of QEMU gets.

Two workloads per setup, each on its own QEMU and page load: painted fps, then input-to-picture latency.

``bar``
    the guest's default animation: a full-height bar, 1/20 of the width, moved 7 px every 10 ms (so ~120 of 1920
    columns change per VNC refresh).
``full-screen``
    the guest's ``anim=full`` animation (``--guest-fps``, default 60): a pattern scrolled diagonally over the whole
    screen, so **every pixel row changes in every frame**; the guest reports how many frames it really drew each
    second on its debug console (the "guest repaints/s" column; under TCG it may draw fewer than asked). With
    ``--storm-hz N`` instead the old workload: the bar guest plus N key presses per second sent straight to QEMU
    over QMP (each repaints the whole screen in the next scheme); painted fps only then, as the storm's keys
    change the scheme all the time.

After the ``vgpuctl`` setup of each workload, on the same QEMU, a **floor**: vgpuctl's own RFB client alone (Raw,
pipelined, no server and no browser), key press until its framebuffer shows the new scheme — what guest and QEMU
cost before streaming.

Chromium runs once (``--headless``, software rendering) and is driven over a plain DevTools WebSocket: only the
Page domain is enabled (for ``Page.addScriptToEvaluateOnNewDocument``; it sends navigation events, nothing per
WebSocket frame), plus ``Runtime.evaluate`` and ``Input.dispatchKeyEvent``. The same script is injected into both
pages before they load; it wraps ``WebSocket`` to count the bytes of received messages and measures from the
canvas' pixels, never from the players' own events:

* **painted fps**: for ``--fps-seconds``, every animation frame reads the middle row of the biggest canvas on the
  page (one ``getImageData`` of 1920x1 px) and hashes it; a hash that differs from the previous one is one painted
  frame (in both workloads every guest frame changes that row: the bar spans the full height, the full-screen
  pattern moves in every row). Frame gaps are the times between such changes.
* **input-to-picture latency**, in both workloads: ``--presses`` times, a key press (``KeyA``) sent with CDP
  ``Input.dispatchKeyEvent`` to the focused canvas — each player forwards it as it forwards a user's keys; t0 is
  ``performance.now()`` in a capturing ``keydown`` listener, t1 the first animation frame whose middle row has the
  next scheme's dominant colour (blue, red, green in turn: the guest repaints the whole screen in it; the scheme's
  channel dominates every background pixel, also while the full-screen pattern scrolls). The guest's debug log is
  checked to have seen every press.
* **bytes/s**: WebSocket message payload counted in the page; wire bytes (TCP, both directions, with WebSocket
  framing and deflate) from ``ss -ti`` on the server's socket.
* **CPU**, over the fps window, in % of one core: the uvicorn process (vgpuctl's server: RFB client, JPEG encode,
  WebSocket), QEMU split into its vCPU thread (the guest, ``CPU 0/TCG``) and the rest (main loop with the VNC
  server and WebSocket code, ``vnc_worker`` encoding, I/O threads; QEMU runs with ``-name …,debug-threads=on``),
  and the whole Chromium process tree.

Prints one table, then the targets' verdicts; ``--json FILE`` writes every number. Everything it starts is stopped
at the end (also on Ctrl-C/SIGTERM and after ``--timeout`` seconds).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import http.server
import itertools
import json
import os
import random
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
WEB = ROOT / "src" / "vgpuctl" / "service" / "web"
NOVNC = Path("/usr/share/novnc")
QEMU = "qemu-system-x86_64"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
CLK_TCK = os.sysconf("SC_CLK_TCK")
SETUPS = ("vgpuctl", "vgpuctl-h264", "vgpuctl-nodeflate", "novnc")
DEFAULT_SETUPS = ("vgpuctl", "vgpuctl-h264", "novnc")
OURS = ("vgpuctl", "vgpuctl-h264", "vgpuctl-nodeflate")
WORKLOADS = ("bar", "full-screen")
VM_NAME = "bench"
TARGET_FPS = 25.0
TARGET_LATENCY_MS = 80.0

VGPUCTL_PAGE = """<!doctype html><html><head><meta charset="utf-8"><title>vgpuctl display</title></head>
<body style="margin:0"><canvas id="c" tabindex="0"></canvas>
<script type="module">
import { DisplayPlayer } from "./display.js";
const url = new URL("/api/v1/vms/VM/display", location.href); url.protocol = "ws:";
const codec = new URLSearchParams(location.search).get("codec") || "jpeg";
new DisplayPlayer(document.getElementById("c"), url.href, { codec }).start();
</script></body></html>
"""

# Injected into every page before its own scripts (Page.addScriptToEvaluateOnNewDocument).
MEASURE_JS = r"""
(() => {
  const counter = { bytes: 0, messages: 0 };
  // A factory, not a subclass: the socket stays a plain WebSocket (noVNC checks its prototype's members).
  const NativeWebSocket = window.WebSocket;
  function CountingWebSocket(...args) {
    const ws = new NativeWebSocket(...args);
    ws.addEventListener("message", (event) => {
      const d = event.data;
      counter.bytes += typeof d === "string" ? d.length : (d.byteLength ?? d.size ?? 0);
      counter.messages++;
    });
    return ws;
  }
  CountingWebSocket.prototype = NativeWebSocket.prototype;
  for (const k of ["CONNECTING", "OPEN", "CLOSING", "CLOSED"]) CountingWebSocket[k] = NativeWebSocket[k];
  window.WebSocket = CountingWebSocket;
  const raf = () => new Promise((resolve) => requestAnimationFrame(resolve));
  const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));
  function canvas() {
    let best = null;
    for (const c of document.querySelectorAll("canvas")) {
      if (!best || c.width * c.height > best.width * best.height) best = c;
    }
    return best;
  }
  // One read of the middle row: a hash of its pixels and its dominant colour.
  function sample(c) {
    const d = c.getContext("2d").getImageData(0, c.height >> 1, c.width, 1).data;
    let h = 2166136261, r = 0, g = 0, b = 0;
    for (let i = 0; i < d.length; i += 4) {
      h = Math.imul(h ^ (d[i] | (d[i + 1] << 8) | (d[i + 2] << 16)), 16777619);
      r += d[i]; g += d[i + 1]; b += d[i + 2];
    }
    return { hash: h >>> 0, scheme: r > g && r > b ? "red" : g > b ? "green" : "blue" };
  }
  window.__bench = {
    counter,
    async ready() {  // a canvas of the guest's size whose middle row changes
      const c = canvas();
      if (!c || c.width < 64 || c.height < 64) return null;
      const first = sample(c).hash;
      for (let i = 0; i < 60; i++) {
        await raf();
        if (sample(c).hash !== first) return [c.width, c.height];
      }
      return null;
    },
    focus() {
      const c = canvas();
      c.focus();
      return document.activeElement === c;
    },
    async fps(ms) {
      const c = canvas();
      const b0 = counter.bytes, m0 = counter.messages, f0 = Number(c.dataset.frames);
      let last = sample(c).hash, rafs = 0;
      const times = [];
      const t0 = performance.now();
      let t = t0;
      while (t - t0 < ms) {
        await raf();
        rafs++;
        const h = sample(c).hash;
        t = performance.now();
        if (h !== last) { times.push(t); last = h; }
      }
      const secs = (t - t0) / 1000;
      return { secs, painted: times.length, rafs, payload_bytes: counter.bytes - b0, messages: counter.messages - m0,
               gaps_ms: times.slice(1).map((x, i) => x - times[i]), size: [c.width, c.height],
               player_frames: Number(c.dataset.frames) - f0 };  // vgpuctl's player counts its frames: a cross-check
    },
    arm(timeoutMs) {  // watch for the next key press and the picture it changes to the next scheme
      const c = canvas();
      const before = sample(c).scheme;
      const next = { blue: "red", red: "green", green: "blue" }[before];
      const st = { t0: null };
      window.addEventListener("keydown", () => { if (st.t0 === null) st.t0 = performance.now(); },
                              { capture: true, once: true });
      this.pending = (async () => {
        const limit = performance.now() + timeoutMs;
        for (;;) {
          await raf();
          const now = performance.now();
          if (st.t0 !== null) {
            const s = sample(c).scheme;
            if (s === next) return { latency_ms: now - st.t0, before, after: s };
          }
          if (now > limit) return { latency_ms: null, before, after: null, key_seen: st.t0 !== null };
        }
      })();
      return before;
    },
    result() { return this.pending; },
  };
})();
"""


# ------------------------------------------------------------------------------------------ processes and CPU


def cpu_of(pid: int, task: int | None = None) -> tuple[str, float]:
    """(comm, utime+stime in seconds) of a process (all its threads) or of one of its threads."""
    path = f"/proc/{pid}/stat" if task is None else f"/proc/{pid}/task/{task}/stat"
    with open(path) as f:
        text = f.read()
    comm = text[text.index("(") + 1:text.rindex(")")]
    fields = text[text.rindex(")") + 2:].split()
    return comm, (int(fields[11]) + int(fields[12])) / CLK_TCK


def qemu_cpu(pid: int) -> dict[str, float]:
    """CPU seconds of QEMU's threads: ``vcpu`` (the ``CPU n/TCG`` threads) and ``rest``."""
    out = {"vcpu": 0.0, "rest": 0.0}
    for task in os.listdir(f"/proc/{pid}/task"):
        with contextlib.suppress(FileNotFoundError, ProcessLookupError):
            comm, secs = cpu_of(pid, int(task))
            out["vcpu" if comm.startswith("CPU ") else "rest"] += secs
    return out


def tree_cpu(root: int) -> float:
    """CPU seconds of a process and all its live descendants."""
    parent: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError, ValueError):
                with open(f"/proc/{entry}/stat") as f:
                    text = f.read()
                parent[int(entry)] = int(text[text.rindex(")") + 2:].split()[1])
    total = 0.0
    for pid in parent:
        p = pid
        while p > 1 and p != root:
            p = parent.get(p, 0)
        if p == root:
            with contextlib.suppress(OSError):
                total += cpu_of(pid)[1]
    return total


def wire_bytes(port: int) -> int | None:
    """TCP bytes sent + received on the established sockets whose local port is ``port`` (``ss -ti``)."""
    try:
        out = subprocess.run(["ss", "-tinH", "state", "established", f"( sport = :{port} )"],
                             capture_output=True, text=True, timeout=5, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    acked = sum(int(v) for v in re.findall(r"\bbytes_acked:(\d+)", out))
    received = sum(int(v) for v in re.findall(r"\bbytes_received:(\d+)", out))
    return acked + received if "bytes_" in out else None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def free_vnc_display() -> int:
    for display in range(50, 100):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", 5900 + display))
            except OSError:
                continue
            return display
    raise RuntimeError("no free VNC display in :50..:99")


def stop(proc: subprocess.Popen[bytes], group: bool = False) -> None:
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            if group:
                os.killpg(proc.pid, signal.SIGTERM)
            else:
                proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                if group:
                    os.killpg(proc.pid, signal.SIGKILL)
                else:
                    proc.kill()
            proc.wait(5)


def wait_for(check: Any, timeout: float, what: str, proc: subprocess.Popen[bytes] | None = None) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{what}: the process exited ({proc.returncode})")
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what}: not within {timeout:.0f} s")
        time.sleep(0.05)


@dataclass
class Guest:
    state: Path
    proc: subprocess.Popen[bytes]
    debug_log: Path
    qmp_socket: Path

    def log(self) -> str:
        return self.debug_log.read_text(errors="replace")

    def keys_seen(self) -> int:
        return self.log().count("vgpuctl-test-guest key ")


@contextlib.contextmanager
def guest(elf: Path, resolution: tuple[int, int], vnc: str | None, fps: int | None) -> Iterator[Guest]:
    """QEMU with the test guest laid out as vgpuctl VM ``bench``; ``vnc`` None: ``-vnc unix:<its socket>``;
    ``fps`` None: the bar animation, else the full-screen one at that rate."""
    from vgpuctl.base.state import StateDir
    from vgpuctl.vm.runtime import RuntimePaths
    from vgpuctl.vm.testguest import READY_LINE, kernel_args

    with tempfile.TemporaryDirectory(prefix="vgsc-") as tmp:  # short: unix socket paths have ~108 bytes
        paths = RuntimePaths.for_vm(StateDir(Path(tmp)), VM_NAME)
        paths.directory.mkdir(parents=True)
        debug_log = paths.directory / "debug.log"
        argv = [QEMU, "-name", f"{VM_NAME},debug-threads=on", "-machine", "pc", "-accel", "tcg", "-m", "64",
                "-nodefaults", "-vga", "std", "-display", "none", "-vnc", vnc or f"unix:{paths.vnc_socket}",
                *kernel_args(elf, resolution, "bar" if fps is None else "full", fps), "-pidfile", str(paths.pidfile),
                "-qmp", f"unix:{paths.qmp_socket},server=on,wait=off",
                "-chardev", f"file,id=dbg,path={debug_log}", "-device", "isa-debugcon,iobase=0xe9,chardev=dbg"]
        with (paths.directory / "qemu.log").open("wb") as out:
            proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=out)
        try:
            wait_for(lambda: debug_log.exists() and READY_LINE in debug_log.read_text(errors="replace")
                     and paths.pidfile.exists() and paths.qmp_socket.exists(), 20, "the test guest", proc)
            yield Guest(Path(tmp), proc, debug_log, paths.qmp_socket)
        finally:
            stop(proc)


@contextlib.contextmanager
def key_storm(qmp_socket: Path, hz: float) -> Iterator[list[int]]:
    """Key presses (press + release of ``a``) sent straight to QEMU over QMP at ``hz``, in a thread, while inside:
    each makes the guest repaint its whole screen in the next scheme. Yields [presses sent so far]."""
    sent = [0]
    halt = threading.Event()
    sock = socket.socket(socket.AF_UNIX)
    sock.settimeout(5)
    sock.connect(str(qmp_socket))
    reader = sock.makefile("rb")

    def command(execute: str, **arguments: Any) -> None:
        sock.sendall(json.dumps({"execute": execute, "arguments": arguments}).encode() + b"\n")
        while True:  # skip events up to the reply
            reply = json.loads(reader.readline())
            if "return" in reply or "error" in reply:
                if "error" in reply:
                    raise RuntimeError(f"QMP {execute}: {reply['error']}")
                return

    reader.readline()  # the greeting
    command("qmp_capabilities")
    key = {"type": "qcode", "data": "a"}
    events = [{"type": "key", "data": {"down": down, "key": key}} for down in (True, False)]

    def run() -> None:
        period = 1 / hz
        next_at = time.monotonic()
        while not halt.is_set():
            command("input-send-event", events=events)
            sent[0] += 1
            next_at += period
            halt.wait(max(0.0, next_at - time.monotonic()))

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    try:
        yield sent
    finally:
        halt.set()
        thread.join(5)
        reader.close()
        sock.close()


# ------------------------------------------------------------------------------------------ servers


def serve_vgpuctl(state: str, port: int, deflate: bool) -> None:
    """The subprocess: vgpuctl's display route (no auth) + the player page, on uvicorn as ``vgpuctl serve`` runs it."""
    import uvicorn
    from fastapi import FastAPI
    from fastapi.responses import HTMLResponse, Response

    from vgpuctl.base.state import StateDir
    from vgpuctl.service.stream import make_router, registry_of

    app = FastAPI()
    app.state.state = StateDir(Path(state))
    app.include_router(make_router(None))
    page = VGPUCTL_PAGE.replace("/VM/", f"/{VM_NAME}/")
    player = (WEB / "display.js").read_bytes()

    @app.get("/bench.html")
    def bench_page() -> HTMLResponse:
        return HTMLResponse(page)

    @app.get("/display.js")
    def display_js() -> Response:
        return Response(player, media_type="text/javascript")

    @app.get("/stats")
    def stats() -> dict[str, Any]:  # the hub's counters (QEMU updates, frames queued, encode time): diagnostics
        return registry_of(app).stats()

    # As vgpuctl.cli.serve.run_service configures uvicorn (it keeps uvicorn's permessage-deflate default).
    config = uvicorn.Config(app, host="127.0.0.1", port=port, access_log=False, server_header=False,
                            proxy_headers=False, log_level="warning", timeout_graceful_shutdown=3,
                            ws_per_message_deflate=deflate)
    uvicorn.Server(config).run()


@contextlib.contextmanager
def vgpuctl_server(state: Path, deflate: bool) -> Iterator[tuple[subprocess.Popen[bytes], int]]:
    port = free_port()
    argv = [sys.executable, __file__, "--serve-vgpuctl", str(state), "--port", str(port),
            *(["--deflate"] if deflate else [])]
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, cwd=ROOT)
    try:
        def up() -> bool:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/display.js", timeout=2) as r:
                    return r.status == 200
            except OSError:
                return False
        wait_for(up, 20, "the uvicorn subprocess", proc)
        yield proc, port
    finally:
        stop(proc)


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass


@contextlib.contextmanager
def static_server(directory: Path) -> Iterator[int]:
    """noVNC's files on a loopback HTTP server in a thread."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0),
                                             functools.partial(QuietHandler, directory=str(directory)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield int(server.server_address[1])
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


# ------------------------------------------------------------------------------------------ the browser


class Cdp:
    """A plain DevTools connection to one page: commands only, no domain enabled (so no events to copy)."""

    def __init__(self, ws_url: str) -> None:
        from websockets.sync.client import connect

        self.stack = contextlib.ExitStack()
        self.ws = self.stack.enter_context(connect(ws_url, max_size=None, open_timeout=10))
        self.ids = itertools.count(1)

    def call(self, method: str, timeout: float = 30.0, **params: Any) -> dict[str, Any]:
        ident = next(self.ids)
        self.ws.send(json.dumps({"id": ident, "method": method, "params": params}))
        deadline = time.monotonic() + timeout
        while True:
            message = json.loads(self.ws.recv(timeout=max(0.01, deadline - time.monotonic())))
            if message.get("id") == ident:
                if "error" in message:
                    raise RuntimeError(f"{method}: {message['error']}")
                result: dict[str, Any] = message.get("result", {})
                return result

    def eval(self, expression: str, timeout: float = 30.0) -> Any:
        result = self.call("Runtime.evaluate", timeout=timeout, expression=expression, awaitPromise=True,
                           returnByValue=True)
        if "exceptionDetails" in result:
            details = result["exceptionDetails"]
            raise RuntimeError(f"{expression}: {details.get('exception', {}).get('description') or details}")
        return result["result"].get("value")

    def key(self, code: str = "KeyA", key: str = "a") -> None:
        for kind in ("keyDown", "keyUp"):
            self.call("Input.dispatchKeyEvent", type=kind, code=code, key=key, windowsVirtualKeyCode=ord(key.upper()),
                      nativeVirtualKeyCode=ord(key.upper()), **({"text": key} if kind == "keyDown" else {}))

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.stack.close()


@contextlib.contextmanager
def browser(chromium: str, size: tuple[int, int]) -> Iterator[tuple[subprocess.Popen[bytes], Cdp]]:
    with tempfile.TemporaryDirectory(prefix="vgsc-chromium-") as profile:
        proc = subprocess.Popen([chromium, *CHROMIUM_ARGS, f"--window-size={size[0]},{size[1]}",
                                 f"--user-data-dir={profile}", "--remote-debugging-port=0", "about:blank"],
                                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                start_new_session=True)
        cdp: Cdp | None = None
        try:
            active = Path(profile) / "DevToolsActivePort"
            port = int(wait_for(lambda: active.exists() and active.read_text().split("\n")[0], 30,
                                "chromium's DevTools port", proc))

            def page_target() -> str | None:
                try:
                    with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=2) as r:
                        targets = json.load(r)
                except OSError:
                    return None
                return next((t["webSocketDebuggerUrl"] for t in targets if t.get("type") == "page"), None)

            cdp = Cdp(wait_for(page_target, 15, "chromium's page target", proc))
            cdp.call("Page.enable")  # page lifecycle events only; scripts to inject on navigation need it
            cdp.call("Page.addScriptToEvaluateOnNewDocument", source=MEASURE_JS)
            cdp.call("Emulation.setFocusEmulationEnabled", enabled=True)
            yield proc, cdp
        finally:
            if cdp is not None:
                cdp.close()
            stop(proc, group=True)


# ------------------------------------------------------------------------------------------ one setup


@dataclass
class Result:
    setup: str
    workload: str
    size: list[int] = field(default_factory=list)
    secs: float = 0.0
    painted_fps: float = 0.0
    raf_per_s: float = 0.0
    gap_p50_ms: float = 0.0
    gap_p95_ms: float = 0.0
    gap_max_ms: float = 0.0
    latencies_ms: list[float | None] = field(default_factory=list)
    payload_bytes_per_s: float = 0.0
    messages_per_s: float = 0.0
    wire_bytes_per_s: float | None = None
    server_cpu_pct: float | None = None
    qemu_vcpu_pct: float = 0.0
    qemu_rest_pct: float = 0.0
    browser_cpu_pct: float = 0.0
    repaints_per_s: float = 0.0  # storm: the key presses the guest repainted for
    guest_fps: float | None = None  # full-screen: the frames the guest drew, from its debug log
    player_fps: float | None = None
    hub_updates_per_s: float | None = None
    hub_frames_per_s: float | None = None
    encode_ms_per_encode: float | None = None
    keys_sent: int = 0
    keys_seen_by_guest: int = 0

    @property
    def latency_median_ms(self) -> float | None:
        values = [v for v in self.latencies_ms if v is not None]
        return statistics.median(values) if values else None

    @property
    def latency_p95_ms(self) -> float | None:
        values = sorted(v for v in self.latencies_ms if v is not None)
        return values[min(len(values) - 1, round(0.95 * (len(values) - 1)))] if values else None

    def to_json(self) -> dict[str, Any]:
        out = dict(self.__dict__)
        out["latency_median_ms"] = self.latency_median_ms
        out["latency_p95_ms"] = self.latency_p95_ms
        return out


def percentile(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def hub_stats(port: int) -> dict[str, float]:
    """The vgpuctl server's hub counters, summed over its hubs (one here)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/stats", timeout=5) as r:
        hubs = json.load(r)
    return {k: sum(h[k] for h in hubs.values()) for k in ("updates", "encodes", "frames_queued", "encode_ms")}


def fps_window(cdp: Cdp, browser_pid: int, g: Guest, server: subprocess.Popen[bytes] | None, wire_port: int,
               result: Result, seconds: float) -> None:
    """Painted fps, bytes and CPU over one window of ``seconds``, into ``result``."""

    from vgpuctl.vm.testguest import frame_rate, frame_reports

    def snapshot() -> tuple[float, dict[str, float], float | None, float, int | None, str, dict[str, float] | None]:
        return (time.monotonic(), qemu_cpu(g.proc.pid), cpu_of(server.pid)[1] if server else None,
                tree_cpu(browser_pid), wire_bytes(wire_port), g.log(),
                hub_stats(wire_port) if server else None)

    before = snapshot()
    page = cdp.eval(f"__bench.fps({seconds * 1000})", timeout=seconds + 20)
    after = snapshot()
    wall = after[0] - before[0]
    result.size = page["size"]
    result.secs = page["secs"]
    result.painted_fps = page["painted"] / page["secs"]
    result.raf_per_s = page["rafs"] / page["secs"]
    gaps = page["gaps_ms"]
    result.gap_p50_ms, result.gap_p95_ms = percentile(gaps, 0.5), percentile(gaps, 0.95)
    result.gap_max_ms = max(gaps, default=0.0)
    result.payload_bytes_per_s = page["payload_bytes"] / page["secs"]
    result.messages_per_s = page["messages"] / page["secs"]
    if before[4] is not None and after[4] is not None:
        result.wire_bytes_per_s = (after[4] - before[4]) / wall
    if before[2] is not None and after[2] is not None:
        result.server_cpu_pct = 100 * (after[2] - before[2]) / wall
    result.qemu_vcpu_pct = 100 * (after[1]["vcpu"] - before[1]["vcpu"]) / wall
    result.qemu_rest_pct = 100 * (after[1]["rest"] - before[1]["rest"]) / wall
    result.browser_cpu_pct = 100 * (after[3] - before[3]) / wall
    key_line = "vgpuctl-test-guest key "
    result.repaints_per_s = (after[5].count(key_line) - before[5].count(key_line)) / wall
    # the guest's once-a-second reports written during the window (they lag it by up to a second)
    result.guest_fps = frame_rate(after[5], skip=frame_reports(before[5]))
    if page.get("player_frames") is not None:
        result.player_fps = page["player_frames"] / page["secs"]
    if before[6] is not None and after[6] is not None:
        delta = {k: after[6][k] - before[6][k] for k in after[6]}
        result.hub_updates_per_s = delta["updates"] / wall
        result.hub_frames_per_s = delta["frames_queued"] / wall
        result.encode_ms_per_encode = delta["encode_ms"] / delta["encodes"] if delta["encodes"] else None


def measure(cdp: Cdp, browser_pid: int, g: Guest, url: str, setup: str, workload: str,
            server: subprocess.Popen[bytes] | None, wire_port: int, args: argparse.Namespace) -> Result:
    """One workload on one page: painted fps (with bytes and CPU), then input-to-picture latency."""
    cdp.call("Page.navigate", url=url)
    wait_for(lambda: cdp.eval("window.__bench ? window.__bench.ready() : null"), 40, f"{setup}: a live canvas")
    time.sleep(args.warmup)
    result = Result(setup, workload)
    if workload == "full-screen" and args.storm_hz > 0:
        with key_storm(g.qmp_socket, args.storm_hz):
            time.sleep(1.0)
            fps_window(cdp, browser_pid, g, server, wire_port, result, args.fps_seconds)
        time.sleep(0.5)  # the presses still queued in the guest's keyboard controller
        cdp.call("Page.navigate", url="about:blank")
        return result  # no latency: the storm's keys change the scheme all the time
    fps_window(cdp, browser_pid, g, server, wire_port, result, args.fps_seconds)

    if not cdp.eval("__bench.focus()"):
        raise RuntimeError(f"{setup}: the canvas did not take the keyboard focus")
    keys_before = g.keys_seen()
    for _ in range(args.presses):
        time.sleep(random.uniform(0.3, 0.5))  # a different phase against QEMU's 30 ms refresh each time
        cdp.eval("__bench.arm(3000)")
        cdp.key()
        result.keys_sent += 1
        outcome = cdp.eval("__bench.result()", timeout=10)
        result.latencies_ms.append(outcome["latency_ms"])
    time.sleep(0.2)
    result.keys_seen_by_guest = g.keys_seen() - keys_before
    cdp.call("Page.navigate", url="about:blank")
    return result


def rfb_floor(vnc_socket: Path, presses: int, workload: str) -> Result:
    """The part of the latency before any streaming: vgpuctl's own RFB client (Raw, pipelined requests), no
    browser; key press (QEMU extended key event) until the middle row of its framebuffer shows the new scheme."""
    import asyncio

    import numpy as np

    from vgpuctl.service.stream.rfb import RfbClient

    def scheme(fb: Any) -> int:  # BGRX
        return int(np.argmax(fb[fb.shape[0] // 2, ::8, :3].astype(np.int64).sum(axis=0)))

    async def run() -> list[float | None]:
        client = await RfbClient.connect(vnc_socket)
        await client.set_encodings([0, -258])  # Raw, QEMU extended key events
        client.auto_request = True
        await client.request_update(incremental=False)

        async def pump() -> None:
            while True:
                await client.read_message()

        reader = asyncio.create_task(pump())
        latencies: list[float | None] = []
        try:
            for _ in range(presses):
                await asyncio.sleep(random.uniform(0.3, 0.5))
                before, t0 = scheme(client.framebuffer), time.monotonic()
                await client.key("KeyA", "a", True)
                await client.key("KeyA", "a", False)
                while scheme(client.framebuffer) == before and time.monotonic() - t0 < 3:
                    await asyncio.sleep(0.001)
                latencies.append(1000 * (time.monotonic() - t0) if time.monotonic() - t0 < 3 else None)
        finally:
            reader.cancel()
            client.close()
        return latencies

    result = Result("rfb-floor", workload)
    result.latencies_ms = asyncio.run(run())
    result.keys_sent = presses
    return result


def run_setup(setup: str, workload: str, elf: Path, resolution: tuple[int, int], cdp: Cdp, browser_pid: int,
              novnc_port: int, args: argparse.Namespace) -> list[Result]:
    """One setup with one workload, on a QEMU of its own (the guest's animation is chosen at boot)."""
    fps = args.guest_fps if workload == "full-screen" and args.storm_hz <= 0 else None
    if setup == "novnc":
        ws_port = free_port()
        vnc = f"127.0.0.1:{free_vnc_display()},websocket=127.0.0.1:{ws_port}"
        with guest(elf, resolution, vnc, fps) as g:
            url = f"http://127.0.0.1:{novnc_port}/vnc_lite.html?host=127.0.0.1&port={ws_port}&path="
            return [measure(cdp, browser_pid, g, url, setup, workload, None, ws_port, args)]
    with guest(elf, resolution, None, fps) as g:
        codec = "h264" if setup == "vgpuctl-h264" else "jpeg"
        with vgpuctl_server(g.state, setup != "vgpuctl-nodeflate") as (server, port):
            results = [measure(cdp, browser_pid, g, f"http://127.0.0.1:{port}/bench.html?codec={codec}", setup,
                               workload, server, port, args)]
        if setup == "vgpuctl" and args.floor and results[0].keys_sent:
            from vgpuctl.base.state import StateDir
            from vgpuctl.vm.runtime import RuntimePaths

            keys_before = g.keys_seen()
            vnc_socket = RuntimePaths.for_vm(StateDir(g.state), VM_NAME).vnc_socket
            results.append(rfb_floor(vnc_socket, args.presses, workload))
            results[-1].keys_seen_by_guest = g.keys_seen() - keys_before
        return results


# ------------------------------------------------------------------------------------------ report


def fmt(value: float | None, digits: int = 1) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


LABELS = {"vgpuctl": "vgpuctl JPEG (as `vgpuctl serve`: deflate on)",
          "vgpuctl-h264": "vgpuctl H.264 (WebCodecs; deflate on)", "vgpuctl-nodeflate": "vgpuctl JPEG, deflate off",
          "novnc": "noVNC 1.3.0 → QEMU websocket", "rfb-floor": "floor: RFB Raw client, no browser"}


def guest_repaints(r: Result) -> str:
    """What the guest itself repainted per second during the fps window."""
    if r.workload == "bar":
        return "100 (bar)"  # one move per 100 Hz tick
    if r.guest_fps is not None:
        return f"{r.guest_fps:.0f} (whole screen)"
    if r.repaints_per_s:
        return f"{r.repaints_per_s:.0f} (whole screen, QMP keys)"
    return ""


def table(results: list[Result]) -> str:
    head = ["setup", "workload", "guest repaints/s", "painted fps", "frame gap p50/p95/max ms", "latency median ms",
            "latency p95/max ms", "payload MB/s", "wire MB/s", "server CPU %", "QEMU vCPU %", "QEMU other %",
            "Chromium CPU %"]
    rows = [head]
    for r in results:
        lat = [v for v in r.latencies_ms if v is not None]
        missed = len(r.latencies_ms) - len(lat)
        latency = [f"{fmt(r.latency_median_ms, 0)} (n={len(lat)}{f', {missed} timed out' if missed else ''})",
                   f"{fmt(r.latency_p95_ms, 0)} / {fmt(max(lat, default=None), 0)}"] if r.keys_sent else ["", ""]
        if r.setup == "rfb-floor":
            rows.append([LABELS[r.setup], r.workload, guest_repaints(r), "", "", *latency, *[""] * 6])
            continue
        rows.append([
            LABELS.get(r.setup, r.setup), r.workload,
            guest_repaints(r),
            fmt(r.painted_fps), f"{r.gap_p50_ms:.0f} / {r.gap_p95_ms:.0f} / {r.gap_max_ms:.0f}", *latency,
            fmt(r.payload_bytes_per_s / 1e6, 2),
            fmt(None if r.wire_bytes_per_s is None else r.wire_bytes_per_s / 1e6, 2),
            "– (in QEMU)" if r.server_cpu_pct is None else fmt(r.server_cpu_pct, 0),
            fmt(r.qemu_vcpu_pct, 0), fmt(r.qemu_rest_pct, 0), fmt(r.browser_cpu_pct, 0)])
    widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
    lines = ["| " + " | ".join(c.ljust(w) if i < 2 else c.rjust(w)
                               for i, (c, w) in enumerate(zip(row, widths, strict=True))) + " |" for row in rows]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


def verdicts(results: list[Result]) -> list[str]:
    out: list[str] = []

    def say(ok: bool, text: str) -> None:
        out.append(f"target: {text}: {'HOLDS' if ok else 'MISSED'}")

    for workload in ("bar", "full-screen"):
        by = {r.setup: r for r in results if r.workload == workload}
        # The comparison with noVNC is the for the full-screen animation; with the bar, noVNC keeps up.
        novnc = by.get("novnc") if workload == "full-screen" else None
        for ours in (by[setup] for setup in OURS if setup in by):
            verdict(ours, novnc, workload, say)
    return out


def verdict(ours: Result, novnc: Result | None, workload: str, say: Callable[[bool, str], None]) -> None:
    """One setup of ours against the targets and against noVNC."""
    label = f"[{workload}] {LABELS[ours.setup]}"
    say(ours.painted_fps >= TARGET_FPS, f"{label}: painted fps >= {TARGET_FPS:.0f} ({ours.painted_fps:.1f})")
    if novnc is not None:
        ratio = ours.painted_fps / novnc.painted_fps if novnc.painted_fps else float("inf")
        say(ratio >= 4, f"{label}: fps >= 4x noVNC's ({ours.painted_fps:.1f} vs {novnc.painted_fps:.1f}: "
                        f"{ratio:.1f}x)")
    if not ours.keys_sent:
        return
    median = ours.latency_median_ms
    say(median is not None and median <= TARGET_LATENCY_MS,
        f"{label}: median input-to-picture <= {TARGET_LATENCY_MS:.0f} ms ({fmt(median, 0)} ms)")
    theirs = novnc.latency_median_ms if novnc is not None else None
    if median is not None and theirs:
        say(median <= theirs / 2, f"{label}: latency <= 1/2 noVNC's ({median:.0f} vs {theirs:.0f} ms: "
                                  f"{median / theirs:.2f}x)")
    elif novnc is not None:
        say(False, f"{label}: latency <= 1/2 noVNC's: no median for one of them")


# ------------------------------------------------------------------------------------------ main


class Timeout(Exception):
    pass


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--resolution", default="1920x1080")
    parser.add_argument("--setups", default=",".join(DEFAULT_SETUPS),
                        help=f"comma-separated, in order; of {SETUPS}")
    parser.add_argument("--fps-seconds", type=float, default=5.0)
    parser.add_argument("--presses", type=int, default=20)
    parser.add_argument("--warmup", type=float, default=2.0, help="seconds of playing before measuring")
    parser.add_argument("--workloads", default=",".join(WORKLOADS), help=f"comma-separated, in order; of {WORKLOADS}")
    parser.add_argument("--guest-fps", type=int, default=60,
                        help="full-screen workload: the frames per second the guest animates (1..100)")
    parser.add_argument("--storm-hz", type=float, default=0.0,
                        help="full-screen workload: instead of the guest's own animation, the bar guest plus this "
                             "many key presses per second sent to QEMU over QMP (no latency then)")
    parser.add_argument("--no-floor", dest="floor", action="store_false",
                        help="skip the latency floor (RFB client alone, no browser) after the vgpuctl setup")
    parser.add_argument("--timeout", type=int, default=420, help="give up (and clean up) after this many seconds")
    parser.add_argument("--json", metavar="FILE", help="write all numbers there")
    parser.add_argument("--serve-vgpuctl", metavar="STATE_DIR", help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--deflate", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_vgpuctl:
        serve_vgpuctl(args.serve_vgpuctl, args.port, args.deflate)
        return 0

    sys.path.insert(0, str(ROOT / "src"))
    width, height = (int(v) for v in args.resolution.split("x"))
    setups = [s for s in args.setups.split(",") if s]
    if unknown := set(setups) - set(SETUPS):
        parser.error(f"unknown setups {sorted(unknown)}")
    workloads = [w for w in args.workloads.split(",") if w]
    if unknown := set(workloads) - set(WORKLOADS):
        parser.error(f"unknown workloads {sorted(unknown)}")
    if not 1 <= args.guest_fps <= 100:
        parser.error("--guest-fps: 1..100 (the guest paces frames with its 100 Hz timer)")
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    missing = [what for what, ok in (("chromium (apt-get install chromium)", chromium),
                                     (f"{QEMU} (apt-get install qemu-system-x86)", shutil.which(QEMU)),
                                     ("noVNC (apt-get install novnc)", "novnc" not in setups
                                      or (NOVNC / "vnc_lite.html").exists())) if not ok]
    if missing or chromium is None:
        print("missing: " + ", ".join(missing), file=sys.stderr)
        return 2

    def on_signal(signum: int, frame: Any) -> None:
        raise Timeout(f"stopped after {args.timeout} s") if signum == signal.SIGALRM else KeyboardInterrupt

    signal.signal(signal.SIGALRM, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    signal.alarm(args.timeout)
    from vgpuctl.vm.testguest import build_test_guest

    started = time.monotonic()
    results: list[Result] = []
    try:
        elf = build_test_guest()
        with static_server(NOVNC) as novnc_port, browser(chromium, (width, height + 120)) as (proc, cdp):
            for workload in workloads:
                for setup in setups:
                    t = time.monotonic()
                    results.extend(run_setup(setup, workload, elf, (width, height), cdp, proc.pid, novnc_port, args))
                    print(f"# {setup}, {workload}: {time.monotonic() - t:.0f} s", file=sys.stderr)
    except (Timeout, RuntimeError) as e:
        print(f"bench_stream_compare: {e}", file=sys.stderr)
        return 1
    finally:
        signal.alarm(0)
    load = os.getloadavg()
    full = f"QMP key storm at {args.storm_hz:g} Hz" if args.storm_hz > 0 else f"guest anim=full fps={args.guest_fps}"
    print(f"# {args.resolution}, TCG, {os.cpu_count()} CPUs, load {load[0]:.2f} {load[1]:.2f}, "
          f"{time.monotonic() - started:.0f} s; full-screen: {full}; "
          f"CPU in % of one core over the {args.fps_seconds:g} s fps window")
    print(table(results))
    for r in results:
        if r.hub_updates_per_s is not None:
            print(f"# {r.setup}, {r.workload}: the hub got {r.hub_updates_per_s:.1f} QEMU updates/s and queued "
                  f"{r.hub_frames_per_s:.1f} frames/s ({fmt(r.encode_ms_per_encode)} ms per encode); "
                  f"the player drew {fmt(r.player_fps)} frames/s; {r.painted_fps:.1f} distinct pictures/s painted")
    for r in results:
        if r.keys_sent and r.keys_seen_by_guest != r.keys_sent:
            print(f"WARNING: {r.setup}, {r.workload}: {r.keys_sent} key presses sent, "
                  f"the guest saw {r.keys_seen_by_guest}")
        if r.setup != "rfb-floor" and r.size != [width, height]:
            print(f"WARNING: {r.setup}: canvas {r.size}, expected {[width, height]}")
    for line in verdicts(results):
        print(line)
    if args.json:
        Path(args.json).write_text(json.dumps({"resolution": args.resolution, "load": load,
                                               "guest_fps": args.guest_fps, "storm_hz": args.storm_hz,
                                               "results": [r.to_json() for r in results]}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
