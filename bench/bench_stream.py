"""Benchmark the display stream in a real browser: painted fps and input-to-picture latency.

Run with ``.venv/bin/python bench/bench_stream.py [--resolution 1920x1080] [--deflate] [--codec h264]``. Needs
``qemu-system-x86_64``, gcc (the test guest) and Debian's ``chromium``. It

1. boots the test guest under TCG (``-vga std -vnc unix:...``, laid out as a vgpuctl VM in a temporary state
   directory) at the resolution asked for; the guest animates a bar at 100 Hz;
2. serves the display route (``vgpuctl.service.stream``, no auth) on 127.0.0.1 with uvicorn, plus a page that
   plays the stream with the dashboard's own player (``service/web/display.js``);
3. opens that page in headless Chromium (software rendering, as on a machine without a GPU). The page counts,
   for 5 s, the animation frames in which a new stream frame had been drawn ("painted fps"), then 10 times
   sends a key press ({"type":"key","code":"KeyA"}) — the guest switches its colour scheme and repaints the
   whole screen — and times until the canvas' middle row shows the new scheme (checked every animation frame),
   recording also the player's lag (capture to display) at that moment.

``--deflate`` turns on uvicorn's permessage-deflate (the default of uvicorn; JPEG does not compress, so it
only costs CPU). Prints one JSON line. Numbers depend heavily on what else runs on the machine: the guest's
TCG vCPU, QEMU, this server and Chromium share its cores.
"""

from __future__ import annotations

import argparse
import json
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request  # at module level: FastAPI resolves the endpoints' annotations here
from fastapi.responses import HTMLResponse, Response

PAGE = """<!doctype html><html><body style="margin:0">
<canvas id="c" tabindex="0"></canvas>
<script type="module">
import { DisplayPlayer } from "./display.js";
const c = document.getElementById("c");
const url = new URL("/api/v1/vms/VM/display", location.href); url.protocol = "ws:";
const p = new DisplayPlayer(c, url.href, { codec: "CODEC" });
p.start();
const sleep = (ms) => new Promise((r) => setTimeout(r, ms));
const raf = () => new Promise((r) => requestAnimationFrame(r));
function scheme() {
  const d = c.getContext("2d").getImageData(0, Math.floor(c.height / 2), c.width, 1).data;
  let r = 0, g = 0, b = 0;
  for (let i = 0; i < d.length; i += 64) { r += d[i]; g += d[i + 1]; b += d[i + 2]; }
  return r > g && r > b ? "r" : g > b ? "g" : "b";
}
(async () => {
  while (!(Number(c.dataset.frames) > 0)) await sleep(50);
  await sleep(2000);
  const f0 = Number(c.dataset.frames), t0 = performance.now();
  let painted = 0, last = f0;
  while (performance.now() - t0 < 5000) {
    await raf();
    const f = Number(c.dataset.frames);
    if (f !== last) { painted++; last = f; }
  }
  const secs = (performance.now() - t0) / 1000;
  const result = { frames_per_s: (Number(c.dataset.frames) - f0) / secs, painted_fps: painted / secs,
                   latency_ms: [], lag_ms: [], size: [c.width, c.height] };
  for (let i = 0; i < 10; i++) {
    await sleep(400);
    const before = scheme(), t = performance.now();
    p.send({ type: "key", code: "KeyA", key: "a", down: true });
    while (scheme() === before && performance.now() - t < 3000) await raf();
    result.latency_ms.push(Math.round(performance.now() - t));
    result.lag_ms.push(Math.round(p.lagUs / 1000));
    p.send({ type: "key", code: "KeyA", key: "a", down: false });
  }
  await fetch("/result", { method: "POST", body: JSON.stringify(result) });
})();
</script></body></html>
"""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--resolution", default="1920x1080")
    parser.add_argument("--deflate", action="store_true", help="permessage-deflate on (uvicorn's default)")
    parser.add_argument("--codec", choices=("jpeg", "h264"), default="jpeg", help="the stream's codec")
    args = parser.parse_args()
    width, height = (int(v) for v in args.resolution.split("x"))
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        print("chromium not found (apt-get install chromium)", file=sys.stderr)
        return 2

    import uvicorn

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from tests.test_stream import running_vm

    from vgpuctl.service.stream import make_router
    from vgpuctl.vm.testguest import build_test_guest

    web = Path(__file__).resolve().parent.parent / "src" / "vgpuctl" / "service" / "web"
    result: dict[str, Any] = {}
    done = threading.Event()
    with running_vm(build_test_guest(), (width, height)) as vm, tempfile.TemporaryDirectory() as profile:
        app = FastAPI()
        app.state.state = vm.state
        app.include_router(make_router(None))

        @app.get("/bench.html")
        def page() -> HTMLResponse:
            return HTMLResponse(PAGE.replace("/VM/", f"/{vm.name}/").replace("CODEC", args.codec))

        @app.get("/display.js")
        def player() -> Response:
            return Response((web / "display.js").read_bytes(), media_type="text/javascript")

        @app.post("/result")
        async def post(request: Request) -> dict[str, str]:
            result.update(json.loads(await request.body()))
            done.set()
            return {}

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning",
                                               ws_per_message_deflate=args.deflate))
        thread = threading.Thread(target=server.run, daemon=True)
        thread.start()
        while not server.started:
            time.sleep(0.05)
        browser = subprocess.Popen([chromium, "--headless=new", "--no-sandbox", "--disable-gpu",
                                    f"--window-size={width},{height}", f"--user-data-dir={profile}",
                                    f"http://127.0.0.1:{port}/bench.html"],
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            finished = done.wait(120)
        finally:
            browser.kill()
            browser.wait()
            server.should_exit = True
            thread.join(10)
    if not finished:
        print("no result from the browser within 120 s", file=sys.stderr)
        return 1
    latencies = sorted(result["latency_ms"])
    result["latency_median_ms"] = latencies[len(latencies) // 2]
    result["resolution"] = args.resolution
    result["codec"] = args.codec
    result["deflate"] = args.deflate
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
