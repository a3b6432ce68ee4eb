"""The QEMU guest agent (qemu-ga) on the VM's ``org.qemu.guest_agent.0`` channel: what runs inside.

The protocol is QMP's JSON without a greeting or capabilities: a command a line, an answer a line
(qemu-ga's qga/main.c). A client first sends ``guest-sync`` with a random id and drops every line
until that id comes back, since an earlier client may have left answers in the channel. qemu.qmp
speaks QMP's handshake, which qemu-ga does not, so this small client is ours.
"""

from __future__ import annotations

import contextlib
import json
import random
import socket
import time
from pathlib import Path
from typing import Any

TIMEOUT_S = 2.0


class AgentUnavailable(Exception):
    """No agent answered on the channel (none in the guest, not started yet, or the VM has no channel)."""


class _Channel:
    def __init__(self, path: Path, timeout_s: float) -> None:
        self.deadline = time.monotonic() + timeout_s
        self.sock = socket.socket(socket.AF_UNIX)
        self.sock.settimeout(timeout_s)
        self.buffer = b""
        try:
            self.sock.connect(str(path))
        except OSError as e:
            self.sock.close()
            raise AgentUnavailable(f"no guest agent channel ({e.strerror})") from None

    def send(self, command: str, arguments: dict[str, Any] | None = None) -> None:
        message: dict[str, Any] = {"execute": command, **({"arguments": arguments} if arguments else {})}
        self.sock.sendall(json.dumps(message).encode() + b"\n")

    def answer(self) -> Any:
        while b"\n" not in self.buffer:
            self.sock.settimeout(max(0.01, self.deadline - time.monotonic()))
            try:
                data = self.sock.recv(65536)
            except (TimeoutError, OSError):
                raise AgentUnavailable("the guest agent did not answer") from None
            if not data:
                raise AgentUnavailable("the guest agent's channel closed")
            self.buffer += data
        line, _, self.buffer = self.buffer.partition(b"\n")
        try:
            return json.loads(line)
        except ValueError:
            return None  # a partial line an earlier client left: skipped by sync

    def sync(self) -> None:
        token = random.randrange(1, 2**31)
        self.send("guest-sync", {"id": token})
        while (reply := self.answer()) is None or reply.get("return") != token:
            pass

    def execute(self, command: str, arguments: dict[str, Any] | None = None) -> Any:
        self.send(command, arguments)
        reply = self.answer()
        if not isinstance(reply, dict) or "return" not in reply:
            raise AgentUnavailable(f"{command}: {reply.get('error') if isinstance(reply, dict) else reply}")
        return reply["return"]

    def close(self) -> None:
        self.sock.close()


def guest_facts(channel: Path, timeout_s: float = TIMEOUT_S) -> dict[str, Any]:
    """What the guest agent says of the guest: {"agent": True, "os", "kernel", "ip_addresses"}, or
    {"agent": False, "detail": why} when no agent answers."""
    try:
        agent = _Channel(channel, timeout_s)
    except AgentUnavailable as e:
        return {"agent": False, "detail": f"no guest agent: {e}"}
    try:
        agent.sync()
        osinfo = agent.execute("guest-get-osinfo")
        interfaces = agent.execute("guest-network-get-interfaces")
    except AgentUnavailable as e:
        return {"agent": False, "detail": f"no guest agent: {e}"}
    finally:
        agent.close()
    addresses = [a["ip-address"] for i in interfaces if i.get("name") != "lo"
                 for a in i.get("ip-addresses", []) if "ip-address" in a]
    return {"agent": True, "os": osinfo.get("pretty-name") or osinfo.get("name"),
            "kernel": osinfo.get("kernel-release"), "ip_addresses": addresses}


def shutdown(channel: Path, timeout_s: float = TIMEOUT_S) -> bool:
    """Ask the guest to power down cleanly; False when no agent took the request (then use ACPI)."""
    try:
        agent = _Channel(channel, timeout_s)
    except AgentUnavailable:
        return False
    try:
        agent.sync()
        agent.send("guest-shutdown")  # qemu-ga sends no answer to it on success
        # Stay connected a moment: a channel closed at once may lose the request before the guest reads it.
        agent.deadline = time.monotonic() + 1.0
        with contextlib.suppress(AgentUnavailable):
            agent.answer()
        return True
    except AgentUnavailable:
        return False
    finally:
        agent.close()
