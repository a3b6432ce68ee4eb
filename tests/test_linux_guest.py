"""Every device of a VM, proven by a real Linux guest (Debian's kernel, busybox) on QEMU under TCG.

One VM for the module, made and run with vgpuctl's CLI (spec -> argv -> QEMU): a qcow2 disk vgpuctl creates, a
raw disk, a CD-ROM, user networking, VNC display (so the USB tablet), the guest agent's channel, no vGPU. The guest
reports what it finds on its serial port (vgpuctl.vm.linuxguest); the tests read those reports, and act on the
guest through vgpuctl (QMP keys and pointer events, the serial and agent sockets, screenshot, stop).
"""

from __future__ import annotations

import contextlib
import http.server
import json
import os
import secrets
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import xml.etree.ElementTree as ET
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pytest

from tests.conftest import Cli, validate_xml
from vgpuctl.base.state import StateDir
from vgpuctl.host import HostRoot
from vgpuctl.vm import lifecycle
from vgpuctl.vm import spec as specs
from vgpuctl.vm.argv import build_argv
from vgpuctl.vm.libvirt import domain_xml
from vgpuctl.vm.linuxguest import LinuxGuest, build_iso, kernel_cmdline, read_report
from vgpuctl.vm.profiles import new_spec
from vgpuctl.vm.runtime import RuntimePaths, is_running, read_pid

NAME = "lg"
BOOT_TIMEOUT_S = 120.0  # Debian's kernel under TCG on 2 shared cores: ~10 s alone, more under load
RAW_MARKER = b"VGPUCTL-RAW-DISK-B"
QCOW2_SIZE = 64 * 1024 * 1024


@dataclass
class GuestVm:
    """The module's VM and what the test gave it."""

    cli: Cli
    state: StateDir
    paths: RuntimePaths
    qcow2: Path
    cdrom_token: str
    http_token: str
    http_requests: list[str]

    def report(self) -> dict[str, list[str]]:
        try:
            return read_report(self.paths.serial_log.read_text(errors="replace"))
        except FileNotFoundError:
            return {}

    def wait_report(self, condition: Callable[[dict[str, list[str]]], bool],
                    timeout: float = BOOT_TIMEOUT_S) -> dict[str, list[str]]:
        deadline = time.monotonic() + timeout
        while not condition(found := self.report()):
            assert time.monotonic() < deadline, (f"the guest did not report it in {timeout:.0f} s: {found}\n"
                                                 + self.paths.serial_log.read_text(errors="replace")[-3000:])
            time.sleep(0.1)
        return found

    def wait_ready(self) -> dict[str, list[str]]:
        return self.wait_report(lambda found: "ready" in found)


class _Page(http.server.BaseHTTPRequestHandler):
    token: ClassVar[str] = ""
    requests: ClassVar[list[str]] = []

    def do_GET(self) -> None:
        self.requests.append(f"{self.client_address[0]} {self.path}")
        body = self.token.encode() if self.path == "/token" else b""
        self.send_response(200 if body else 404)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture(scope="module")
def vm(linux_guest: LinuxGuest) -> Iterator[GuestVm]:
    state = StateDir(Path(tempfile.mkdtemp(prefix="vgl-")))  # short: socket paths stay under 108 bytes
    class Page(_Page):  # this module's page and the requests for it
        pass

    Page.token, Page.requests = secrets.token_hex(8), []
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Page)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    cdrom_token = secrets.token_hex(8)
    iso = build_iso(state.path / "data.iso", {"token.txt": cdrom_token.encode() + b"\n"})
    raw = state.path / "b.raw"
    raw.write_bytes(RAW_MARKER.ljust(1024 * 1024, b"\0"))
    qcow2 = state.path / "a.qcow2"
    # 10.0.2.2 is QEMU's user-mode network's address for the host's loopback.
    append = kernel_cmdline(fs="vda", url=f"http://10.0.2.2:{server.server_port}/token")
    cli = Cli(HostRoot(Path("/")), state.path)
    cli("vm", "create", NAME, "--no-vgpu", "--memory", "256", "--cpus", "1", "--kernel", str(linux_guest.kernel),
        "--initrd", str(linux_guest.initrd), "--append", append, "--disk", f"{qcow2}:64M",
        "--disk", f"{raw}::raw", "--cdrom", str(iso), "--network", "user", "--display", "vnc", "--guest-agent")
    guest = GuestVm(cli, state, RuntimePaths.for_vm(state, NAME), qcow2, cdrom_token, Page.token,
                    Page.requests)
    cli("vm", "start", NAME, "--accel", "tcg")
    yield guest
    pid = read_pid(guest.paths)
    if pid and is_running(state, NAME):  # its own QEMU, nothing else
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    server.shutdown()
    shutil.rmtree(state.path, ignore_errors=True)


def test_debians_kernel_boots_with_every_module_the_devices_need(vm: GuestVm, linux_guest: LinuxGuest) -> None:
    found = vm.wait_ready()
    assert found["kernel"] == [linux_guest.kernel_version]
    assert found["modules.failed"] == [""], found
    assert int(found["modules.loaded"][0]) > 10  # the modules and what they depend on, not built in


def test_the_disks_come_in_the_specs_order_and_the_qcow2_is_vgpuctls(vm: GuestVm) -> None:
    found = vm.wait_report(lambda found: "disk.vda.boots" in found)
    assert vm.qcow2.read_bytes()[:4] == b"QFI\xfb"  # vgpuctl made it at start (qemu-img create), as qcow2
    assert found["disks"] == ["vda,vdb"]
    assert found["disk.vda.sectors"] == [str(QCOW2_SIZE // 512)]
    assert found["disk.vdb.sectors"] == ["2048"] and found["disk.vdb.head"] == [RAW_MARKER.decode()]
    assert found["disk.vda.formatted"] == ["ext2"] and found["disk.vda.boots"] == ["1"]


def test_the_guest_mounts_the_cdrom(vm: GuestVm) -> None:
    found = vm.wait_report(lambda found: "cdrom.token" in found or "cdrom" in found)
    assert found["cdrom.token"] == [vm.cdrom_token], found


def test_user_networking_gives_a_lease_the_specs_mac_and_a_page_from_the_host(vm: GuestVm) -> None:
    found = vm.wait_report(lambda found: "http.body" in found)
    mac = specs.load(vm.state, NAME).network.mac
    assert mac and found["net.mac"] == [mac]
    assert found["net.lease"] == ["10.0.2.15"] and found["net.router"] == ["10.0.2.2"]
    assert found["http.body"] == [vm.http_token]
    assert vm.http_requests == ["127.0.0.1 /token"]  # through QEMU's user network, from the host's loopback


def test_the_keyboard_and_the_usb_tablet_reach_the_guest(vm: GuestVm) -> None:
    devices = vm.wait_ready()["input.devices"][0].split(";")
    assert {"AT Translated Set 2 keyboard", "QEMU QEMU USB Tablet", "Power Button"} <= set(devices), devices
    lifecycle.qmp(vm.paths, "input-send-event", {"events": [{"type": "abs", "data": {"axis": "x", "value": 9000}}]})
    vm.wait_report(lambda found: "QEMU QEMU USB Tablet" in found.get("input.event", []), timeout=20)
    typed = len(vm.report().get("typed", []))
    type_line(vm, "kb")  # the guest's command that reports where it ran
    found = vm.wait_report(lambda found: len(found.get("typed", [])) > typed
                           and "AT Translated Set 2 keyboard" in found.get("input.event", []), timeout=20)
    assert found["typed"][-1] == "/dev/tty1"  # the keys reached the shell on the VGA console


def test_the_serial_console_reaches_the_guests_shell(vm: GuestVm) -> None:
    vm.wait_ready()
    typed = vm.report().get("typed", []).count("/dev/ttyS0")
    listed = vm.cli("vm", "console", NAME)[1]
    assert f"serial     unix:{vm.paths.serial_socket}\n" in listed
    attached = subprocess.Popen([sys.executable, "-m", "vgpuctl", "--root", str(vm.cli.root.root), "--state-dir",
                                 str(vm.cli.state), "vm", "console", NAME, "--attach"],
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert attached.stdin is not None
    try:
        attached.stdin.write(b"kb\n")  # to the shell on the guest's ttyS0, through vgpuctl
        attached.stdin.flush()
        vm.wait_report(lambda found: found.get("typed", []).count("/dev/ttyS0") > typed, timeout=30)
        attached.stdin.write(b"\x1d")  # Ctrl-] leaves
        attached.stdin.flush()
        out, err = attached.communicate(timeout=30)
    finally:
        attached.kill()
    assert attached.returncode == 0, err
    assert b"kb" in out  # the guest's shell echoed what was typed, back through vgpuctl


def test_the_guest_agent_answers_on_its_virtio_serial_channel(vm: GuestVm, linux_guest: LinuxGuest) -> None:
    found = vm.wait_ready()
    assert found["agent"][0].startswith("/dev/vport"), found["agent"]
    with socket.socket(socket.AF_UNIX) as channel:  # as libvirt and qemu-ga's clients talk to it
        channel.settimeout(30)
        channel.connect(str(vm.paths.agent_socket))
        answers = channel.makefile("rb")

        def ask(command: str, **arguments: object) -> Any:
            message = {"execute": command, **({"arguments": arguments} if arguments else {})}
            channel.sendall(json.dumps(message).encode() + b"\n")
            return json.loads(answers.readline())

        assert ask("guest-sync", id=424242) == {"return": 424242}
        assert ask("guest-ping") == {"return": {}}
        names = {c["name"] for c in ask("guest-info")["return"]["supported_commands"]}
        assert {"guest-ping", "guest-get-osinfo", "guest-network-get-interfaces"} <= names
        osinfo = ask("guest-get-osinfo")["return"]
        assert osinfo["kernel-release"] == linux_guest.kernel_version and osinfo["machine"] == "x86_64"
        interfaces = {i["name"]: i for i in ask("guest-network-get-interfaces")["return"]}
        assert interfaces["eth0"]["hardware-address"] == specs.load(vm.state, NAME).network.mac
        assert {"ip-address-type": "ipv4", "ip-address": "10.0.2.15", "prefix": 24} in \
            interfaces["eth0"]["ip-addresses"]
        assert ask("guest-fsfreeze-freeze")["error"]["class"] == "CommandNotFound"


def test_a_screenshot_shows_the_guests_console_text(vm: GuestVm, tmp_path: Path) -> None:
    vm.wait_ready()
    typed = len(vm.report().get("typed", []))
    type_line(vm, "kb")  # draws two rows of full blocks on the console after its report
    vm.wait_report(lambda found: len(found.get("typed", [])) > typed, timeout=20)
    # The screen may lag the serial port by a frame: wait until the bar is there.
    deadline = time.monotonic() + 10
    while True:
        _, out, _ = vm.cli("vm", "screenshot", NAME, str(tmp_path / "screen.png"))
        pixels = read_png(Path(out.strip()))
        lit = pixels.max(axis=2) > 96
        rows = lit.mean(axis=1)
        if longest_run(rows > 0.95) >= 28 or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert pixels.shape == (400, 720, 3)  # VGA text mode, 80x25 characters of 9x16 pixels
    assert longest_run(rows > 0.95) >= 28, "no bar of full blocks: the typed command's output is not on screen"
    text = lit[rows < 0.95]  # the rest: boot messages, reports, the prompt; a blank frame has no lit pixel
    assert 0.005 < text.mean() < 0.5, text.mean()


def test_vm_status_says_what_runs_inside_through_the_guest_agent(vm: GuestVm) -> None:
    vm.wait_report(lambda found: "ready" in found and "net.lease" in found)
    status = json.loads(vm.cli("vm", "status", NAME, "--json")[1])
    assert status["guest"] == {"agent": True, "os": "vgpuctl Linux test guest (busybox)",
                               "kernel": status["guest"]["kernel"], "ip_addresses": ["10.0.2.15"]}
    assert status["guest"]["kernel"].startswith("6.1.0-") and status["uptime_s"] > 0
    text = vm.cli("vm", "status", NAME)[1]
    assert "  guest      vgpuctl Linux test guest (busybox)" in text and "  addresses  10.0.2.15\n" in text


def test_vm_stop_shuts_the_guest_down_cleanly_and_its_file_is_there_at_the_next_boot(vm: GuestVm) -> None:
    vm.wait_report(lambda found: "ready" in found and "disk.vda.boots" in found)
    _, out, _ = vm.cli("vm", "stop", NAME, "--timeout", "60")
    assert "the guest powered off" in out  # asked by the guest agent, not QEMU's quit
    found = vm.report()
    assert found["shutdown"] == ["agent", "clean"] and "acpi" not in found
    assert "/mnt/vda" in found["unmounted"]
    vm.cli("vm", "edit", NAME, "--no-guest-agent")  # the next stop: the ACPI power button
    vm.cli("vm", "start", NAME, "--accel", "tcg")
    found = vm.wait_report(lambda found: "disk.vda.boots" in found)
    assert found["disk.vda.files"] == ["boot-1 "] and found["disk.vda.boots"] == ["2"]
    assert "disk.vda.formatted" not in found  # the filesystem the first boot made, with its file
    vm.wait_ready()
    status = json.loads(vm.cli("vm", "status", NAME, "--json")[1])
    assert status["guest"]["agent"] is False and status["guest"]["detail"].startswith("no guest agent")
    _, out, _ = vm.cli("vm", "stop", NAME, "--timeout", "60")
    assert "the guest powered off" in out
    found = vm.report()
    assert found["acpi"] == ["power-button"] and found["shutdown"] == ["clean"]


# ---------------------------------------------------------------------- helpers


def type_line(vm: GuestVm, text: str) -> None:
    """Type lower-case letters and Enter on the guest's PS/2 keyboard (QMP send-key, as the dashboard does)."""
    for key in [*text, "ret"]:
        lifecycle.qmp(vm.paths, "send-key", {"keys": [{"type": "qcode", "data": key}]})


def longest_run(flags: np.ndarray) -> int:
    best = run = 0
    for flag in flags:
        run = run + 1 if flag else 0
        best = max(best, run)
    return best


def read_png(path: Path) -> np.ndarray:
    """An 8-bit RGB, non-interlaced PNG (as QEMU's screendump writes it) as a height x width x 3 array."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    pos, idat, header = 8, b"", b""
    while pos < len(data):
        length, kind = struct.unpack_from(">I4s", data, pos)
        chunk = data[pos + 8 : pos + 8 + length]
        if kind == b"IHDR":
            header = chunk
        elif kind == b"IDAT":
            idat += chunk
        pos += 12 + length
    width, height, depth, colour, _, _, interlace = struct.unpack(">IIBBBBB", header)
    assert (depth, colour, interlace) == (8, 2, 0), f"{path}: not 8-bit RGB without interlace"
    raw = zlib.decompress(idat)
    stride = 3 * width
    out = np.zeros((height, stride), dtype=np.int32)
    previous = np.zeros(stride, dtype=np.int32)
    for y in range(height):
        kind = raw[y * (stride + 1)]
        row = np.frombuffer(raw, dtype=np.uint8, count=stride, offset=y * (stride + 1) + 1).astype(np.int32)
        if kind == 2:  # Up
            row = (row + previous) & 0xFF
        elif kind in (1, 3, 4):  # Sub, Average, Paeth: each byte needs the one to its left
            values = row.tolist()
            above = previous.tolist()
            for x in range(stride):
                left = values[x - 3] if x >= 3 else 0
                up = above[x]
                upper_left = above[x - 3] if x >= 3 else 0
                if kind == 1:
                    guess = left
                elif kind == 3:
                    guess = (left + up) // 2
                else:
                    p = left + up - upper_left
                    pa, pb, pc = abs(p - left), abs(p - up), abs(p - upper_left)
                    guess = left if pa <= pb and pa <= pc else up if pb <= pc else upper_left
                values[x] = (values[x] + guess) & 0xFF
            row = np.array(values, dtype=np.int32)
        out[y] = previous = row
    return out.reshape(height, width, 3).astype(np.uint8)



def test_the_guest_agent_channel_in_argv_and_libvirt_xml(tmp_path: Path) -> None:
    spec = new_spec("vm1")
    paths = RuntimePaths(tmp_path / "vm1")
    assert "org.qemu.guest_agent.0" not in " ".join(build_argv(spec, None, qemu="qemu", accel="tcg",
                                                               runtime_dir=paths.directory, simulated=False))
    spec.guest_agent = True
    argv = build_argv(spec, None, qemu="qemu", accel="tcg", runtime_dir=paths.directory, simulated=False)
    i = argv.index(f"socket,id=qga0,path={paths.agent_socket},server=on,wait=off")
    assert argv[i + 1 : i + 5] == ["-device", "virtio-serial-pci,id=virtio-serial0", "-device",
                                   "virtserialport,bus=virtio-serial0.0,chardev=qga0,name=org.qemu.guest_agent.0"]
    assert "guest_agent = true" in spec.to_toml() and "guest_agent" not in new_spec("vm1").to_toml()
    for with_paths in (None, paths):
        xml = domain_xml(spec, None, paths=with_paths)
        channel = ET.fromstring(xml).find("devices/channel")
        assert channel is not None and channel.get("type") == "unix"
        target = channel.find("target")
        assert target is not None and target.attrib == {"type": "virtio", "name": "org.qemu.guest_agent.0"}
        source = channel.find("source")
        assert (source.get("path") if source is not None else None) == (str(paths.agent_socket) if with_paths
                                                                        else None)
        validate_xml(xml, tmp_path, f"agent-{bool(with_paths)}")  # libvirt's own schema
