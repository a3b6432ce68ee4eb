"""A display stream's numbers, kept in one place (:class:`HubStats`, one per hub): the hub and its codecs count
into it, :class:`RateMeter` derives the per-second rate from it, and what reports them reads it —
``HubRegistry.stats()`` all of it, :mod:`vgpuctl.service.metrics` the rate (``vgpuctl_stream_fps``,
``vgpuctl_stream_viewers``), which the hub of a named VM copies there each second."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from vgpuctl.service.stream.codec import Frame
    from vgpuctl.service.stream.rfb import Update


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
    fps: float = 0.0
    """Pictures per second the fastest viewer got over the last second (:class:`RateMeter`)."""
    viewers: int = 0
    """Viewers at the last second's count."""

    def count_update(self, update: Update) -> None:
        self.updates += 1
        self.read_ms += (update.finished - update.started) * 1000

    def count_encode(self, frame: Frame) -> None:
        self.encodes += 1
        self.encode_ms += frame.encode_ms
        self.encoded_bytes += frame.size


class RateMeter:
    """Sets ``fps`` and ``viewers`` of a :class:`HubStats` once a second from the frames each viewer has taken.

    A frame is one whole picture; fps is capped by the pictures QEMU produced in the same second (a viewer's
    first frame or a refresh repeats a picture). A viewer counts from its second sample on."""

    def __init__(self, stats: HubStats) -> None:
        self.stats = stats
        self._seen: dict[int, int] = {}
        self._pictures = stats.pictures

    def sample(self, frames_by_viewer: dict[int, int]) -> None:
        """``frames_by_viewer``: frames taken so far by each viewer (by any key that stays the viewer's)."""
        got = max((n - self._seen.get(key, n) for key, n in frames_by_viewer.items()), default=0)
        self.stats.fps = float(min(got, self.stats.pictures - self._pictures))
        self.stats.viewers = len(frames_by_viewer)
        self._seen, self._pictures = frames_by_viewer, self.stats.pictures
