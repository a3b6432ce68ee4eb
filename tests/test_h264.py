"""The H.264 encoder of the display stream (libx264 through PyAV): what it codes decodes back to the
picture, keyframes come when asked, and the stream tells a WebCodecs client how to configure itself."""

from __future__ import annotations

import av
import numpy as np
import pytest

from vgpuctl.service.stream.h264 import H264Encoder, H264Unavailable, available

WIDTH, HEIGHT = 320, 240


def picture(step: int) -> np.ndarray:
    """BGRX like the RFB framebuffer: a gradient that moves with ``step`` and a block that changes colour."""
    image = np.zeros((HEIGHT, WIDTH, 4), np.uint8)
    image[:, :, 0] = (np.arange(WIDTH)[None, :] + 4 * step) % 256
    image[:, :, 1] = np.arange(HEIGHT)[:, None] % 256
    image[40:120, 40:120, 2] = 60 * step % 256
    return image


def codec_string(access_unit: bytes) -> str | None:
    """``avc1.PPCCLL`` from the first SPS (NAL type 7) of an Annex B unit, as display.js's avcCodec reads it."""
    start = 0
    while (at := access_unit.find(b"\x00\x00\x01", start)) >= 0 and at + 7 <= len(access_unit):
        if access_unit[at + 3] & 0x1F == 7:
            return "avc1." + access_unit[at + 4:at + 7].hex()
        start = at + 3
    return None


def decode(units: list[bytes]) -> list[np.ndarray]:
    decoder = av.CodecContext.create("h264", "r")
    frames = []
    for unit in [*units, None]:  # None: the parser holds the last unit until it sees the stream end
        for packet in decoder.parse(unit):
            frames += [f.to_ndarray(format="bgra") for f in decoder.decode(packet)]
    frames += [f.to_ndarray(format="bgra") for f in decoder.decode(None)]
    return frames


def test_pictures_decode_back_close_to_what_was_coded() -> None:
    assert available()
    encoder = H264Encoder(WIDTH, HEIGHT)
    units = [encoder.encode(picture(step)) for step in range(6)]
    assert units[0].keyframe and not any(u.keyframe for u in units[1:])  # one keyframe, then P pictures
    assert all(u.data for u in units)  # zerolatency: every picture comes out at once, none held back
    assert sum(len(u.data) for u in units[1:]) < len(units[0].data) * 3  # motion costs less than pictures
    decoded = decode([u.data for u in units])
    assert len(decoded) == 6
    for step, image in enumerate(decoded):
        error = np.abs(image[:, :, :3].astype(int) - picture(step)[:, :, :3].astype(int)).mean()
        assert error < 4, f"picture {step}: mean error {error:.1f}"


def test_a_keyframe_comes_when_asked_and_a_decoder_can_start_there() -> None:
    encoder = H264Encoder(WIDTH, HEIGHT)
    units = [encoder.encode(picture(step), keyframe=step == 4) for step in range(7)]
    assert [u.keyframe for u in units] == [True, False, False, False, True, False, False]
    late_joiner = decode([u.data for u in units[4:]])  # a viewer that joins at the asked-for keyframe
    assert len(late_joiner) == 3
    assert np.abs(late_joiner[0][:, :, :3].astype(int) - picture(4)[:, :, :3].astype(int)).mean() < 4


def test_codec_string_comes_from_the_keyframes_sps() -> None:
    encoder = H264Encoder(WIDTH, HEIGHT)
    first = encoder.encode(picture(0)).data
    name = codec_string(first)
    assert name is not None and name.startswith("avc1.42")  # Constrained Baseline: profile_idc 66
    assert codec_string(encoder.encode(picture(1)).data) is None  # P pictures carry no SPS
    assert codec_string(b"\x00\x00\x01") is None


def test_odd_sizes_are_refused_with_a_reason() -> None:
    with pytest.raises(H264Unavailable, match="even"):
        H264Encoder(641, 480)


def test_a_cropped_view_is_coded_too() -> None:
    encoder = H264Encoder(WIDTH // 2, HEIGHT)
    view = picture(0)[:, : WIDTH // 2]  # not one block of memory
    assert not view.flags.c_contiguous
    (decoded,) = decode([encoder.encode(view).data])
    assert np.abs(decoded[:, :, :3].astype(int) - view[:, :, :3].astype(int)).mean() < 4
