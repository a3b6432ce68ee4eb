"""vgpuctl's one QMP client: every command vgpuctl sends to a VM's QEMU monitor goes through here.

Layered as qemu.qmp is (its asyncio ``QMPClient``, its synchronous ``legacy`` layer over that), and on it:

- :class:`QmpClient`: one connection to a VM's QMP socket (async), each step bounded by a timeout;
- :func:`run`: one command over a connection of its own, for synchronous callers (the VM lifecycle, the CLI);
- the commands vgpuctl uses, by name: :func:`query_status`, :func:`system_powerdown`, :func:`quit`,
  :func:`screendump`, :func:`send_key`, :func:`input_send_event`, :meth:`QmpClient.add_vnc_client`.

Every failure is a :class:`QmpError` (a :class:`~vgpuctl.base.errors.VgpuError`) that carries the socket, the
command and, when QEMU answered with an error, its class and description — as qemu.qmp's ``ExecuteError``.
QEMU's monitor serves one client at a time: connections are kept short, and a client that waits behind
another one waits at most its timeout for the greeting.

qemu.qmp and asyncio are imported when a connection is made, not with this module: the lifecycle imports it
for every CLI command, most of which never talk to QEMU (~25 ms saved).
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any

from vgpuctl.base.errors import VgpuError

if TYPE_CHECKING:
    import socket

TIMEOUT_S = 5.0


class QmpError(VgpuError):
    """A VM's QMP socket could not be reached, closed, or QEMU refused a command.

    ``error_class`` and ``desc`` are QEMU's when it answered with an error (``CommandNotFound``,
    ``GenericError``, ...); ``error_class`` is None when there was no answer (no monitor, it went away, a timeout).
    """

    def __init__(self, socket_path: str | Path, command: str | None, desc: str,
                 error_class: str | None = None) -> None:
        self.socket_path = Path(socket_path)
        self.command = command
        self.desc = desc
        self.error_class = error_class
        super().__init__(f"QMP {command or 'connection'} at {socket_path}: {desc}")


class QmpClient:
    """One connection to a VM's QMP socket: ``async with QmpClient(path) as qmp: await qmp.execute(...)``.

    ``timeout``: seconds for the greeting and for each command's answer; None waits as long as the caller does.
    """

    def __init__(self, socket_path: str | Path, *, name: str = "vgpuctl", timeout: float | None = TIMEOUT_S) -> None:
        self.socket_path = Path(socket_path)
        self.timeout = timeout
        from qemu.qmp import QMPClient

        self._client = QMPClient(name)

    async def __aenter__(self) -> QmpClient:
        await self.connect()
        return self

    async def __aexit__(self, kind: type[BaseException] | None, error: BaseException | None,
                        traceback: TracebackType | None) -> None:
        await self.close()

    async def connect(self) -> None:
        import asyncio

        from qemu.qmp import ConnectError

        try:
            await asyncio.wait_for(self._client.connect(str(self.socket_path)), self.timeout)
        except TimeoutError:
            await self.close()
            raise QmpError(self.socket_path, None, f"QEMU's monitor did not greet within {self.timeout:g} s "
                           "(it serves one client at a time)") from None
        except (ConnectError, EOFError, OSError) as error:
            await self.close()
            raise QmpError(self.socket_path, None, str(error)) from error

    async def execute(self, command: str, arguments: Mapping[str, object] | None = None) -> Any:
        """QEMU's answer to ``command`` (its ``return`` value)."""
        import asyncio

        from qemu.qmp import ExecuteError, QMPError

        try:
            return await asyncio.wait_for(self._client.execute(command, arguments), self.timeout)
        except ExecuteError as error:
            raise QmpError(self.socket_path, command, str(error), error.error_class) from error
        except TimeoutError:
            raise QmpError(self.socket_path, command, f"no answer within {self.timeout:g} s") from None
        except (QMPError, EOFError, OSError) as error:  # the connection ended (QEMU quit, or was killed)
            raise QmpError(self.socket_path, command, f"the connection ended: {str(error) or type(error).__name__}") \
                from error

    async def close(self) -> None:
        from qemu.qmp import QMPError

        # What ended the connection early is re-raised here; the caller has had its answer (or its error).
        with contextlib.suppress(QMPError, EOFError, OSError):
            await self._client.disconnect()

    # ------------------------------------------------------------------------------------------- commands

    async def query_status(self) -> str:
        """The VM's run state: ``running``, ``paused``, ``shutdown``, ``prelaunch``, ``inmigrate`` ..."""
        result = await self.execute("query-status")
        return str(result.get("status")) if isinstance(result, dict) else ""

    async def add_vnc_client(self, client: socket.socket, fdname: str) -> None:
        """Hand QEMU ``client`` (its end of a socket pair) as a VNC client: ``getfd`` + ``add_client``."""
        from qemu.qmp import QMPError

        try:
            self._client.send_fd_scm(client.fileno())
        except (QMPError, OSError) as error:
            raise QmpError(self.socket_path, "getfd", f"could not pass the file descriptor: {error}") from error
        await self.execute("getfd", {"fdname": fdname})
        await self.execute("add_client", {"protocol": "vnc", "fdname": fdname})


def run(socket_path: str | Path, command: str, arguments: Mapping[str, object] | None = None, *,
        timeout: float = TIMEOUT_S) -> Any:
    """One command over a connection of its own, from synchronous code (not from a running event loop)."""
    import asyncio

    async def one() -> Any:
        async with QmpClient(socket_path, timeout=timeout) as qmp:
            return await qmp.execute(command, arguments)

    return asyncio.run(one())


def query_status(socket_path: str | Path, *, timeout: float = TIMEOUT_S) -> str:
    import asyncio

    async def one() -> str:
        async with QmpClient(socket_path, timeout=timeout) as qmp:
            return await qmp.query_status()

    return asyncio.run(one())


def system_powerdown(socket_path: str | Path) -> None:
    """The ACPI power button."""
    run(socket_path, "system_powerdown")


def quit(socket_path: str | Path) -> None:
    """QEMU exits at once (the guest is not asked)."""
    run(socket_path, "quit")


def screendump(socket_path: str | Path, filename: str | Path, image_format: str | None = None) -> None:
    """The display as a file QEMU writes: PPM, or ``image_format`` (``png``)."""
    run(socket_path, "screendump", {"filename": str(filename), **({"format": image_format} if image_format else {})})


def send_key(socket_path: str | Path, qcodes: Sequence[str]) -> None:
    """Press and release these keys together (QEMU's qcode names: ``a``, ``ctrl``, ``ret`` ...)."""
    run(socket_path, "send-key", {"keys": [{"type": "qcode", "data": code} for code in qcodes]})


def input_send_event(socket_path: str | Path, events: Sequence[Mapping[str, object]]) -> None:
    """Input events (``{"type": "abs", "data": {"axis": "x", "value": 9000}}`` ...) for the guest."""
    run(socket_path, "input-send-event", {"events": list(events)})
