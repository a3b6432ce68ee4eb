"""One subscriber of a display hub: a bounded queue of frames, what it has not been sent yet (its
:class:`~.damage.Damage`), its codec, and the keys and buttons it holds down (let go of when it leaves)."""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from typing import TYPE_CHECKING

from vgpuctl.service.stream.codec import Codec, Frame
from vgpuctl.service.stream.damage import Damage, Grid
from vgpuctl.service.stream.rfb import WHEEL_DOWN, WHEEL_LEFT, WHEEL_RIGHT, WHEEL_UP, RfbError, rfb_buttons

if TYPE_CHECKING:
    from vgpuctl.service.stream.hub import DisplayHub


class DisplayClosed(Exception):
    """The display this viewer watched is gone (the VM stopped, or the hub was shut down)."""


class Viewer:
    """One subscriber of a :class:`~.hub.DisplayHub` (made by :meth:`~.hub.DisplayHub.subscribe`)."""

    def __init__(self, hub: DisplayHub, grid: Grid, codec: Codec = Codec.JPEG) -> None:
        self.hub = hub
        self.damage = Damage(grid)
        self.codec = codec
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

    # ------------------------------------------------------------------------------- frames (the hub's side)

    @property
    def queued(self) -> int:
        return len(self._frames)

    def has_room(self) -> bool:
        # The frame being sent counts: the next one is encoded when the sender comes back for it, from the
        # newest picture then, instead of waiting encoded (and growing stale) behind it.
        return len(self._frames) + self._sending < self.hub.options.capacity

    def push(self, frame: Frame) -> None:
        self._frames.append(frame)
        self._ready.set()

    def end(self, reason: str) -> None:
        """No frames will come any more: :meth:`next_frame` raises DisplayClosed once the queue is empty."""
        if self.closed_reason is None:
            self.closed_reason = reason
        self._ready.set()

    def use_codec(self, codec: Codec) -> None:
        """Switch to ``codec`` (H.264 falls back to JPEG for a screen size libx264 refuses); a full frame next."""
        self.codec = codec
        self.damage.mark_all()

    # ------------------------------------------------------------------------------- frames (the sender's side)

    async def next_frame(self) -> Frame:
        """The next frame to send (the previous one is taken as sent); raises DisplayClosed when the display
        went away."""
        if self._sending:
            self._sending = 0
            self.hub.wake()  # room again
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
        self.damage.mark_all()
        self.needs_keyframe, self.catching_up = True, False
        self.hub.wake()

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
