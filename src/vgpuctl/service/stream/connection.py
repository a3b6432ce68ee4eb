"""A display hub's connection to QEMU's VNC server: made through the VM's QMP socket where it answers
(:meth:`~.rfb.RfbClient.connect_via_qmp`: QEMU spends far less on each update), else to the VNC socket; then
the reader, which applies every update to the framebuffer and hands it on, until the display ends.

One connection per hub: a hub whose display ended closes, and the next viewer gets a new hub (and so a new
connection) from the registry — that is the reconnect.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from pathlib import Path

import numpy as np

from vgpuctl.service.stream.rfb import RfbClient, RfbError, Update
from vgpuctl.vm.qmp import QmpError

log = logging.getLogger(__name__)


class DisplayConnection:
    def __init__(self, socket_path: Path, qmp_socket: Path | None = None) -> None:
        self.socket_path = socket_path
        self.qmp_socket = qmp_socket
        self.rfb: RfbClient | None = None
        """The RFB client, once :meth:`start` has it."""
        self.via_qmp = False
        """True once connected through QMP."""

    async def connect(self, qmp_timeout: float) -> RfbClient:
        """A new RFB client: through QMP if it answers within ``qmp_timeout`` (it serves one client at a time),
        else to the VNC socket."""
        if self.qmp_socket is not None:
            try:
                rfb = await RfbClient.connect_via_qmp(self.qmp_socket, timeout=qmp_timeout)
                self.via_qmp = True
                return rfb
            except (QmpError, RfbError, OSError) as exc:  # the VNC socket may still work
                log.info("display %s: no connection through QMP (%s: %s); using the VNC socket",
                         self.socket_path, type(exc).__name__, exc)
        return await RfbClient.connect(self.socket_path)

    async def start(self, rfb: RfbClient) -> None:
        """Keep ``rfb`` and ask for the whole screen, then for every update (pipelined, see :mod:`.rfb`)."""
        self.rfb = rfb
        rfb.auto_request = True
        await rfb.request_update(incremental=False)

    async def read(self, on_update: Callable[[Update], None]) -> str:
        """Read until the display ends, handing each update (already in the framebuffer) to ``on_update``;
        returns why it ended."""
        assert self.rfb is not None
        rfb = self.rfb
        try:
            while True:
                update = await rfb.read_message()
                if update is not None:
                    on_update(update)
        except asyncio.CancelledError:
            raise
        except (RfbError, OSError) as exc:
            return f"the VM's display ended: {exc}"
        except Exception as exc:  # a bug: end the streams rather than hang them
            log.exception("display reader for %s failed", self.socket_path)
            return f"display reader failed: {exc}"

    async def key(self, code: str, key: str | None, down: bool) -> bool:
        if self.rfb is None:
            return False
        return await self.rfb.key(code, key, down)

    async def pointer(self, x: int, y: int, mask: int) -> None:
        if self.rfb is not None:
            await self.rfb.pointer_event(x, y, mask)

    def close(self) -> None:
        if self.rfb is not None:
            self.rfb.close()

    def release(self) -> bool:
        """Drop the framebuffer now (the client object may live on a while); True if there was one."""
        if self.rfb is None:
            return False
        self.rfb.framebuffer = np.zeros((0, 0, 4), np.uint8)
        return True
