"""H.264 viewers of the display hub, on real QEMU with the test guest (TCG): the stream decodes (PyAV's
FFmpeg decoder standing in for the browser's WebCodecs) to the guest's picture, every viewer starts at a
keyframe, and JPEG and H.264 viewers share one connection to QEMU."""

from __future__ import annotations

import asyncio
import struct
import time
from collections.abc import Iterator
from typing import Any

import av
import numpy as np
import pytest

from tests.conftest import Vm, close_enough, dominant_rgb, frame_within, running_vm
from vgpuctl.service.stream.hub import KIND_H264, KIND_JPEG, DisplayHub, Frame, StreamOptions
from vgpuctl.vm.testguest import build_test_guest


@pytest.fixture
def vm() -> Iterator[Vm]:
    with running_vm(build_test_guest()) as running:
        yield running


class Player:
    """One viewer's decoder: H.264 access units in, RGB pictures out, as display.js does with WebCodecs."""

    def __init__(self) -> None:
        self.decoder: Any = None
        self.rgb = np.zeros((0, 0, 3), np.uint8)
        self.keyframes = 0
        self.pictures = 0

    def play(self, frame: Frame) -> None:
        (message,) = frame.messages
        assert message[0] == KIND_H264
        width, height, flags, _captured = struct.unpack(">HHBQ", message[1:14])
        keyframe = bool(flags & 1)
        if self.decoder is None:
            assert keyframe, "a viewer's first H.264 picture must be a keyframe"
            self.decoder = av.CodecContext.create("h264", "r")
            self.decoder.thread_count = 1  # no frame threading: each access unit gives its picture at once
        self.keyframes += keyframe
        pictures = self.decoder.decode(av.Packet(message[14:]))
        assert len(pictures) == 1, "every access unit is one whole picture, out at once"
        self.rgb = pictures[0].to_ndarray(format="rgb24")
        assert self.rgb.shape == (height, width, 3)
        self.pictures += 1


def test_an_h264_viewer_starts_at_a_keyframe_and_sees_the_guest(vm: Vm) -> None:
    async def scenario() -> None:
        hub = DisplayHub(vm.paths.vnc_socket)
        viewer = await hub.subscribe("h264")
        player = Player()
        try:
            first = await frame_within(viewer)
            assert first.full and first.screen == (1024, 768)
            player.play(first)
            assert player.keyframes == 1 and dominant_rgb(player.rgb) == "b"
            assert close_enough(player.rgb, await vm.screendump()) > 0.85
            # It did not read during the screendump and skipped pictures: one keyframe to catch up, then deltas.
            for _ in range(12):
                player.play(await frame_within(viewer))
            assert player.keyframes <= 2 and player.pictures == 13
            assert sum(len(m) for m in first.messages) > 3 * len((await frame_within(viewer)).messages[0])
            assert await viewer.key("KeyA", "a", True) and await viewer.key("KeyA", "a", False)
            deadline = time.monotonic() + 10
            while dominant_rgb(player.rgb) != "r":
                assert time.monotonic() < deadline, "the H.264 picture did not turn red"
                player.play(await frame_within(viewer))
        finally:
            await viewer.close()
        assert hub.stats.h264_pictures >= 12 and hub.stats.connections == 1

    asyncio.run(scenario())


def test_newcomers_and_slow_viewers_get_keyframes_and_share_the_encode(vm: Vm) -> None:
    async def scenario() -> None:
        hub = DisplayHub(vm.paths.vnc_socket, StreamOptions(capacity=1))
        fast, jpeg = await hub.subscribe("h264"), await hub.subscribe("jpeg")
        fast_player = Player()
        for _ in range(5):
            fast_player.play(await frame_within(fast))
        slow = await hub.subscribe("h264")  # joins late, then does not read for a while
        slow_player = Player()
        started = time.monotonic()
        seen_by_fast: set[int] = set()
        while time.monotonic() - started < 1.5:
            frame = await frame_within(fast)
            seen_by_fast.add(frame.seq)
            fast_player.play(frame)
            assert slow.queued <= 1
        stale = await frame_within(slow)  # what it got when it joined: a keyframe
        slow_player.play(stale)
        caught_up = await frame_within(slow)  # it skipped pictures, so the next one is a keyframe again
        assert struct.unpack(">B", caught_up.messages[0][5:6])[0] & 1
        slow_player.play(caught_up)
        for _ in range(5):
            frame = await frame_within(slow)
            slow_player.play(frame)
        # The keyframe the slow viewer needed went to the fast one too: one encode for both.
        assert fast_player.keyframes >= 2
        assert hub.stats.connections == 1 and (await frame_within(jpeg)).messages[0][0] == KIND_JPEG
        assert hub.stats.h264_keyframes <= 4
        for viewer in (fast, slow, jpeg):
            await viewer.close()

    asyncio.run(scenario())


def test_a_lone_viewer_that_reads_slowly_never_falls_out_of_step(vm: Vm) -> None:
    async def scenario() -> None:
        hub = DisplayHub(vm.paths.vnc_socket)
        viewer = await hub.subscribe("h264")
        player = Player()
        try:
            for _ in range(10):
                player.play(await frame_within(viewer))
                await asyncio.sleep(0.1)  # ~3 of QEMU's pictures go by: none is coded while it cannot take one
        finally:
            await viewer.close()
        assert player.keyframes == 1 and player.pictures == 10
        assert hub.stats.h264_pictures <= 11  # coded only for it, when it was ready

    asyncio.run(scenario())
