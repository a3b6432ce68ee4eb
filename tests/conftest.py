"""Shared fixtures and helpers: simulated hosts mounted over FUSE, the CLI in-process, golden files, the Linux
test guest, mdevctl in a mount namespace, the service under uvicorn, screendumps. Test modules import from here,
never from each other; markers follow from the fixtures a test uses (pytest_collection_modifyitems)."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import httpx2 as httpx
import numpy as np
import pytest
from click.testing import CliRunner
from qemu.qmp import QMPClient

from vgpuctl.base.state import StateDir
from vgpuctl.host import HostRoot
from vgpuctl.service.stream.codec import Frame
from vgpuctl.service.stream.viewer import Viewer
from vgpuctl.sim import mount as sim_mount
from vgpuctl.sim.presets import preset
from vgpuctl.vm import lifecycle, profiles
from vgpuctl.vm import spec as specs
from vgpuctl.vm.linuxguest import LinuxGuest, build_linux_guest
from vgpuctl.vm.runtime import RuntimePaths
from vgpuctl.vm.testguest import READY_LINE, build_test_guest, kernel_args

GVT_PARENT = "0000:00:02.0"
FUSE_OK = os.path.exists("/dev/fuse") and shutil.which("fusermount3") is not None and os.geteuid() == 0


MountFn = Callable[..., HostRoot]

# Markers follow from what a test uses, so that ``-m "not fuse"`` (or "not guest", "not browser") really
# selects the tests that can run without it: a test is marked by the fixtures it needs, however indirectly.
MARKER_BY_FIXTURE = {
    "mount_host": "fuse",
    "linux_guest": "guest",
    "browser": "browser",
}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        for fixture, marker in MARKER_BY_FIXTURE.items():
            if fixture in getattr(item, "fixturenames", ()):
                item.add_marker(marker)


@pytest.fixture
def mount_host(tmp_path: Path) -> Iterator[MountFn]:
    """Mount simulated hosts under tmp_path; all are unmounted at the end of the test."""
    if not FUSE_OK:
        pytest.fail("FUSE is required: run as root with /dev/fuse and fuse3 installed (make test does)")
    mounted: list[Path] = []

    def _mount(preset_name: str = "coffeelake", **overrides: object) -> HostRoot:
        directory = tmp_path / f"host{len(mounted)}"
        directory.mkdir()
        spec = preset(preset_name).with_overrides(**overrides)  # type: ignore[arg-type]
        sim_mount.mount(spec.to_json(), directory, preset_name)
        mounted.append(directory)
        return HostRoot(directory)

    yield _mount
    for directory in mounted:
        if sim_mount.is_sim_mount(directory):
            sim_mount.umount(directory, lazy=True)


def write_errno(path: Path, data: str | bytes) -> int:
    """errno of open() and one write() to path (0 on success), the way a program sees it."""
    try:
        fd = os.open(path, os.O_WRONLY)
    except OSError as e:
        return e.errno or -1
    try:
        os.write(fd, data.encode() if isinstance(data, str) else data)
    except OSError as e:
        return e.errno or -1
    finally:
        os.close(fd)
    return 0


class Cli:
    """vgpuctl in-process (click's runner) against one host root and one state dir."""

    def __init__(self, root: HostRoot, state: Path) -> None:
        self.root, self.state = root, state
        self.runner = CliRunner()

    def __call__(self, *args: str, ok: bool = True) -> tuple[int, str, str]:
        from vgpuctl.cli.app import cli

        result = self.runner.invoke(cli, ["--root", str(self.root.root), "--state-dir", str(self.state), *args])
        if ok:
            assert result.exit_code == 0, (args, result.stdout, result.stderr, result.exception)
        return result.exit_code, result.stdout, result.stderr

    def json(self, *args: str) -> object:
        return json.loads(self(*args, "--json")[1])


@pytest.fixture
def gvt(mount_host: MountFn, tmp_path: Path) -> Cli:
    """vgpuctl on a mounted Coffee Lake host with a 1 GiB aperture, with a state dir of its own."""
    return Cli(mount_host("coffeelake", aperture_mib=1024), tmp_path / "state")


# ------------------------------------------------------------------ golden files
# Every rendered output (argv, XML, reports, listings, plans) is pinned by a file under tests/golden/,
# compared byte for byte. VGPUCTL_REGEN_GOLDEN=1 rewrites them from the current code instead: review the
# diff (git diff tests/golden) before committing it, as mdevctl's tests do with their fixtures.
GOLDEN_DIR = Path(__file__).parent / "golden"
REGEN_GOLDEN = os.environ.get("VGPUCTL_REGEN_GOLDEN") == "1"

GoldenFn = Callable[[str, str], None]


@pytest.fixture
def golden() -> GoldenFn:
    def check(name: str, text: str) -> None:
        path = GOLDEN_DIR / name
        if REGEN_GOLDEN:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
            return
        assert path.exists(), f"no golden file {path}: make one with VGPUCTL_REGEN_GOLDEN=1 and review it"
        assert text == path.read_text(), f"output differs from {path} (VGPUCTL_REGEN_GOLDEN=1 rewrites it)"

    return check


@pytest.fixture(scope="session")
def linux_guest() -> LinuxGuest:
    """Debian's kernel with vgpuctl's busybox initramfs (vgpuctl.vm.linuxguest), built once and cached.

    Fails, never skips, when the kernel package cannot be had: the devices' tests must run.
    """
    return build_linux_guest()


# ------------------------------------------------------------------ Debian's mdevctl in a mount namespace
MDEVCTL_VERSION = "mdevctl 1.2.0"


SETUP_FAILED = 125  # exit status of the helper's own bind mounts, distinct from mdevctl's 0/1/2


class Result(NamedTuple):
    rc: int
    out: str
    err: str


@functools.cache
def why_mdevctl_cannot_run() -> str | None:
    """What keeps these tests from running Debian's mdevctl 1.2.0 here, or None."""
    for tool in ("unshare", "mdevctl"):
        if shutil.which(tool) is None:
            return f"{tool} not found: run 'make test', which installs Debian's mdevctl and util-linux (unshare)"
    version = subprocess.run(["mdevctl", "--version"], capture_output=True, text=True).stdout.strip()
    if version != MDEVCTL_VERSION:
        return f"these tests pin the output formats of {MDEVCTL_VERSION} (Debian 12's package), found {version!r}"
    return None


def in_namespace(host: HostRoot, script: str) -> Result:
    """Run a shell script of mdevctl commands with host's /sys and /etc/mdevctl.d bound in place."""
    root = shlex.quote(str(host.root))
    setup = f"mount --bind {root}/sys /sys && mount --bind {root}/etc/mdevctl.d /etc/mdevctl.d || exit {SETUP_FAILED}\n"
    done = subprocess.run(["unshare", "-m", "sh", "-c", setup + script], capture_output=True, text=True, timeout=30)
    assert done.returncode != SETUP_FAILED, f"bind mounts in the namespace failed: {done.stderr}"
    return Result(done.returncode, done.stdout, done.stderr)


def mdevctl(host: HostRoot, *args: str) -> Result:
    """One mdevctl command in a fresh namespace (state lives in the simulator, so that is fine)."""
    return in_namespace(host, shlex.join(["mdevctl", *args]))


def mdevctl_ok(result: Result) -> str:
    """stdout of a command that must succeed."""
    assert result.rc == 0 and result.err == "", result
    return result.out


def new_uuid(out: str) -> str:
    """The UUID printed by define/start without -u: hyphenated lowercase v4, on a line of its own."""
    text = out.removesuffix("\n")
    parsed = uuid.UUID(text)
    assert out == f"{parsed}\n" and parsed.version == 4, out
    return text


def placement(host: HostRoot, uid: str) -> tuple[str, str]:
    """(parent, type) of an active mdev, resolved the way mdevctl does: via its sysfs links."""
    device = host.path(host.mdev_device_dir(uid)).resolve()
    type_dir = (device / "mdev_type").resolve()
    assert type_dir.parent.name == "mdev_supported_types" and type_dir.parent.parent == device.parent
    return device.parent.name, type_dir.name


def available(host: HostRoot, parent: str, type_id: str) -> int:
    return int(host.read_value(f"{host.mdev_type_dir(parent, type_id)}/available_instances"))


def config_bytes(mdev_type: str, start: str = "manual") -> bytes:
    """A config file exactly as mdevctl writes it (serde_json pretty, no trailing newline)."""
    return f'{{\n  "mdev_type": "{mdev_type}",\n  "start": "{start}",\n  "attrs": []\n}}'.encode()


# ------------------------------------------------------------------ libvirt XML
def validate_xml(text: str, tmp_path: Path, name: str) -> None:
    tool = shutil.which("virt-xml-validate")
    if tool is None or shutil.which("xmllint") is None:
        pytest.fail("virt-xml-validate and xmllint are required (Debian: libvirt-clients libxml2-utils)")
    path = tmp_path / f"{name}.xml"
    path.write_text(text)
    result = subprocess.run([tool, str(path), "domain"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, (result.stdout, result.stderr, text)
    assert "validates" in result.stdout + result.stderr


# ------------------------------------------------------------------ screendumps
@dataclass(frozen=True)
class Image:
    width: int
    height: int
    rgb: bytes

    def pixel(self, x: int, y: int) -> tuple[int, int, int]:
        i = 3 * (y * self.width + x)
        return self.rgb[i], self.rgb[i + 1], self.rgb[i + 2]

    def mean(self) -> tuple[float, float, float]:
        n = self.width * self.height
        return sum(self.rgb[0::3]) / n, sum(self.rgb[1::3]) / n, sum(self.rgb[2::3]) / n

    def columns_of(self, colour: tuple[int, int, int], y: int) -> list[int]:
        return [x for x in range(self.width) if self.pixel(x, y) == colour]

    def row(self, y: int) -> bytes:
        return self.rgb[3 * y * self.width : 3 * (y + 1) * self.width]


def read_ppm(path: Path) -> Image:
    """A binary (P6, maxval 255) PPM, as QMP screendump writes it."""
    data = path.read_bytes()
    fields: list[bytes] = []
    pos = 0
    while len(fields) < 4:
        while data[pos : pos + 1].isspace():
            pos += 1
        if data[pos : pos + 1] == b"#":
            pos = data.index(b"\n", pos) + 1
            continue
        start = pos
        while not data[pos : pos + 1].isspace():
            pos += 1
        fields.append(data[start:pos])
    pos += 1  # the single whitespace byte before the raster
    magic, width, height, maxval = fields[0], int(fields[1]), int(fields[2]), int(fields[3])
    assert magic == b"P6" and maxval == 255, (magic, maxval)
    rgb = data[pos : pos + 3 * width * height]
    assert len(rgb) == 3 * width * height
    return Image(width, height, rgb)


# ------------------------------------------------------------------ the service: its token, a real uvicorn
TOKEN = "test-token-" + "x" * 32


AUTH = {"Authorization": f"Bearer {TOKEN}"}


API = "/api/v1"


BASE = "http://127.0.0.1:8470"  # the service answers only to Host headers that name it (not TestClient's 'testserver')


def error_of(response: httpx.Response) -> tuple[int, str, str]:
    body = response.json()
    assert set(body) >= {"error", "message"}, body
    return response.status_code, body["error"], body["message"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@contextlib.contextmanager
def serving(app: Any, **options: Any) -> Iterator[str]:
    import uvicorn

    port = free_port()
    settings = {"log_level": "warning", "access_log": False, "timeout_graceful_shutdown": 1, **options}
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, **settings))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "uvicorn did not start"
        time.sleep(0.01)
    try:
        yield f"{'https' if 'ssl_certfile' in options else 'http'}://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(10)


# ------------------------------------------------------------------ the test guest on QEMU, laid out as a VM
QEMU = "qemu-system-x86_64"


BOOT_TIMEOUT = 15.0


def to_rgb(fb: np.ndarray) -> np.ndarray:
    """RGB (h, w, 3) from a BGRX framebuffer."""
    return np.ascontiguousarray(fb[..., 2::-1])


def dominant_rgb(rgb: np.ndarray) -> str:
    means = rgb.reshape(-1, 3).mean(axis=0)
    return "rgb"[int(np.argmax(means))]


def close_enough(a: np.ndarray, b: np.ndarray, tolerance: int = 24) -> float:
    """The share of pixels whose channels all differ by at most ``tolerance`` (JPEG is lossy)."""
    diff = np.abs(a.astype(np.int16) - b.astype(np.int16)).max(axis=2)
    return float((diff <= tolerance).mean())


@dataclass
class Vm:
    """QEMU with the test guest, laid out like a vgpuctl VM in ``state``."""

    name: str
    state: StateDir
    paths: RuntimePaths
    proc: subprocess.Popen[bytes]
    debug_log: Path

    def log(self) -> str:
        return self.debug_log.read_text(errors="replace")

    def wait_log(self, text: str, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while text not in self.log():
            assert time.monotonic() < deadline, f"{text!r} not in the guest's log: {self.log()!r}"
            time.sleep(0.05)

    async def screendump(self) -> np.ndarray:
        qmp = QMPClient("test-stream")
        await qmp.connect(str(self.paths.qmp_socket))
        try:
            target = self.paths.directory / f"dump-{time.monotonic_ns()}.ppm"
            await qmp.execute("screendump", {"filename": str(target)})
        finally:
            await qmp.disconnect()
        image = read_ppm(target)
        return np.frombuffer(image.rgb, np.uint8).reshape(image.height, image.width, 3)

    async def qmp(self, command: str) -> None:
        qmp = QMPClient("test-stream")
        await qmp.connect(str(self.paths.qmp_socket))
        try:
            await qmp.execute(command)
        finally:
            await qmp.disconnect()


@contextlib.contextmanager
def running_vm(elf: Path, resolution: tuple[int, int] | None = None, name: str = "tv",
               paused: bool = False) -> Iterator[Vm]:
    """QEMU running the guest, once its picture is up (``paused``: QEMU started with -S, guest not yet run)."""
    with tempfile.TemporaryDirectory(prefix="vgst-") as tmp:  # short: unix socket paths have ~108 bytes
        state = StateDir(Path(tmp))
        paths = RuntimePaths.for_vm(state, name)
        paths.directory.mkdir(parents=True)
        debug_log = paths.directory / "debug.log"
        # -name and -pidfile as the lifecycle gives them: how vgpuctl knows a QEMU is this VM's.
        argv = [QEMU, "-name", f"guest={name},debug-threads=on", "-machine", "pc", "-accel", "tcg", "-m", "64",
                "-nodefaults", "-vga", "std",
                "-display", "none", "-vnc", f"unix:{paths.vnc_socket}", *kernel_args(elf, resolution),
                "-qmp", f"unix:{paths.qmp_socket},server=on,wait=off", "-pidfile", str(paths.pidfile),
                "-chardev", f"file,id=dbg,path={debug_log}", "-device", "isa-debugcon,iobase=0xe9,chardev=dbg",
                *(["-S"] if paused else [])]
        with (paths.directory / "qemu.log").open("wb") as out:
            proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=out)
        vm = Vm(name, state, paths, proc, debug_log)
        try:
            deadline = time.monotonic() + BOOT_TIMEOUT
            while not ((paused or (debug_log.exists() and READY_LINE in vm.log())) and paths.vnc_socket.exists()
                       and paths.qmp_socket.exists() and paths.pidfile.exists()):
                assert proc.poll() is None, (paths.directory / "qemu.log").read_text()
                assert time.monotonic() < deadline, "the test guest did not come up"
                time.sleep(0.02)
            yield vm
        finally:
            proc.kill()
            proc.wait()


async def frame_within(viewer: Viewer, timeout: float = 5.0) -> Frame:
    return await asyncio.wait_for(viewer.next_frame(), timeout)


# ------------------------------------------------------------------ VMs through vgpuctl's lifecycle
@pytest.fixture(scope="module")
def guest() -> Path:
    return build_test_guest()


@pytest.fixture
def state() -> Iterator[StateDir]:
    # Short: QMP/VNC socket paths must stay under 108 bytes.
    import shutil
    import tempfile

    state = StateDir(Path(tempfile.mkdtemp(prefix="vgs-")))
    yield state
    for pid in processes_naming(state.path):  # a failed test must not leave its QEMUs running
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    shutil.rmtree(state.path, ignore_errors=True)


def processes_naming(directory: Path) -> list[int]:
    """The live processes whose command line names ``directory`` (this test's QEMUs and their shells, found
    without vgpuctl's help and whatever its files say)."""
    found = []
    needle = os.fsencode(directory)
    for entry in os.listdir("/proc"):
        if entry.isdigit() and int(entry) != os.getpid():
            with contextlib.suppress(OSError):
                if needle in Path(f"/proc/{entry}/cmdline").read_bytes():
                    found.append(int(entry))
    return found


@pytest.fixture
def host(mount_host: MountFn) -> HostRoot:
    return mount_host("coffeelake", aperture_mib=1024)


def new_vm(state: StateDir, name: str, guest: Path, profile: str = "automotive") -> None:
    spec = profiles.new_spec(name, profile)
    spec.kernel, spec.boot, spec.memory_mib, spec.cpus = str(guest), "kernel", 64, 1
    spec.display.backend = "vnc"
    specs.save(state, spec, new=True)


def screen(state: StateDir, name: str, tmp_path: Path) -> Image:
    target = tmp_path / f"{name}-{time.monotonic_ns()}.ppm"
    lifecycle.qmp(RuntimePaths.for_vm(state, name), "screendump", {"filename": str(target)})
    return read_ppm(target)


def dominant(image: Image) -> str:
    red, green, blue = image.mean()
    return max((red, "red"), (green, "green"), (blue, "blue"))[1]


def wait_for(condition: object, timeout: float = 10.0) -> None:
    assert callable(condition)
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)
