"""One display hub per VM: one RFB connection, one framebuffer, one encoder, any number of viewers.

How a frame gets to the viewers:

- The reader task pipelines incremental FramebufferUpdateRequests (see :mod:`.rfb`) and applies each update to
  the framebuffer; when an update is complete, its rectangles are ORed into every viewer's *pending* mask, a
  boolean grid of ``tile x tile`` pixel tiles (what that viewer has not been sent since it changed).
- The encoder task wakes when something is pending. It serves only viewers with room (``capacity`` frames
  queued or being sent, 1 by default: a viewer's next frame is encoded when its sender is ready for it, from the
  newest picture), groups them by identical pending masks — all
  viewers that keep up have the same mask, so they share one encode — and for each group turns the mask into
  rectangles (tile runs per row, merged down while the runs stay the same, cut into bands), encodes them with
  simplejpeg on a small thread pool from the live framebuffer, and queues the same :class:`Frame` to each.
- A viewer that is slow (its queue is full) is simply not served: its mask keeps growing, nothing stale is
  encoded or queued for it, and when it has room again it gets one frame with everything it missed, encoded
  from the current picture. So QEMU and the other viewers never wait for it and its queue stays bounded.
- A new viewer, or one that asks for a refresh, starts with a full mask: it gets a full frame at once.
- H.264 viewers (``codec="h264"``) get whole pictures from one libx264 encoder shared by all of them instead;
  see :meth:`DisplayHub._serve_h264` for how keyframes keep newcomers and viewers that fell behind in step.

Clearing a mask happens on the event loop before the encode reads the framebuffer, and marking happens after
an update's pixels are in; so a rectangle that changes while being encoded is marked again and sent again — the
picture each viewer ends up with is always the current one (at worst one frame shows a half-updated tile).

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
import struct
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import simplejpeg

from vgpuctl.service.stream.rfb import (
    WHEEL_DOWN,
    WHEEL_LEFT,
    WHEEL_RIGHT,
    WHEEL_UP,
    Framebuffer,
    RfbClient,
    RfbError,
    Update,
    rfb_buttons,
)

log = logging.getLogger(__name__)

KIND_JPEG = 1
KIND_FRAME_END = 2
KIND_H264 = 3
_JPEG_HEADER = struct.Struct(">BHHHHHH")
_FRAME_END = struct.Struct(">BQ")
_H264_HEADER = struct.Struct(">BHHBQ")  # kind, screen_w, screen_h, flags (bit 0: keyframe), captured_us
CODECS = ("jpeg", "h264")
CATCH_UP_KEYFRAME_S = 0.5
"""H.264: at most one keyframe per this many seconds for viewers that skipped pictures (a keyframe is 10-50x a
delta; on a link too slow for the deltas, a keyframe per skip would only make it slower)."""
QMP_TIMEOUT = 2.0
"""Seconds to wait for the VM's QMP socket (it serves one client at a time) before using the VNC socket."""

Mask = npt.NDArray[np.bool_]
Rect = tuple[int, int, int, int]


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


class DisplayClosed(Exception):
    """The display this viewer watched is gone (the VM stopped, or the hub was shut down)."""


@dataclass(frozen=True)
class StreamOptions:
    quality: int = 75
    """JPEG quality (1-100)."""
    subsampling: str = "420"
    tile: int = 32
    """Pixels per side of the change-tracking tiles (a multiple of 16, JPEG's 4:2:0 block)."""
    max_rect_pixels: int = 1 << 20
    """Rectangles larger than this are cut into horizontal bands, encoded in parallel (a 1920x1080 picture is
    2 JPEGs, one per encode thread). Fewer, larger JPEGs cost a browser less per picture than many small ones
    (measured: 5 bands of 512 K pixels cost headless Chromium ~15-20 % more CPU per picture than 2)."""
    capacity: int = 1
    """Frames per viewer, queued or being sent: 1 encodes each frame when the viewer is ready for it."""
    encode_threads: int = 2
    fastdct: bool = True


@dataclass(frozen=True)
class Frame:
    """The messages of one frame for the wire: JPEG rectangles, then the frame-end marker."""

    messages: tuple[bytes, ...]
    seq: int
    rects: tuple[Rect, ...]
    screen: tuple[int, int]
    captured_us: int
    """Server time (µs since the epoch) when the newest update in this frame had arrived from QEMU."""
    encode_ms: float

    @property
    def full(self) -> bool:
        w, h = self.screen
        return sum(rw * rh for _, _, rw, rh in self.rects) >= w * h

    @property
    def size(self) -> int:
        return sum(len(m) for m in self.messages)


def frame_end_message(timestamp_us: int) -> bytes:
    return _FRAME_END.pack(KIND_FRAME_END, timestamp_us)


def h264_message(screen: tuple[int, int], keyframe: bool, captured_us: int, access_unit: bytes) -> bytes:
    return _H264_HEADER.pack(KIND_H264, *screen, 1 if keyframe else 0, captured_us) + access_unit


def jpeg_message(rect: Rect, screen: tuple[int, int], jpeg: bytes) -> bytes:
    return _JPEG_HEADER.pack(KIND_JPEG, *rect, *screen) + jpeg


def mask_rects(mask: Mask, tile: int, width: int, height: int, max_rect_pixels: int) -> list[Rect]:
    """Rectangles covering the set tiles, clipped to the screen: runs of tiles per tile row, merged downwards
    while the next row has the same run, then cut into bands of at most ``max_rect_pixels``."""
    rows, _ = mask.shape
    runs_by_row: list[list[tuple[int, int]]] = []
    for ty in range(rows):
        row = mask[ty]
        if not row.any():
            runs_by_row.append([])
            continue
        padded = np.concatenate(([False], row, [False]))
        edges = np.flatnonzero(padded[1:] != padded[:-1])
        runs_by_row.append(list(zip(edges[0::2].tolist(), edges[1::2].tolist(), strict=True)))
    open_rects: dict[tuple[int, int], int] = {}  # run -> first tile row
    tile_rects: list[tuple[int, int, int, int]] = []  # tx0, ty0, tx1, ty1
    for ty in range(rows + 1):
        runs = set(runs_by_row[ty]) if ty < rows else set()
        for run in [r for r in open_rects if r not in runs]:
            tile_rects.append((run[0], open_rects.pop(run), run[1], ty))
        for run in runs:
            open_rects.setdefault(run, ty)
    rects: list[Rect] = []
    for tx0, ty0, tx1, ty1 in sorted(tile_rects, key=lambda r: (r[1], r[0])):
        x, y = tx0 * tile, ty0 * tile
        w, bottom = min(tx1 * tile, width) - x, min(ty1 * tile, height)
        if w <= 0 or bottom <= y:
            continue
        band = max(tile, (max_rect_pixels // w) // tile * tile)
        for top in range(y, bottom, band):
            rects.append((x, top, w, min(band, bottom - top)))
    return rects


class Viewer:
    """One subscriber of a :class:`DisplayHub`: a bounded queue of frames and a pending-tiles mask."""

    def __init__(self, hub: DisplayHub, mask: Mask, codec: str = "jpeg") -> None:
        self.hub = hub
        self.pending = mask
        self.codec = codec
        """``jpeg`` (changed tiles) or ``h264`` (whole pictures, one encoder shared by the hub's H.264 viewers)."""
        self.needs_keyframe = True
        """H.264 only: this viewer cannot decode the next delta (it is new, skipped a picture, or asked)."""
        self.catching_up = False
        """H.264 only: it needs a keyframe because it skipped pictures (rate-limited), not because it is new."""
        self._frames: deque[Frame] = deque()
        self._sending = 0  # 1 from next_frame() until the sender asks for the frame after it
        self._ready = asyncio.Event()
        self.closed_reason: str | None = None
        self.frames_received = 0
        self.keys_down: dict[str, str | None] = {}
        self.buttons = 0
        self.last_pointer = (0, 0)

    # ------------------------------------------------------------------------------- frames

    @property
    def queued(self) -> int:
        return len(self._frames)

    def has_room(self) -> bool:
        # The frame being sent counts: the next one is encoded when the sender comes back for it, from the
        # newest picture then, instead of waiting encoded (and growing stale) behind it.
        return len(self._frames) + self._sending < self.hub.options.capacity

    def _push(self, frame: Frame) -> None:
        self._frames.append(frame)
        self._ready.set()

    def _close(self, reason: str) -> None:
        if self.closed_reason is None:
            self.closed_reason = reason
        self._ready.set()

    async def next_frame(self) -> Frame:
        """The next frame to send (the previous one is taken as sent); raises DisplayClosed when the display
        went away."""
        if self._sending:
            self._sending = 0
            self.hub._wake()  # room again
        while not self._frames:
            if self.closed_reason is not None:
                raise DisplayClosed(self.closed_reason)
            self._ready.clear()
            await self._ready.wait()
        frame = self._frames.popleft()
        self.frames_received += 1
        self._sending = 1
        return frame

    def request_full_frame(self) -> None:
        self.pending[:] = True
        self.needs_keyframe, self.catching_up = True, False
        self.hub._wake()

    # ------------------------------------------------------------------------------- input

    async def key(self, code: str, key: str | None, down: bool) -> bool:
        if down:
            self.keys_down[code] = key
        elif code in self.keys_down:
            del self.keys_down[code]
        return await self.hub.key(code, key, down)

    async def pointer(self, x: int, y: int, buttons: int) -> None:
        self.buttons, self.last_pointer = buttons, (x, y)
        await self.hub.pointer(x, y, rfb_buttons(buttons))

    async def wheel(self, x: int, y: int, dx: float, dy: float, buttons: int = 0) -> None:
        """One wheel notch per call; the signs of dx/dy give the direction (positive: right/down)."""
        base = rfb_buttons(buttons)
        for delta, negative, positive in ((dy, WHEEL_UP, WHEEL_DOWN), (dx, WHEEL_LEFT, WHEEL_RIGHT)):
            if delta:
                bit = positive if delta > 0 else negative
                await self.hub.pointer(x, y, base | bit)
                await self.hub.pointer(x, y, base)

    async def release_input(self) -> None:
        """Let go of the keys and buttons this viewer holds (it is leaving)."""
        for code, key in list(self.keys_down.items()):
            with contextlib.suppress(RfbError, OSError):
                await self.hub.key(code, key, False)
        self.keys_down.clear()
        if self.buttons:
            with contextlib.suppress(RfbError, OSError):
                await self.hub.pointer(*self.last_pointer, 0)
            self.buttons = 0

    async def close(self) -> None:
        await self.release_input()
        await self.hub.unsubscribe(self)


@dataclass
class HubStats:
    connections: int = 0
    updates: int = 0
    pictures: int = 0
    """Updates that changed something: the pictures QEMU really produced."""
    read_ms: float = 0.0
    """Time from an update's header to its last pixel (QEMU writing it, us reading it)."""
    encodes: int = 0
    """Encodes run (one per group of viewers served together)."""
    frames_queued: int = 0
    """Frames handed to viewers (an encode shared by n viewers counts n); each frame is one whole picture."""
    encoded_bytes: int = 0
    encode_ms: float = 0.0
    h264_pictures: int = 0
    h264_keyframes: int = 0


class DisplayHub:
    """The display of one VM (one VNC socket), shared by its viewers."""

    def __init__(self, socket_path: str | Path, options: StreamOptions | None = None,
                 on_close: Callable[[DisplayHub], None] | None = None, name: str | None = None,
                 qmp_socket: str | Path | None = None) -> None:
        self.socket_path = Path(socket_path)
        self.qmp_socket = Path(qmp_socket) if qmp_socket is not None else None
        """The VM's QMP socket: when set, the hub first connects through it (:meth:`RfbClient.connect_via_qmp`:
        QEMU spends far less on each update), and falls back to the VNC socket."""
        self.via_qmp = False
        """True once the hub connected through QMP."""
        self.name = name
        """The VM's name: when set, the hub reports its fps and viewers to :mod:`vgpuctl.service.metrics`."""
        self.options = options or StreamOptions()
        if self.options.tile % 16 or self.options.tile <= 0:
            raise ValueError("tile must be a positive multiple of 16")
        self._on_close = on_close
        self.viewers: list[Viewer] = []
        self.rfb: RfbClient | None = None
        self.stats = HubStats()
        self.closed = False
        self.close_reason = ""
        self._start_task: asyncio.Task[None] | None = None
        self._joining = 0
        self._tasks: list[asyncio.Task[None]] = []
        self._wake_event = asyncio.Event()
        self._have_picture = False
        self._last_update_us = 0
        self._seq = 0
        self._pool: ThreadPoolExecutor | None = None
        self._h264: Any = None  # h264.H264Encoder for the current screen size, made at the first H.264 viewer
        self._h264_picture = -1  # stats.pictures when the last H.264 picture was coded
        self._h264_keyframe_at = 0.0  # time.monotonic() of the last keyframe
        self._h264_timer: asyncio.TimerHandle | None = None

    # ------------------------------------------------------------------------------- lifecycle

    @property
    def running(self) -> bool:
        return self.rfb is not None and not self.closed

    def _grid(self) -> tuple[int, int]:
        assert self.rfb is not None
        t = self.options.tile
        return (-(-self.rfb.height // t), -(-self.rfb.width // t))

    async def subscribe(self, codec: str = "jpeg") -> Viewer:
        """A new viewer; connects to the VM's display first if this is the first one. Its first frame is a full
        one, as soon as the hub has a picture. ``codec`` h264 falls back to jpeg where PyAV/libx264 is missing."""
        if codec not in CODECS:
            raise ValueError(f"codec must be one of {', '.join(CODECS)}, not {codec!r}")
        if codec == "h264":
            from vgpuctl.service.stream import h264

            codec = "h264" if h264.available() else "jpeg"
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
        viewer = Viewer(self, np.ones(self._grid(), np.bool_), codec)
        self.viewers.append(viewer)
        self._wake()
        return viewer

    async def _start(self) -> None:
        try:
            rfb = await self._connect()
            if self.closed:  # every viewer gave up while we connected
                rfb.close()
                return
            self.rfb = rfb
            self.stats.connections += 1
            rfb.auto_request = True
            await rfb.request_update(incremental=False)
        except BaseException as exc:
            if self.closed:
                return
            self._shutdown(f"cannot connect to the VM's display: {exc}")
            raise
        self._pool = ThreadPoolExecutor(self.options.encode_threads, thread_name_prefix="vgpuctl-jpeg")
        self._tasks = [asyncio.create_task(self._read_loop()), asyncio.create_task(self._encode_loop())]
        if self.name is not None:
            self._tasks.append(asyncio.create_task(self._report_loop(self.name)))

    async def _connect(self) -> RfbClient:
        if self.qmp_socket is not None:
            try:
                rfb = await RfbClient.connect_via_qmp(self.qmp_socket, timeout=QMP_TIMEOUT)
                self.via_qmp = True
                return rfb
            except Exception as exc:  # whatever went wrong, the VNC socket may still work
                log.info("display %s: no connection through QMP (%s: %s); using the VNC socket",
                         self.socket_path, type(exc).__name__, exc)
        return await RfbClient.connect(self.socket_path)

    async def unsubscribe(self, viewer: Viewer) -> None:
        if viewer in self.viewers:
            self.viewers.remove(viewer)
        viewer._close("unsubscribed")
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
        """Drop the encoder, the framebuffer and the encode threads now (the hub object itself may live on a while
        in reference cycles with its viewers); True if there was something large to drop."""
        had = self._h264 is not None or self.rfb is not None
        self._h264 = None
        if self._h264_timer is not None:
            self._h264_timer.cancel()
            self._h264_timer = None
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None
        if self.rfb is not None:
            self.rfb.framebuffer = np.zeros((0, 0, 4), np.uint8)
        return had

    def _shutdown(self, reason: str) -> list[asyncio.Task[None]]:
        """Mark closed, synchronously (a viewer arriving now gets a new hub); returns the tasks to end."""
        if self.closed:
            return []
        self.closed, self.close_reason = True, reason
        if self._on_close is not None:
            self._on_close(self)
        for viewer in self.viewers:
            viewer._close(reason)
        if self.rfb is not None:
            self.rfb.close()
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
        self._wake_event.set()
        tasks, self._tasks = self._tasks, []
        return tasks

    def _wake(self) -> None:
        self._wake_event.set()

    async def _report_loop(self, name: str) -> None:
        """Each second: the pictures per second the fastest viewer got, and the number of viewers.

        A frame is one whole picture; capped by the pictures QEMU produced in the same second (a viewer's
        first frame or a refresh repeats a picture)."""
        try:
            from vgpuctl.service import metrics
        except ImportError:  # the service's metrics (prometheus_client) are not installed
            return
        seen: dict[int, int] = {}
        pictures = self.stats.pictures
        try:
            while not self.closed:
                await asyncio.sleep(1.0)
                counts = {id(v): v.frames_received for v in self.viewers}
                fps = max((n - seen.get(key, n) for key, n in counts.items()), default=0)
                fps = min(fps, self.stats.pictures - pictures)
                seen, pictures = counts, self.stats.pictures
                metrics.report_stream(name, fps=fps, viewers=len(self.viewers))
        finally:
            metrics.clear_stream(name)

    # ------------------------------------------------------------------------------- input

    async def key(self, code: str, key: str | None, down: bool) -> bool:
        if self.rfb is None or self.closed:
            return False
        return await self.rfb.key(code, key, down)

    async def pointer(self, x: int, y: int, mask: int) -> None:
        if self.rfb is not None and not self.closed:
            await self.rfb.pointer_event(x, y, mask)

    # ------------------------------------------------------------------------------- reading

    async def _read_loop(self) -> None:
        assert self.rfb is not None
        rfb = self.rfb
        reason = "the VM's display ended"
        try:
            while True:
                update = await rfb.read_message()
                if update is not None:
                    self._apply(update)
        except asyncio.CancelledError:
            raise
        except (RfbError, OSError) as exc:
            reason = f"the VM's display ended: {exc}"
        except Exception as exc:  # a bug: end the streams rather than hang them
            log.exception("display reader for %s failed", self.socket_path)
            reason = f"display reader failed: {exc}"
        await self.aclose(reason)

    def _apply(self, update: Update) -> None:
        """A whole update is in the framebuffer: mark it. Only complete updates are marked, so every frame
        is one whole picture (no bands of a picture still arriving), encoded once."""
        self.stats.updates += 1
        self.stats.read_ms += (update.finished - update.started) * 1000
        assert self.rfb is not None
        if update.resized:
            grid = self._grid()
            for viewer in self.viewers:
                viewer.pending = np.ones(grid, np.bool_)
        if update.rects or update.resized:
            self.stats.pictures += 1
            self._have_picture = self._have_picture or bool(update.rects)
            self._last_update_us = int(update.finished * 1e6)
            self._mark(update.rects)

    def _mark(self, rects: list[Rect]) -> None:
        t = self.options.tile
        for x, y, w, h in rects:
            tiles = (slice(y // t, -(-(y + h) // t)), slice(x // t, -(-(x + w) // t)))
            for viewer in self.viewers:
                viewer.pending[tiles] = True
        self._wake()

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
            await self._serve_h264()
            groups: dict[bytes, list[Viewer]] = {}
            for viewer in self.viewers:
                if viewer.codec == "jpeg" and viewer.has_room() and viewer.pending.any():
                    groups.setdefault(viewer.pending.tobytes() + str(viewer.pending.shape).encode(), []).append(viewer)
            for members in groups.values():
                mask = members[0].pending.copy()
                for viewer in members:
                    viewer.pending = np.zeros_like(mask)
                frame = await self._encode(mask)
                if frame is None:  # the screen was resized meanwhile: the new masks are full anyway
                    continue
                for viewer in members:
                    if viewer in self.viewers:
                        viewer._push(frame)
                        self.stats.frames_queued += 1

    async def _encode(self, mask: Mask) -> Frame | None:
        assert self.rfb is not None and self._pool is not None
        fb = self.rfb.framebuffer
        height, width = fb.shape[:2]
        if mask.shape != self._grid():
            return None
        opts = self.options
        rects = mask_rects(mask, opts.tile, width, height, opts.max_rect_pixels)
        colorspace = self.rfb.pixel_format.colorspace
        assert colorspace is not None
        loop = asyncio.get_running_loop()
        started = time.perf_counter()
        captured = self._last_update_us
        jpegs = await asyncio.gather(*(loop.run_in_executor(self._pool, _encode_rect, fb, rect, opts, colorspace)
                                       for rect in rects))
        elapsed = (time.perf_counter() - started) * 1000
        screen = (width, height)
        messages = [jpeg_message(rect, screen, jpeg) for rect, jpeg in zip(rects, jpegs, strict=True)]
        messages.append(frame_end_message(captured))
        self._seq += 1
        frame = Frame(tuple(messages), self._seq, tuple(rects), screen, captured, elapsed)
        self.stats.encodes += 1
        self.stats.encode_ms += elapsed
        self.stats.encoded_bytes += frame.size
        return frame


    async def _serve_h264(self) -> None:
        """One H.264 picture for every H.264 viewer with room, when QEMU has finished a new picture (never a
        half-received one: a delta cannot be taken back) or a viewer needs a keyframe to start from.

        A viewer without room skips the picture; since the next delta would not decode for it, it waits for a
        keyframe — which the viewers in step then get too (one encode for all). Those keyframes come at most
        every CATCH_UP_KEYFRAME_S; a new viewer, or one that asked for a refresh, gets one at once."""
        watching = [v for v in self.viewers if v.codec == "h264"]
        if not watching or self.rfb is None:
            return
        # Every picture coded goes to every H.264 viewer that can take it, or that viewer is out of step
        # (the next delta refers to a picture it does not have) until its next keyframe.
        fresh = self.stats.pictures != self._h264_picture
        wait = CATCH_UP_KEYFRAME_S - (time.monotonic() - self._h264_keyframe_at)
        if any(v.catching_up and v.has_room() for v in watching) and wait > 0 and self._h264_timer is None:
            def due() -> None:
                self._h264_timer = None
                self._wake()

            self._h264_timer = asyncio.get_running_loop().call_later(wait, due)  # serve it then, moving or not
        takers = [v for v in watching if v.has_room() and not (v.catching_up and wait > 0)]
        if not takers:  # nobody can take a picture now (e.g. the only viewer is still sending the last one):
            return      # code none, or it would be lost to them; the newest is coded when one is ready
        keyframe = any(v.needs_keyframe for v in takers)
        if not (fresh or keyframe):
            return
        from vgpuctl.service.stream.h264 import H264Encoder, H264Unavailable

        assert self._pool is not None
        fb = self.rfb.framebuffer
        height, width = fb.shape[:2]
        if self._h264 is None or (self._h264.width, self._h264.height) != (width, height):
            try:
                self._h264 = H264Encoder(width, height, pixel_format=_av_format(self.rfb.pixel_format.colorspace))
            except H264Unavailable as exc:  # e.g. an odd screen size: these viewers get JPEG instead
                log.warning("display %s: H.264 unavailable (%s), sending JPEG", self.socket_path, exc)
                for viewer in watching:
                    viewer.codec, viewer.pending[:] = "jpeg", True
                return
            for viewer in watching:
                viewer.needs_keyframe = True
        self._h264_picture = self.stats.pictures
        captured = self._last_update_us
        started = time.perf_counter()
        unit = await asyncio.get_running_loop().run_in_executor(self._pool, self._h264.encode, fb, keyframe)
        elapsed = (time.perf_counter() - started) * 1000
        screen = (width, height)
        self._seq += 1
        frame = Frame((h264_message(screen, unit.keyframe, captured, unit.data),), self._seq,
                      ((0, 0, width, height),), screen, captured, elapsed)
        self.stats.encodes += 1
        self.stats.encode_ms += elapsed
        self.stats.encoded_bytes += frame.size
        self.stats.h264_pictures += 1
        self.stats.h264_keyframes += unit.keyframe
        if unit.keyframe:
            self._h264_keyframe_at = time.monotonic()
        for viewer in self.viewers:
            if viewer.codec != "h264":
                continue
            if viewer.has_room() and (unit.keyframe or not viewer.needs_keyframe):
                viewer.pending[:] = False
                viewer.needs_keyframe = viewer.catching_up = False
                viewer._push(frame)
                self.stats.frames_queued += 1
            elif not viewer.needs_keyframe:  # it skips this picture: the deltas after it would not decode
                viewer.needs_keyframe = viewer.catching_up = True


def _av_format(colorspace: str | None) -> str:
    """PyAV's name for the framebuffer's byte order (the RFB client asks QEMU for 32-bit BGRX or RGBX)."""
    return {"BGRX": "bgra", "BGRA": "bgra", "RGBX": "rgba", "RGBA": "rgba"}.get(colorspace or "", "bgra")


def _encode_rect(fb: Framebuffer, rect: Rect, opts: StreamOptions, colorspace: str) -> bytes:
    x, y, w, h = rect
    data: bytes = simplejpeg.encode_jpeg(fb[y:y + h, x:x + w], opts.quality, colorspace, opts.subsampling,
                                         opts.fastdct)
    return data


class HubRegistry:
    """The hubs of one service, by VNC socket path: a hub exists while it has viewers."""

    def __init__(self, options: StreamOptions | None = None) -> None:
        self.options = options
        self.hubs: dict[Path, DisplayHub] = {}

    def _forget(self, hub: DisplayHub) -> None:
        if self.hubs.get(hub.socket_path) is hub:
            del self.hubs[hub.socket_path]

    async def join(self, socket_path: str | Path, name: str | None = None,
                   qmp_socket: str | Path | None = None, codec: str = "jpeg") -> Viewer:
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
