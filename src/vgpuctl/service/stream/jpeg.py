"""JPEG for a VM's display: the changed tiles as JPEG rectangles, then a frame-end marker.

The hub's JPEG viewers with room are grouped by identical pending tiles — all viewers that keep up have the
same ones, so they share one encode — and for each group the tiles become rectangles (:func:`~.damage.mask_rects`),
encoded with simplejpeg on the hub's encode threads from the live framebuffer. A slow viewer is not served: its
damage keeps growing, and when it has room again it gets one frame with everything it missed.
"""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING

import simplejpeg

from vgpuctl.service.stream.codec import Codec, Frame, Rect, StreamOptions, frame_end_message, jpeg_message
from vgpuctl.service.stream.damage import Mask, mask_rects
from vgpuctl.service.stream.rfb import Framebuffer

if TYPE_CHECKING:
    from vgpuctl.service.stream.hub import DisplayHub
    from vgpuctl.service.stream.viewer import Viewer


class JpegCodec:
    def __init__(self, hub: DisplayHub) -> None:
        self.hub = hub

    @staticmethod
    def available() -> bool:
        return True

    async def serve(self) -> None:
        groups: dict[bytes, list[Viewer]] = {}
        for viewer in self.hub.viewers:
            if viewer.codec == Codec.JPEG and viewer.has_room() and viewer.damage.any():
                groups.setdefault(viewer.damage.key(), []).append(viewer)
        for members in groups.values():
            mask = members[0].damage.take()
            for viewer in members[1:]:
                viewer.damage.clear()
            frame = await self._encode(mask)
            if frame is None:  # the screen was resized meanwhile: the new damage is all of it anyway
                continue
            for viewer in members:
                self.hub.deliver(frame, viewer)

    async def _encode(self, mask: Mask) -> Frame | None:
        hub = self.hub
        assert hub.rfb is not None and hub.pool is not None
        fb = hub.rfb.framebuffer
        height, width = fb.shape[:2]
        if mask.shape != hub.grid():
            return None
        opts = hub.options
        rects = mask_rects(mask, opts.tile, width, height, opts.max_rect_pixels)
        colorspace = hub.rfb.pixel_format.colorspace
        assert colorspace is not None
        loop = asyncio.get_running_loop()
        started = time.perf_counter()
        captured = hub.captured_us
        jpegs = await asyncio.gather(*(loop.run_in_executor(hub.pool, _encode_rect, fb, rect, opts, colorspace)
                                       for rect in rects))
        elapsed = (time.perf_counter() - started) * 1000
        screen = (width, height)
        messages = [jpeg_message(rect, screen, jpeg) for rect, jpeg in zip(rects, jpegs, strict=True)]
        messages.append(frame_end_message(captured))
        frame = Frame(tuple(messages), hub.next_seq(), tuple(rects), screen, captured, elapsed)
        hub.stats.count_encode(frame)
        return frame

    def close(self) -> bool:
        return False  # nothing of its own: the encode threads are the hub's


def _encode_rect(fb: Framebuffer, rect: Rect, opts: StreamOptions, colorspace: str) -> bytes:
    x, y, w, h = rect
    data: bytes = simplejpeg.encode_jpeg(fb[y:y + h, x:x + w], opts.quality, colorspace, opts.subsampling,
                                         opts.fastdct)
    return data
