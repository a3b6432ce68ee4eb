"""A VM on a tap device in a bridge, proven by the Linux test guest: it gets a DHCP lease from the bridge's
network and fetches a page from a server on the bridge's address.

Everything lives in a network namespace the test makes (``ip netns``): the bridge, the tap device, a DHCP
server (busybox udhcpd), an HTTP server, and the VM, started by vgpuctl's own CLI inside the namespace so
that its QEMU opens the tap there. The host's own network is not touched. QEMU runs under TCG.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import wait_for
from vgpuctl.base.state import StateDir
from vgpuctl.vm.linuxguest import LinuxGuest, kernel_cmdline, read_report
from vgpuctl.vm.runtime import RuntimePaths

SRC = Path(__file__).resolve().parents[1] / "src"
BRIDGE, TAP, BRIDGE_IP, PORT = "vgbr0", "vgtap0", "10.77.0.1", 8077
BOOT_TIMEOUT_S = 120.0


def _ns(namespace: str, *argv: str, **options: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", "netns", "exec", namespace, *argv], capture_output=True, text=True, timeout=60,
                          check=True, **options)  # type: ignore[call-overload, no-any-return]


@pytest.fixture
def namespace(tmp_path: Path) -> Iterator[str]:
    """A network namespace with a bridge (BRIDGE_IP/24), a tap device in it, and a DHCP server on it."""
    name = f"vgtest{os.getpid()}"
    made = subprocess.run(["ip", "netns", "add", name], capture_output=True, text=True)
    if made.returncode != 0:
        pytest.skip(f"this machine does not allow network namespaces: {made.stderr.strip()}")
    daemons: list[subprocess.Popen[bytes]] = []
    try:
        for command in ("ip link set lo up", f"ip link add {BRIDGE} type bridge",
                        f"ip addr add {BRIDGE_IP}/24 dev {BRIDGE}", f"ip link set {BRIDGE} up",
                        f"ip tuntap add dev {TAP} mode tap", f"ip link set {TAP} master {BRIDGE} up"):
            _ns(name, *command.split())
        conf = tmp_path / "udhcpd.conf"
        conf.write_text(f"start 10.77.0.50\nend 10.77.0.60\ninterface {BRIDGE}\nlease_file {tmp_path}/leases\n"
                        f"pidfile {tmp_path}/udhcpd.pid\noption subnet 255.255.255.0\noption router {BRIDGE_IP}\n")
        (tmp_path / "leases").touch()
        daemons.append(subprocess.Popen(["ip", "netns", "exec", name, "busybox", "udhcpd", "-f", str(conf)],
                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        yield name
    finally:
        for daemon in daemons:
            daemon.kill()
            daemon.wait()
        subprocess.run(["ip", "netns", "del", name], capture_output=True)


def test_a_tap_vm_on_a_bridge_gets_a_lease_and_a_page_from_the_bridge(namespace: str, linux_guest: LinuxGuest,
                                                                       tmp_path: Path) -> None:
    token = secrets.token_hex(8)
    site = tmp_path / "site"
    site.mkdir()
    (site / "token").write_text(token)
    server_log = tmp_path / "http.log"
    with server_log.open("wb") as log:
        server = subprocess.Popen(["ip", "netns", "exec", namespace, sys.executable, "-m", "http.server",
                                   "--bind", BRIDGE_IP, "--directory", str(site), str(PORT)],
                                  stdout=log, stderr=subprocess.STDOUT)
    state = Path(tempfile.mkdtemp(prefix="vgt-"))  # short: socket paths stay under 108 bytes
    env = {**os.environ, "PYTHONPATH": str(SRC)}

    def vgpuctl(*args: str) -> str:
        return _ns(namespace, sys.executable, "-m", "vgpuctl", "--root", "/", "--state-dir", str(state), *args,
                   env=env).stdout

    try:
        def serving() -> bool:
            probe = subprocess.run(["ip", "netns", "exec", namespace, sys.executable, "-c",
                                    f"import socket; socket.create_connection(('{BRIDGE_IP}', {PORT}), 1)"],
                                   capture_output=True)
            return probe.returncode == 0

        wait_for(serving, timeout=30)
        mac = "52:54:00:77:00:42"
        vgpuctl("vm", "create", "tapvm", "--no-vgpu", "--memory", "256", "--cpus", "1",
                "--kernel", str(linux_guest.kernel), "--initrd", str(linux_guest.initrd),
                "--append", kernel_cmdline(url=f"http://{BRIDGE_IP}:{PORT}/token"),
                "--network", f"tap:{TAP}", "--no-vhost-net", "--mac", mac, "--display", "none")
        argv = vgpuctl("vm", "argv", "tapvm", "--accel", "tcg")
        assert f"tap,id=n0,ifname={TAP},script=no,downscript=no" in argv and f"mac={mac}" in argv, argv
        vgpuctl("vm", "start", "tapvm", "--accel", "tcg")
        serial = RuntimePaths.for_vm(StateDir(state), "tapvm").serial_log
        report: dict[str, list[str]] = {}

        def fetched() -> bool:
            nonlocal report
            with contextlib.suppress(FileNotFoundError):
                report = read_report(serial.read_text(errors="replace"))
            return "http.body" in report or report.get("net.lease") == ["none"]

        wait_for(fetched, timeout=BOOT_TIMEOUT_S)
        assert report["net.mac"] == [mac]
        lease = report["net.lease"][-1]
        assert lease.startswith("10.77.0.") and 50 <= int(lease.rsplit(".", 1)[1]) <= 60, report
        assert report["net.router"] == [BRIDGE_IP]
        assert report["http.body"] == [token]
        assert f"{lease} - - " in server_log.read_text() and "GET /token" in server_log.read_text()
    finally:
        with contextlib.suppress(subprocess.CalledProcessError):
            vgpuctl("vm", "kill", "tapvm")
        server.kill()
        server.wait()
        shutil.rmtree(state, ignore_errors=True)
    # The namespace kept the test's network to itself: the host never had the bridge or the tap.
    assert TAP not in os.listdir("/sys/class/net") and BRIDGE not in os.listdir("/sys/class/net")
