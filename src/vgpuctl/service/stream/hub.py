"""One display hub per VM: one RFB connection, one framebuffer, one encoder per codec, any number of viewers.

The parts, each in its module:

- :mod:`.connection`: the RFB connection (through QMP, else the VNC socket) and its reader, which pipelines
  incremental FramebufferUpdateRequests (see :mod:`.rfb`) and applies each update to the framebuffer;
- :mod:`.damage`: when an update is complete, its rectangles are marked in every viewer's *damage*, a boolean
  grid of ``tile x tile`` pixel tiles (what that viewer has not been sent since it changed);
- :mod:`.codec`: the codecs' protocol and what goes on the wire; :mod:`.jpeg` (changed tiles, one encode per group
  of viewers with the same damage) and :mod:`.h264` (whole pictures, keyframes for newcomers and for viewers that
  fell behind), one object of each per hub, chosen by :class:`~.codec.Codec` (:data:`CODEC_CLASSES`);
- :mod:`.viewer`: a bounded queue of frames per viewer, and its input;
- :mod:`.stats`: the stream's numbers, in one place.

The hub's encode task wakes when something is pending and lets each codec serve its viewers that have room
(``capacity`` frames queued or being sent, 1 by default: a viewer's next frame is encoded when its sender is ready
for it, from the newest picture). A viewer that is slow (its queue is full) is simply not served: nothing stale
is encoded or queued for it, so QEMU and the other viewers never wait for it and its queue stays bounded.
A new viewer, or one that asks for a refresh, starts with all of the screen pending: it gets a full frame at once.

The hub connects when its first viewer subscribes and disconnects after the last one leaves. Then it lets go
of what it holds at once — the libx264 encoder (30-50 MB and its threads), the framebuffer, the encode threads —
rather than when the cyclic garbage collector happens to find the hub, and asks the C allocator to hand freed
memory back to the system (:func:`release_memory`): without that a service whose viewers come and go grew by
hundreds of MB (freed encoder buffers kept by glibc's malloc in its per-thread arenas).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import ctypes.util
import logging
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import ModuleType
from typing import Any

from vgpuctl.service.stream.codec import (
    CODECS,
    KIND_FRAME_END,
    KIND_H264,
    KIND_JPEG,
    Codec,
    Frame,
    StreamCodec,
    StreamOptions,
)
from vgpuctl.service.stream.connection import DisplayConnection
from vgpuctl.service.stream.damage import Grid, grid_shape, mask_rects, tiles_of
from vgpuctl.service.stream.h264 import H264Codec
from vgpuctl.service.stream.jpeg import JpegCodec
from vgpuctl.service.stream.rfb import RfbClient, Update
from vgpuctl.service.stream.stats import HubStats, RateMeter
from vgpuctl.service.stream.viewer import DisplayClosed, Viewer

__all__ = ["CODECS", "CODEC_CLASSES", "KIND_FRAME_END", "KIND_H264", "KIND_JPEG", "QMP_TIMEOUT", "Codec",
           "DisplayClosed", "DisplayHub", "Frame", "HubRegistry", "HubStats", "StreamOptions", "Viewer", "mask_rects",
           "release_memory"]

log = logging.getLogger(__name__)

CODEC_CLASSES: dict[Codec, type[StreamCodec]] = {Codec.H264: H264Codec, Codec.JPEG: JpegCodec}
"""Each codec's class, in the order they serve: H.264 first, so that viewers it gives up on (a screen size libx264
refuses) are served as JPEG viewers in the same round."""
QMP_TIMEOUT = 2.0
"""Seconds to wait for the VM's QMP socket (it serves one client at a time) before using the VNC socket."""


_malloc_trim: Any = None


def release_memory() -> None:
    """Hand the memory the process has freed back to the system, where the C library can (glibc's
    ``malloc_trim``: it returns the free pages of every malloc arena, not only the top of the heap). A no-op
    elsewhere. Costs a few milliseconds; called when a display hub has gone."""
    global _malloc_trim
    if _malloc_trim is None:
        _malloc_trim = False
        with contextlib.suppress(OSError, AttributeError, TypeError):
            _malloc_trim = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    if _malloc_trim:
        _malloc_trim(0)


class DisplayHub:
    """The display of one VM (one VNC socket), shared by its viewers."""

    def __init__(self, socket_path: str | Path, options: StreamOptions | None = None,
                 on_close: Callable[[DisplayHub], None] | None = None, name: str | None = None,
                 qmp_socket: str | Path | None = None) -> None:
        self.socket_path = Path(socket_path)
        self.qmp_socket = Path(qmp_socket) if qmp_socket is not None else None
        """The VM's QMP socket: when set, the hub first connects through it, and falls back to the VNC socket."""
        self.name = name
        """The VM's name: when set, the hub reports its fps and viewers to :mod:`vgpuctl.service.metrics`."""
        self.options = options or StreamOptions()
        if self.options.tile % 16 or self.options.tile <= 0:
            raise ValueError("tile must be a positive multiple of 16")
        self._on_close = on_close
        self.viewers: list[Viewer] = []
        self.connection = DisplayConnection(self.socket_path, self.qmp_socket)
        self.codecs: dict[Codec, StreamCodec] = {codec: cls(self) for codec, cls in CODEC_CLASSES.items()}
        self.stats = HubStats()
        self.pool: ThreadPoolExecutor | None = None
        """The encode threads, shared by the codecs."""
        self.captured_us = 0
        """Server time (µs since the epoch) when the newest update had arrived from QEMU."""
        self.closed = False
        self.close_reason = ""
        self._start_task: asyncio.Task[None] | None = None
        self._joining = 0
        self._tasks: list[asyncio.Task[None]] = []
        self._wake_event = asyncio.Event()
        self._have_picture = False
        self._seq = 0

    # ------------------------------------------------------------------------------- lifecycle

    @property
    def rfb(self) -> RfbClient | None:
        return self.connection.rfb

    @property
    def via_qmp(self) -> bool:
        """True once the hub connected through QMP."""
        return self.connection.via_qmp

    @property
    def running(self) -> bool:
        return self.rfb is not None and not self.closed

    def grid(self) -> Grid:
        """The tile grid of the screen as it is now."""
        assert self.rfb is not None
        return grid_shape(self.rfb.width, self.rfb.height, self.options.tile)

    async def subscribe(self, codec: str = Codec.JPEG) -> Viewer:
        """A new viewer; connects to the VM's display first if this is the first one. Its first frame is a full
        one, as soon as the hub has a picture. ``codec`` h264 falls back to jpeg where PyAV/libx264 is missing."""
        chosen = Codec.parse(codec)
        if not CODEC_CLASSES[chosen].available():
            chosen = Codec.JPEG
        if self.closed:
            raise DisplayClosed(self.close_reason or "the display hub is closed")
        if self._start_task is None:
            self._start_task = asyncio.create_task(self._start())
        self._joining += 1
        try:
            await asyncio.shield(self._start_task)
        except asyncio.CancelledError:
            if not self.viewers and self._joining == 1:  # nobody else is waiting: do not run for no one
                self._shutdown("no viewers left")
            raise
        finally:
            self._joining -= 1
        if self.closed:
            raise DisplayClosed(self.close_reason)
        viewer = Viewer(self, self.grid(), chosen)
        self.viewers.append(viewer)
        self.wake()
        return viewer

    async def _start(self) -> None:
        try:
            rfb = await self.connection.connect(QMP_TIMEOUT)
            if self.closed:  # every viewer gave up while we connected
                rfb.close()
                return
            self.stats.connections += 1
            await self.connection.start(rfb)
        except BaseException as exc:
            if self.closed:
                return
            self._shutdown(f"cannot connect to the VM's display: {exc}")
            raise
        self.pool = ThreadPoolExecutor(self.options.encode_threads, thread_name_prefix="vgpuctl-jpeg")
        self._tasks = [asyncio.create_task(self._read_loop()), asyncio.create_task(self._encode_loop()),
                       asyncio.create_task(self._rate_loop())]

    async def unsubscribe(self, viewer: Viewer) -> None:
        if viewer in self.viewers:
            self.viewers.remove(viewer)
        viewer.end("unsubscribed")
        if not self.viewers and not self.closed:
            await self.aclose("no viewers left")

    async def aclose(self, reason: str = "closed") -> None:
        """Disconnect from QEMU and end every viewer's stream."""
        tasks = self._shutdown(reason)
        current = asyncio.current_task()
        for task in tasks:
            if task is not current:
                task.cancel()
        for task in tasks:
            if task is not current:
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
        if tasks and self._release():
            await asyncio.get_running_loop().run_in_executor(None, release_memory)

    def _release(self) -> bool:
        """Drop the encoders, the framebuffer and the encode threads now (the hub object itself may live on a while
        in reference cycles with its viewers); True if there was something large to drop."""
        encoders = [codec.close() for codec in self.codecs.values()]
        if self.pool is not None:
            self.pool.shutdown(wait=False, cancel_futures=True)
            self.pool = None
        framebuffer = self.connection.release()
        return any(encoders) or framebuffer

    def _shutdown(self, reason: str) -> list[asyncio.Task[None]]:
        """Mark closed, synchronously (a viewer arriving now gets a new hub); returns the tasks to end."""
        if self.closed:
            return []
        self.closed, self.close_reason = True, reason
        if self._on_close is not None:
            self._on_close(self)
        for viewer in self.viewers:
            viewer.end(reason)
        self.connection.close()
        if self.pool is not None:
            self.pool.shutdown(wait=False, cancel_futures=True)
        self._wake_event.set()
        tasks, self._tasks = self._tasks, []
        return tasks

    # ------------------------------------------------------------------------------- for viewers and codecs

    def wake(self) -> None:
        """Something may be pending for a viewer (a new picture, room again, a refresh): let the codecs look."""
        self._wake_event.set()

    def next_seq(self) -> int:
        self._seq += 1
        return self._seq

    def deliver(self, frame: Frame, viewer: Viewer) -> None:
        """Queue ``frame`` for ``viewer``, unless it has left meanwhile (an encode awaits)."""
        if viewer in self.viewers:
            viewer.push(frame)
            self.stats.frames_queued += 1

    async def key(self, code: str, key: str | None, down: bool) -> bool:
        if self.closed:
            return False
        return await self.connection.key(code, key, down)

    async def pointer(self, x: int, y: int, mask: int) -> None:
        if not self.closed:
            await self.connection.pointer(x, y, mask)

    # ------------------------------------------------------------------------------- reading

    async def _read_loop(self) -> None:
        await self.aclose(await self.connection.read(self._apply))

    def _apply(self, update: Update) -> None:
        """A whole update is in the framebuffer: mark it. Only complete updates are marked, so every frame
        is one whole picture (no bands of a picture still arriving), encoded once."""
        self.stats.count_update(update)
        if update.resized:
            grid = self.grid()
            for viewer in self.viewers:
                viewer.damage.reset(grid)
        if update.rects or update.resized:
            self.stats.pictures += 1
            self._have_picture = self._have_picture or bool(update.rects)
            self.captured_us = int(update.finished * 1e6)
            tiles = [tiles_of(rect, self.options.tile) for rect in update.rects]
            for viewer in self.viewers:
                viewer.damage.mark(tiles)
            self.wake()

    # ------------------------------------------------------------------------------- encoding

    async def _encode_loop(self) -> None:
        try:
            await self._encode_forever()
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # a bug: end the streams rather than hang them
            if self.closed:
                return
            log.exception("display encoder for %s failed", self.socket_path)
            await self.aclose(f"display encoder failed: {exc}")

    async def _encode_forever(self) -> None:
        while not self.closed:
            await self._wake_event.wait()
            self._wake_event.clear()
            if self.closed:
                return
            if not self._have_picture:
                continue
            for codec in self.codecs.values():
                await codec.serve()

    # ------------------------------------------------------------------------------- statistics

    async def _rate_loop(self) -> None:
        """Each second: the stream's rate into its stats, and for a VM's hub on to /metrics."""
        name = self.name
        metrics = _metrics() if name is not None else None
        meter = RateMeter(self.stats)
        try:
            while not self.closed:
                await asyncio.sleep(1.0)
                meter.sample({id(v): v.frames_received for v in self.viewers})
                if metrics is not None and name is not None:
                    metrics.report_stream(name, fps=self.stats.fps, viewers=self.stats.viewers)
        finally:
            if metrics is not None and name is not None:
                metrics.clear_stream(name)


def _metrics() -> ModuleType | None:
    try:
        from vgpuctl.service import metrics
    except ImportError:  # the service's metrics (prometheus_client) are not installed
        return None
    return metrics


class HubRegistry:
    """The hubs of one service, by VNC socket path: a hub exists while it has viewers."""

    def __init__(self, options: StreamOptions | None = None) -> None:
        self.options = options
        self.hubs: dict[Path, DisplayHub] = {}

    def _forget(self, hub: DisplayHub) -> None:
        if self.hubs.get(hub.socket_path) is hub:
            del self.hubs[hub.socket_path]

    async def join(self, socket_path: str | Path, name: str | None = None,
                   qmp_socket: str | Path | None = None, codec: str = Codec.JPEG) -> Viewer:
        """A new viewer, in ``codec``, of the display at ``socket_path`` (of VM ``name``, for metrics;
        ``qmp_socket``: the VM's QMP socket, to connect through it)."""
        path = Path(socket_path)
        hub = self.hubs.get(path)
        if hub is None or hub.closed:
            hub = DisplayHub(path, self.options, on_close=self._forget, name=name, qmp_socket=qmp_socket)
            self.hubs[path] = hub
        return await hub.subscribe(codec)

    async def aclose(self) -> None:
        for hub in list(self.hubs.values()):
            await hub.aclose("the service is stopping")

    def stats(self) -> dict[str, Any]:
        return {str(path): vars(hub.stats) for path, hub in self.hubs.items()}
