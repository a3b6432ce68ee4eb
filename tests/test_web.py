"""The web dashboard in a real browser (Playwright on Debian's chromium) against the real service.

The service (``create_app``) runs under uvicorn in a thread on 127.0.0.1, on a mounted simulated Coffee Lake
host, with a VM that boots the project's test guest under QEMU. The browser logs in with the token, watches
the GVT-g pool bars follow a vGPU created through the library (no reload: server-sent events), starts the VM
with its button, runs the doctor, opens the VM's page, reads the canvas the display stream draws into (it
animates; the guest's blue background), clicks and types into it (the pointer is scaled to the framebuffer;
the guest turns red, and so does the dashboard's thumbnail), stops the VM with its button, starts it again
(the stream comes back by itself) and kills it — both pages following without a reload.

Screenshots of the dashboard and of the VM's page are left in the test's tmp_path (dashboard.png, vm.png).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import pytest
from playwright.sync_api import Browser, BrowserContext, Locator, Page, expect, sync_playwright

from tests.conftest import GVT_PARENT, MountFn
from vgpuctl.base.state import StateDir
from vgpuctl.host import HostRoot
from vgpuctl.vm import lifecycle, profiles
from vgpuctl.vm import spec as specs
from vgpuctl.vm.linuxguest import LinuxGuest, kernel_cmdline, read_report
from vgpuctl.vm.runtime import RuntimePaths
from vgpuctl.vm.testguest import build_test_guest

pytestmark = pytest.mark.fuse

CHROMIUM = "/usr/bin/chromium"  # Debian's: apt-get install chromium (never a downloaded browser)
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
TOKEN = "test-token-0123456789abcdef"
VM = "web"
TIMEOUT_MS = 20_000
T = TypeVar("T")


@dataclass
class Service:
    url: str
    root: HostRoot
    state: StateDir


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    if not os.path.exists(CHROMIUM):
        pytest.fail(f"{CHROMIUM} is missing: apt-get install chromium (make test does)")
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


@pytest.fixture
def service(mount_host: MountFn, request: pytest.FixtureRequest) -> Iterator[Service]:
    """The service on a Coffee Lake host, or (``indirect`` parametrization) on the named preset."""
    import uvicorn

    from vgpuctl.service.app import create_app

    preset = getattr(request, "param", "coffeelake")
    root = mount_host(preset, aperture_mib=1024) if preset == "coffeelake" else mount_host(preset)
    state = StateDir(Path(tempfile.mkdtemp(prefix="vgs-")))  # short: QMP/VNC socket paths stay under 108 bytes
    spec = profiles.new_spec(VM, "streaming")
    spec.kernel, spec.boot, spec.memory_mib, spec.cpus = str(build_test_guest()), "kernel", 64, 1
    spec.display.backend = "vnc"
    specs.save(state, spec, new=True)

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(create_app(root, state, TOKEN), log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 15
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the service did not start"
        time.sleep(0.02)
    try:
        yield Service(f"http://127.0.0.1:{port}", root, state)
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()
        for name in specs.names(state):
            if off_loop(lifecycle.status, root, state, name).pid is not None:
                off_loop(lifecycle.kill, root, state, name)
        shutil.rmtree(state.path, ignore_errors=True)


@pytest.fixture
def context(service: Service, browser: Browser) -> Iterator[BrowserContext]:
    """A fresh browser profile at 1280x800, closed (with its streams) before the service stops."""
    context = browser.new_context(viewport={"width": 1280, "height": 800})
    context.set_default_timeout(TIMEOUT_MS)
    yield context
    context.close()


def log_in(page: Page, service: Service) -> None:
    page.goto(service.url + "/")
    page.wait_for_url("**/login**")
    page.get_by_label("Access token").fill(TOKEN)
    page.get_by_role("button", name="Log in").click()
    page.wait_for_url(f"{service.url}/")


def pool(page: Page, name: str) -> Locator:
    return page.locator(f'.pool[data-pool="{name}"]')


# Reads the whole canvas: its mean colour, a hash of every pixel, and how far apart its darkest and
# brightest pixels are (a blank canvas has one colour).
CANVAS_STATS = """() => {
  const c = document.getElementById('screen');
  const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
  let r = 0, g = 0, b = 0, hash = 0, lo = 765, hi = 0;
  for (let i = 0; i < d.length; i += 4) {
    r += d[i]; g += d[i + 1]; b += d[i + 2];
    hash = (Math.imul(hash, 31) + d[i] + (d[i + 1] << 8) + (d[i + 2] << 16)) | 0;
    const sum = d[i] + d[i + 1] + d[i + 2];
    if (sum < lo) lo = sum;
    if (sum > hi) hi = sum;
  }
  const n = d.length / 4;
  return {w: c.width, h: c.height, mean: [r / n, g / n, b / n], hash, spread: hi - lo,
          frames: Number(c.dataset.frames || 0)};
}"""


def off_loop(function: Callable[..., T], *args: Any) -> T:
    """Run a library call in a thread of its own: Playwright's sync API keeps an asyncio loop running in this
    one, and the QMP calls (asyncio.run) cannot nest in it."""
    with ThreadPoolExecutor(1) as pool_:
        return pool_.submit(function, *args).result()


# The mean colour of an <img>, drawn onto a canvas of its own.
IMAGE_MEAN = """img => {
  const c = document.createElement('canvas');
  c.width = img.naturalWidth; c.height = img.naturalHeight;
  const ctx = c.getContext('2d');
  ctx.drawImage(img, 0, 0);
  const d = ctx.getImageData(0, 0, c.width, c.height).data;
  let r = 0, g = 0, b = 0;
  for (let i = 0; i < d.length; i += 4) { r += d[i]; g += d[i + 1]; b += d[i + 2]; }
  return [r, g, b];
}"""


def dominant(stats: dict[str, Any]) -> str:
    red, green, blue = stats["mean"]
    return str(max((red, "red"), (green, "green"), (blue, "blue"))[1])


def wait_canvas(page: Page, condition: Callable[[dict[str, Any]], bool], what: str,
                timeout_s: float = 20.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    while True:
        stats: dict[str, Any] = page.evaluate(CANVAS_STATS)
        if condition(stats):
            return stats
        assert time.monotonic() < deadline, f"the canvas never showed {what}: {stats}"
        page.wait_for_timeout(100)


def test_login_is_required_and_a_wrong_token_is_refused(service: Service, context: BrowserContext) -> None:
    page = context.new_page()
    assert page.request.get(service.url + "/api/v1/gpus").status == 401
    page.goto(service.url + "/")
    page.wait_for_url("**/login**")
    page.get_by_label("Access token").fill("not-the-token")
    page.get_by_role("button", name="Log in").click()
    page.wait_for_url("**/login?error=1**")
    expect(page.get_by_role("alert")).to_be_visible()
    assert not [c for c in context.cookies() if c["name"] == "vgpuctl_session"]
    log_in(page, service)
    session = [c for c in context.cookies() if c["name"] == "vgpuctl_session"]
    assert session and session[0]["httpOnly"]
    assert page.request.get(service.url + "/api/v1/gpus").status == 200
    assert page.evaluate("document.cookie").find("vgpuctl_session") == -1  # HttpOnly: scripts cannot read it
    # The navigation is awaited from before the click: it may finish before a wait begun after it looks.
    with page.expect_navigation(url="**/login", wait_until="domcontentloaded", timeout=2 * TIMEOUT_MS):
        page.get_by_role("button", name="Log out").click()
    assert page.request.get(service.url + "/api/v1/gpus").status == 401


def test_dashboard_follows_the_host_and_drives_a_vm_and_its_display(service: Service, context: BrowserContext,
                                                                     tmp_path: Path) -> None:
    from vgpuctl.mdev.lifecycle import Manager

    errors: list[str] = []
    dashboard = context.new_page()
    dashboard.on("pageerror", lambda exc: errors.append(f"dashboard: {exc}"))
    log_in(dashboard, service)

    # The GPU and its GVT-g pools, as the host has them.
    expect(dashboard.locator(f'.gpu[data-parent="{GVT_PARENT}"] h3')).to_contain_text("Coffee Lake")
    ids = pool(dashboard, "vGPU ids")
    expect(ids.locator(".value")).to_have_text("0 / 7")
    expect(pool(dashboard, "low GM (aperture)").locator(".value")).to_have_text("0 / 896 MiB")
    expect(dashboard.locator('#types tr[data-type="i915-GVTg_V5_4"] td[data-available]')).to_have_text("5")
    expect(dashboard.locator(f'.vm[data-vm="{VM}"] .state')).to_have_text("stopped")

    # A vGPU made through the library shows up without a reload: bars, legend, types and the vGPU list.
    uuid = off_loop(Manager(service.root, service.state).create, GVT_PARENT, "i915-GVTg_V5_4")
    expect(ids.locator(".value")).to_have_text("1 / 7")
    expect(ids.get_by_role("meter")).to_have_attribute("aria-valuenow", "1")
    expect(pool(dashboard, "low GM (aperture)").locator(".value")).to_have_text("128 / 896 MiB")
    expect(pool(dashboard, "high GM").locator(f'.seg[data-vgpu="{uuid}"]')).to_have_count(1)
    expect(dashboard.locator(f'#vgpus tr[data-uuid="{uuid}"]')).to_contain_text("i915-GVTg_V5_4")
    expect(dashboard.locator('#types tr[data-type="i915-GVTg_V5_4"] td[data-available]')).to_have_text("4")

    # Start the VM with its button: it runs, gets a vGPU of its own, and its thumbnail fills in.
    dashboard.get_by_role("button", name=f"Start VM {VM}").click()
    card = dashboard.locator(f'.vm[data-vm="{VM}"]')
    expect(card.locator(".state")).to_have_text("running", timeout=40_000)
    expect(ids.locator(".value")).to_have_text("2 / 7")
    running = off_loop(lifecycle.status, service.root, service.state, VM)
    assert running.state == "running" and running.vgpu
    expect(dashboard.locator(f'#vgpus tr[data-uuid="{running.vgpu}"]')).to_contain_text(VM)
    thumb = card.locator(".thumb img")
    expect(thumb).to_be_visible()
    dashboard.wait_for_function("img => img.complete && img.naturalWidth > 0", arg=thumb.element_handle())

    # The doctor, on demand.
    dashboard.get_by_role("button", name="Run doctor").click()
    expect(dashboard.locator("#doctor .verdict")).to_contain_text("READY")
    more = dashboard.locator("#doctor details.more-checks > summary")
    expect(more).to_contain_text("ok")
    more.click()  # every check that passed, with what it read
    expect(dashboard.locator('#doctor li[data-check="aperture"]')).to_contain_text("aperture")
    more.click()

    # The VM's page: the stream animates on the canvas, in the guest's blue.
    vm_page = context.new_page()
    vm_page.on("pageerror", lambda exc: errors.append(f"vm page: {exc}"))
    with vm_page.expect_event("websocket") as opened:
        vm_page.goto(f"{service.url}/vm.html?name={VM}")
    socket_ = opened.value
    # Chromium has WebCodecs with H.264 on a secure context (http on localhost is one): the player asks for it.
    assert socket_.url.endswith(f"/api/v1/vms/{VM}/display?codec=h264")
    first = wait_canvas(vm_page, lambda s: s["frames"] > 0 and dominant(s) == "blue",
                        "the guest's blue screen")
    assert first["spread"] > 100, f"the canvas is blank: {first}"
    second = wait_canvas(vm_page, lambda s: s["hash"] != first["hash"], "a moving picture")
    assert dominant(second) == "blue"
    vm_page.screenshot(path=str(tmp_path / "vm.png"))

    # A click sends the pointer, scaled to the framebuffer; a key press goes to the guest, which turns red.
    sent: list[dict[str, Any]] = []
    socket_.on("framesent", lambda payload: sent.append(json.loads(payload)) if isinstance(payload, str) else None)
    screen = vm_page.locator("#screen")
    box = screen.bounding_box()
    assert box is not None
    screen.click(position={"x": box["width"] / 4, "y": box["height"] / 2})
    vm_page.keyboard.press("KeyA")
    wait_canvas(vm_page, lambda s: dominant(s) == "red", "the guest's red scheme after a key press")
    presses = [m for m in sent if m["type"] == "pointer" and m["buttons"] == 1]
    assert presses and abs(presses[0]["x"] - first["w"] / 4) <= 3 and abs(presses[0]["y"] - first["h"] / 2) <= 3
    assert {"type": "key", "code": "KeyA", "key": "a", "down": True} in sent
    assert {"type": "key", "code": "KeyA", "key": "a", "down": False} in sent
    expect(vm_page.locator("#stream-stats")).to_contain_text("H.264")

    # The same display as JPEG tiles (what browsers without WebCodecs get), chosen on the page: the same picture.
    jpeg_page = context.new_page()
    jpeg_page.on("pageerror", lambda exc: errors.append(f"jpeg vm page: {exc}"))
    jpeg_page.goto(f"{service.url}/vm.html?name={VM}")
    expect(jpeg_page.locator("#vm-codec")).to_have_value("auto")
    with jpeg_page.expect_event("websocket", predicate=lambda ws: ws.url.endswith("/display")) as opened:
        jpeg_page.locator("#vm-codec").select_option("jpeg")  # reloads with ?codec=jpeg
    assert opened.value.url.endswith(f"/api/v1/vms/{VM}/display") and "codec=jpeg" in jpeg_page.url
    expect(jpeg_page.locator("#vm-codec")).to_have_value("jpeg")
    jpeg_first = wait_canvas(jpeg_page, lambda s: s["frames"] > 0 and dominant(s) == "red", "the red screen as JPEG")
    wait_canvas(jpeg_page, lambda s: s["hash"] != jpeg_first["hash"], "a moving picture as JPEG")
    expect(jpeg_page.locator("#stream-stats")).to_contain_text("JPEG")
    jpeg_page.close()

    # The dashboard's thumbnail follows (a new screenshot every 2 s, while its page is the one in view).
    dashboard.bring_to_front()
    deadline = time.monotonic() + 30
    while (colour := dominant({"mean": dashboard.evaluate(IMAGE_MEAN, thumb.element_handle())})) != "red":
        assert time.monotonic() < deadline, f"the thumbnail stayed {colour}"
        dashboard.wait_for_timeout(200)
    dashboard.screenshot(path=str(tmp_path / "dashboard.png"), full_page=True)

    # Stop with the button; both pages follow without a reload.
    vm_page.get_by_role("button", name=f"Stop VM {VM}").click()
    expect(vm_page.locator("#vm-state")).to_have_text("stopped", timeout=40_000)
    expect(card.locator(".state")).to_have_text("stopped")
    expect(card.get_by_role("button", name=f"Stop VM {VM}")).to_be_disabled()
    assert off_loop(lifecycle.status, service.root, service.state, VM).state == "stopped"

    # Started again from its page, the display comes back by itself; then kill it.
    shown = vm_page.evaluate(CANVAS_STATS)["frames"]
    with vm_page.expect_event("websocket"):
        vm_page.get_by_role("button", name=f"Start VM {VM}").click()
    wait_canvas(vm_page, lambda s: s["frames"] > shown + 2 and dominant(s) == "blue", "the restarted guest")
    expect(card.locator(".state")).to_have_text("running")
    vm_page.get_by_role("button", name=f"Kill VM {VM}").click()
    expect(vm_page.locator("#vm-state")).to_have_text("stopped")
    expect(card.locator(".state")).to_have_text("stopped")
    assert not errors, errors


@pytest.mark.parametrize("service", ["adl-sriov"], indirect=True)
def test_the_sriov_panel_follows_vfs_enabled_through_the_api_and_the_vm_on_one(service: Service,
                                                                               context: BrowserContext,
                                                                               tmp_path: Path) -> None:
    """Issue 13: the SR-IOV panel lists the PF and its VFs (driver, holder), live: VFs enabled through the API
    appear, a VM started on one is shown as its holder, and a disable empties it — without a reload."""
    from vgpuctl.vm.spec import VgpuRequest

    pf, vf1 = "0000:00:02.0", "0000:00:02.1"
    errors: list[str] = []
    page = context.new_page()
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    log_in(page, service)
    panel = page.locator("#vfs")
    expect(panel).to_be_visible()
    card = panel.locator(f'article[data-pf="{pf}"]')
    expect(card).to_contain_text("VFs 0/7")
    expect(card).to_contain_text("No VFs enabled")
    expect(page.locator("#gpus-body")).to_contain_text("No mdev-capable GPU: this host's GPUs give SR-IOV VFs")

    # Enabled through the API with the page's own session: the panel follows through the event stream.
    enabled = page.request.post(f"{service.url}/api/v1/vfs/{pf}/enable", data={"count": 3})
    assert enabled.status == 200, enabled.text()
    expect(card).to_have_attribute("data-enabled", "3")
    rows = card.locator("tr[data-vf]")
    expect(rows).to_have_count(3)
    expect(card).to_contain_text("VFs 3/7")
    expect(card).to_contain_text("enabled by vgpuctl")
    for n in (1, 2, 3):
        expect(card.locator(f'tr[data-vf="0000:00:02.{n}"]')).to_contain_text("vfio-pci")
        expect(card.locator(f'tr[data-vf="0000:00:02.{n}"]')).to_contain_text("free")
    expect(page.locator("#vfs-count")).to_have_text("1 PF, 3 VFs")
    refused = page.request.post(f"{service.url}/api/v1/vfs/{pf}/enable", data={"count": 9})
    assert refused.status == 422 and refused.json()["data"]["total"] == 7

    # A VM on the PF takes the first free VF and is shown as its holder, with a link to its page.
    spec = specs.load(service.state, VM)
    spec.vgpu, spec.vgpu_display, spec.ramfb = VgpuRequest(vf=pf), False, False
    specs.save(service.state, spec)
    page.get_by_role("button", name=f"Start VM {VM}").click()
    expect(page.locator(f'.vm[data-vm="{VM}"] .state')).to_have_text("running", timeout=40_000)
    holder = card.locator(f'tr[data-vf="{vf1}"]')
    expect(holder).to_have_attribute("data-vm", VM)
    expect(holder.get_by_role("link", name=VM)).to_have_attribute("href", f"vm.html?name={VM}")
    panel.screenshot(path=str(tmp_path / "sriov.png"))
    busy = page.request.post(f"{service.url}/api/v1/vfs/{pf}/disable")
    assert busy.status == 409 and "by VM web" in busy.json()["message"]
    page.get_by_role("button", name=f"Stop VM {VM}").click()
    expect(page.locator(f'.vm[data-vm="{VM}"] .state')).to_have_text("stopped", timeout=40_000)
    expect(holder).to_contain_text("free")

    disabled = page.request.post(f"{service.url}/api/v1/vfs/{pf}/disable")
    assert disabled.status == 200, disabled.text()
    expect(rows).to_have_count(0)
    expect(card).to_contain_text("VFs 0/7")
    assert errors == []


def test_the_dashboard_names_each_unreadable_file_and_follows_its_repair(service: Service,
                                                                         context: BrowserContext) -> None:
    """Issue 11: a bad definition or VM spec is shown with its path and error (live), and hides nothing."""
    page = context.new_page()
    log_in(page, service)
    problems = page.locator("#problems")
    expect(problems).to_be_hidden(timeout=TIMEOUT_MS)
    bad = service.root.path(f"/etc/mdevctl.d/{GVT_PARENT}/44444444-0000-4000-8000-000000000001")
    bad.parent.mkdir(parents=True, exist_ok=True)
    bad.write_text("{not json")
    spec = service.state.path / "vms" / "broken.toml"
    spec.write_text("memory_mib = [")
    expect(problems).to_be_visible(timeout=TIMEOUT_MS)  # through the event stream, no reload
    expect(page.locator("#problems-count")).to_have_text("2", timeout=TIMEOUT_MS)
    expect(problems).to_contain_text(f"/etc/mdevctl.d/{GVT_PARENT}/44444444-0000-4000-8000-000000000001")
    expect(problems).to_contain_text("invalid json")
    expect(problems).to_contain_text(str(spec))
    expect(page.locator("#vms-body")).to_contain_text(VM, timeout=TIMEOUT_MS)  # the good VM is still there
    bad.unlink()
    spec.unlink()
    expect(problems).to_be_hidden(timeout=TIMEOUT_MS)


def test_the_vm_page_shows_the_linux_guests_console_and_takes_its_keyboard(
        service: Service, context: BrowserContext, linux_guest: LinuxGuest, tmp_path: Path) -> None:
    """Issue 14: a real OS on the dashboard: Debian's kernel's console streamed to the VM page, and keys typed
    there reaching the shell on it (the guest reports which tty its 'kb' command ran on)."""
    spec = profiles.new_spec("linux", "streaming")
    spec.kernel, spec.initrd, spec.append = str(linux_guest.kernel), str(linux_guest.initrd), kernel_cmdline()
    spec.boot, spec.memory_mib, spec.cpus, spec.display.backend = "kernel", 256, 1, "vnc"
    specs.save(service.state, spec, new=True)
    off_loop(lifecycle.start, service.root, service.state, "linux")
    serial_log = RuntimePaths.for_vm(service.state, "linux").serial_log
    deadline = time.monotonic() + 120
    while "ready" not in read_report(serial_log.read_text(errors="replace")):
        assert time.monotonic() < deadline, "the Linux guest did not come up"
        time.sleep(0.2)
    page = context.new_page()
    log_in(page, service)
    page.goto(f"{service.url}/vm.html?name=linux")
    # The console: mostly the black background, with lit text on it (a blank or a test pattern would not be).
    shown = wait_canvas(page, lambda s: s["frames"] > 0 and s["spread"] > 100, "the guest's console text", 60)
    assert max(shown["mean"]) < 128, shown  # dark: text on a black console, not the test guest's blue
    page.locator("#screen").click()
    page.keyboard.type("kb")
    page.keyboard.press("Enter")
    while "/dev/tty1" not in read_report(serial_log.read_text(errors="replace")).get("typed", []):
        assert time.monotonic() < deadline + 60, "the keys typed on the VM page did not reach the guest's shell"
        time.sleep(0.2)
    page.screenshot(path=str(tmp_path / "linux.png"))
