"""vgpuctl.vm.qmp against a real QEMU (TCG, -S: no guest runs; only its monitor is talked to)."""

from __future__ import annotations

import asyncio
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from vgpuctl.base.errors import VgpuError
from vgpuctl.vm import qmp
from vgpuctl.vm.qmp import QmpClient, QmpError

QEMU = "qemu-system-x86_64"


@dataclass
class Qemu:
    proc: subprocess.Popen[bytes]
    socket: Path


def wait_for(condition: object, timeout: float = 10.0) -> None:
    assert callable(condition)
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def accepts(path: Path) -> bool:
    """Whether a unix socket takes connections (QEMU binds, then listens: a connect in between is refused)."""
    with socket.socket(socket.AF_UNIX) as probe:
        try:
            probe.connect(str(path))
        except OSError:
            return False
        return True


@pytest.fixture
def qemu() -> Iterator[Qemu]:
    if shutil.which(QEMU) is None:
        pytest.fail(f"{QEMU} is missing: apt-get install qemu-system-x86 (make test does)")
    with tempfile.TemporaryDirectory(prefix="vgq-") as tmp:  # short: unix socket paths have ~108 bytes
        path = Path(tmp) / "qmp.sock"
        proc = subprocess.Popen([QEMU, "-S", "-display", "none", "-vnc", "none", "-accel", "tcg", "-m", "16",
                                 "-nodefaults", "-qmp", f"unix:{path},server=on,wait=off"],
                                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            wait_for(lambda: accepts(path) or proc.poll() is not None)  # bound is not yet listening
            assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
            yield Qemu(proc, path)
        finally:
            proc.kill()
            proc.wait()


def test_commands_answer_and_a_refused_one_carries_qemus_error(qemu: Qemu) -> None:
    assert qmp.query_status(qemu.socket) == "prelaunch"  # -S: the guest has not run yet
    assert qmp.run(qemu.socket, "query-name") == {}
    with pytest.raises(QmpError) as refused:
        qmp.run(qemu.socket, "no-such-command")
    error = refused.value
    assert isinstance(error, VgpuError)  # a user error: the CLI and the service report it
    assert (error.command, error.error_class, error.socket_path) == ("no-such-command", "CommandNotFound",
                                                                     qemu.socket)
    assert "no-such-command" in error.desc and str(qemu.socket) in str(error)
    with pytest.raises(QmpError) as bad:
        qmp.screendump(qemu.socket, "/nonexistent/dir/shot.png", "png")
    assert bad.value.command == "screendump" and bad.value.error_class == "GenericError"


def test_no_monitor_a_busy_one_and_one_that_goes_away_give_qmp_errors(qemu: Qemu, tmp_path: Path) -> None:
    with pytest.raises(QmpError) as missing:
        qmp.run(tmp_path / "nothing.sock", "query-status")
    assert missing.value.command is None and missing.value.error_class is None

    async def scenario() -> None:
        async with QmpClient(qemu.socket) as first:  # QEMU's monitor serves one client at a time
            with pytest.raises(QmpError, match=r"did not greet within 0\.3 s"):
                await QmpClient(qemu.socket, timeout=0.3).connect()
            qemu.proc.kill()
            qemu.proc.wait()
            with pytest.raises(QmpError) as gone:
                await first.query_status()
            assert gone.value.command == "query-status" and gone.value.error_class is None
            assert "connection ended" in gone.value.desc

    asyncio.run(scenario())
    with pytest.raises(QmpError):  # the socket file is left behind, nobody listens on it
        qmp.query_status(qemu.socket)


def test_quit_ends_qemu(qemu: Qemu) -> None:
    qmp.quit(qemu.socket)
    assert qemu.proc.wait(10) == 0


def test_a_vnc_client_handed_over_qmp_gets_qemus_rfb_greeting(qemu: Qemu) -> None:
    async def scenario() -> bytes:
        ours, theirs = socket.socketpair()
        with ours, theirs:
            async with QmpClient(qemu.socket) as client:
                await client.add_vnc_client(theirs, "test-vnc")
            ours.settimeout(10)
            return ours.recv(12)

    assert asyncio.run(scenario()) == b"RFB 003.008\n"
