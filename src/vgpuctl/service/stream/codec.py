"""What a display hub sends its viewers (frames of wire messages, ``PROTOCOL.md``) and the protocol its codecs
implement: one class per codec (:class:`~.jpeg.JpegCodec`, :class:`~.h264.H264Codec`), one object of each per hub,
chosen by :class:`Codec` (the hub's registry, ``hub.CODEC_CLASSES``)."""

from __future__ import annotations

import struct
from dataclasses import dataclass
from enum import StrEnum
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from vgpuctl.service.stream.hub import DisplayHub

KIND_JPEG = 1
KIND_FRAME_END = 2
KIND_H264 = 3
_JPEG_HEADER = struct.Struct(">BHHHHHH")
_FRAME_END = struct.Struct(">BQ")
_H264_HEADER = struct.Struct(">BHHBQ")  # kind, screen_w, screen_h, flags (bit 0: keyframe), captured_us

Rect = tuple[int, int, int, int]


class Codec(StrEnum):
    """How a viewer gets its pictures (``?codec=`` of the display WebSocket)."""

    JPEG = "jpeg"
    """The changed tiles as JPEG rectangles."""
    H264 = "h264"
    """Whole pictures from one libx264 encoder shared by the hub's H.264 viewers."""

    @classmethod
    def parse(cls, name: str) -> Codec:
        try:
            return cls(name)
        except ValueError:
            raise ValueError(f"codec must be one of {', '.join(CODECS)}, not {name!r}") from None


CODECS = tuple(codec.value for codec in Codec)


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
    """The messages of one frame for the wire: JPEG rectangles then the frame-end marker, or one H.264 picture."""

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


class StreamCodec(Protocol):
    """One codec of one hub: it reads the hub's picture and viewers through the hub's public methods, and hands
    each frame it codes to :meth:`DisplayHub.deliver`."""

    def __init__(self, hub: DisplayHub) -> None: ...

    @staticmethod
    def available() -> bool:
        """Whether this process can code it (H.264 needs PyAV with libx264); a viewer asking for one that is
        not gets JPEG."""
        ...

    async def serve(self) -> None:
        """Code a frame for the hub's viewers of this codec that have room and something to get, if any."""
        ...

    def close(self) -> bool:
        """Let go of encoders and timers now (the hub has closed); True if that freed something large."""
        ...
