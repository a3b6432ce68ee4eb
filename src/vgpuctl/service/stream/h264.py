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
"""

from __future__ import annotations

import fractions
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

KEYFRAME_INTERVAL = 300  # pictures; ~10 s at QEMU's ~30 updates/s


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

