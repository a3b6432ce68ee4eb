"""H.264 for a VM's display: libx264 through PyAV, one encoder per screen size, shared by every viewer.

Why: a JPEG per changed tile costs bytes in proportion to what changed, every time; H.264 codes a moving
picture against the previous one, which is what full-screen motion (games, video) needs over a real
network. The browser decodes it with WebCodecs (``VideoDecoder``, hardware where it has it).

Settings are for interactive use, not for archiving: ``ultrafast`` + ``zerolatency`` (no B-frames, no
look-ahead, no frame delay: each picture in gives its access unit out at once), Constrained Baseline (every
WebCodecs decoder takes it), a constant-quality target (CRF) so a still screen costs almost nothing and
motion gets the bits it needs, and a keyframe only when asked (a new viewer, a viewer that skipped frames)
or every ``keyframe_interval`` pictures so a lost one heals.

The output is Annex B (start codes, SPS/PPS repeated before each keyframe): a client configures its decoder
without out-of-band data, from the first keyframe (display.js reads the RFC 6381 name, ``avc1.PPCCLL``, for
WebCodecs' ``VideoDecoder`` from the SPS).

:class:`H264Codec` is the hub's H.264 codec: when it codes a picture, and when a keyframe.
"""

from __future__ import annotations

import asyncio
import fractions
import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

from vgpuctl.service.stream.codec import Codec, Frame, h264_message

if TYPE_CHECKING:
    from vgpuctl.service.stream.hub import DisplayHub

log = logging.getLogger(__name__)

KEYFRAME_INTERVAL = 300  # pictures; ~10 s at QEMU's ~30 updates/s
CATCH_UP_KEYFRAME_S = 0.5
"""At most one keyframe per this many seconds for viewers that skipped pictures (a keyframe is 10-50x a
delta; on a link too slow for the deltas, a keyframe per skip would only make it slower)."""


class H264Unavailable(RuntimeError):
    """PyAV or its libx264 is missing: the stream falls back to JPEG."""


@dataclass(frozen=True)
class AccessUnit:
    """One coded picture (Annex B) and whether a decoder can start from it."""

    data: bytes
    keyframe: bool


def available() -> bool:
    try:
        import av
    except ImportError:
        return False
    return "libx264" in av.codecs_available


class H264Encoder:
    """BGRX pictures of one size in, Annex B access units out (one per picture, none held back)."""

    def __init__(self, width: int, height: int, *, pixel_format: str = "bgra", crf: int = 23,
                 keyframe_interval: int = KEYFRAME_INTERVAL) -> None:
        try:
            import av
        except ImportError as error:
            raise H264Unavailable("PyAV is not installed (pip install av)") from error
        if width % 2 or height % 2:
            # 4:2:0 needs even sizes; guests practically always use them. Odd ones are refused, not padded.
            raise H264Unavailable(f"H.264 4:2:0 needs an even screen size, not {width}x{height}")
        self.width, self.height = width, height
        self.pixel_format = pixel_format
        self._av = av
        context: Any = av.CodecContext.create("libx264", "w")
        context.width, context.height = width, height
        context.pix_fmt = "yuv420p"
        context.time_base = fractions.Fraction(1, 1000)
        context.options = {"preset": "ultrafast", "tune": "zerolatency", "profile": "baseline",
                           "crf": str(crf), "repeat-headers": "1", "annexb": "1",
                           "keyint": str(keyframe_interval), "scenecut": "0"}
        self._context = context
        self._pts = 0
        self.pictures = 0

    def encode(self, picture: npt.NDArray[np.uint8], keyframe: bool = False) -> AccessUnit:
        """Code one ``height x width x 4`` picture in ``pixel_format`` (the RFB framebuffer as it is)."""
        # Wrapped, not copied (8 MB at 1080p, ~4 ms): libx264 gets its own 4:2:0 copy when it is converted.
        if not picture.flags.c_contiguous:  # a view with gaps (a crop): wrapping needs one block of rows
            picture = np.ascontiguousarray(picture)
        frame: Any = self._av.VideoFrame.from_numpy_buffer(picture, format=self.pixel_format)
        frame.pts = self._pts
        self._pts += 33  # timestamps only order the pictures here; the stream is shown as it arrives
        if keyframe or self.pictures == 0:
            frame.pict_type = self._av.video.frame.PictureType.I
        packets = self._context.encode(frame)
        self.pictures += 1
        data = b"".join(bytes(p) for p in packets)
        return AccessUnit(data, any(p.is_keyframe for p in packets))



class H264Codec:
    """Whole pictures for the hub's H.264 viewers, from one encoder (made for the current screen size at the
    first picture) shared by all of them.

    A picture is coded when QEMU has finished a new one (never a half-received one: a delta cannot be taken back)
    or a viewer needs a keyframe to start from, and only when some viewer can take it. A viewer without room
    skips the picture; since the next delta would not decode for it, it waits for a keyframe — which the viewers
    in step then get too (one encode for all). Those keyframes come at most every CATCH_UP_KEYFRAME_S; a new
    viewer, or one that asked for a refresh, gets one at once."""

    def __init__(self, hub: DisplayHub) -> None:
        self.hub = hub
        self.encoder: H264Encoder | None = None
        self._picture = -1  # hub.stats.pictures when the last picture was coded
        self._keyframe_at = 0.0  # time.monotonic() of the last keyframe
        self._timer: asyncio.TimerHandle | None = None  # a catch-up keyframe that is due later

    @staticmethod
    def available() -> bool:
        return available()

    async def serve(self) -> None:
        hub = self.hub
        watching = [v for v in hub.viewers if v.codec == Codec.H264]
        if not watching or hub.rfb is None:
            return
        # Every picture coded goes to every H.264 viewer that can take it, or that viewer is out of step
        # (the next delta refers to a picture it does not have) until its next keyframe.
        fresh = hub.stats.pictures != self._picture
        wait = CATCH_UP_KEYFRAME_S - (time.monotonic() - self._keyframe_at)
        if any(v.catching_up and v.has_room() for v in watching) and wait > 0 and self._timer is None:
            def due() -> None:
                self._timer = None
                hub.wake()

            self._timer = asyncio.get_running_loop().call_later(wait, due)  # serve it then, moving or not
        takers = [v for v in watching if v.has_room() and not (v.catching_up and wait > 0)]
        if not takers:  # nobody can take a picture now (e.g. the only viewer is still sending the last one):
            return      # code none, or it would be lost to them; the newest is coded when one is ready
        keyframe = any(v.needs_keyframe for v in takers)
        if not (fresh or keyframe):
            return
        assert hub.pool is not None
        fb = hub.rfb.framebuffer
        height, width = fb.shape[:2]
        if self.encoder is None or (self.encoder.width, self.encoder.height) != (width, height):
            try:
                self.encoder = H264Encoder(width, height, pixel_format=_av_format(hub.rfb.pixel_format.colorspace))
            except H264Unavailable as exc:  # e.g. an odd screen size: these viewers get JPEG instead
                log.warning("display %s: H.264 unavailable (%s), sending JPEG", hub.socket_path, exc)
                for viewer in watching:
                    viewer.use_codec(Codec.JPEG)
                return
            for viewer in watching:
                viewer.needs_keyframe = True
        self._picture = hub.stats.pictures
        captured = hub.captured_us
        started = time.perf_counter()
        unit = await asyncio.get_running_loop().run_in_executor(hub.pool, self.encoder.encode, fb, keyframe)
        elapsed = (time.perf_counter() - started) * 1000
        screen = (width, height)
        frame = Frame((h264_message(screen, unit.keyframe, captured, unit.data),), hub.next_seq(),
                      ((0, 0, width, height),), screen, captured, elapsed)
        hub.stats.count_encode(frame)
        hub.stats.h264_pictures += 1
        hub.stats.h264_keyframes += unit.keyframe
        if unit.keyframe:
            self._keyframe_at = time.monotonic()
        for viewer in hub.viewers:
            if viewer.codec != Codec.H264:
                continue
            if viewer.has_room() and (unit.keyframe or not viewer.needs_keyframe):
                viewer.damage.clear()
                viewer.needs_keyframe = viewer.catching_up = False
                hub.deliver(frame, viewer)
            elif not viewer.needs_keyframe:  # it skips this picture: the deltas after it would not decode
                viewer.needs_keyframe = viewer.catching_up = True

    def close(self) -> bool:
        had = self.encoder is not None
        self.encoder = None  # libx264's 30-50 MB and its threads
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        return had


def _av_format(colorspace: str | None) -> str:
    """PyAV's name for the framebuffer's byte order (the RFB client asks QEMU for 32-bit BGRX or RGBX)."""
    return {"BGRX": "bgra", "BGRA": "bgra", "RGBX": "rgba", "RGBA": "rgba"}.get(colorspace or "", "bgra")
