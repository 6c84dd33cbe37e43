"""Frames converted to YUV 4:2:0 where they are upscaled (the GPU path) against ffmpeg's own conversion."""

import subprocess

import numpy as np
import pytest
import torch

from conftest import decode_frames, ffmpeg, make_tiny_model, psnr, streams_of
from echoshot_ai_server.app.pipeline import upscale_video
from echoshot_ai_server.engine.colour import LUMA_WEIGHTS, rgb_to_i420
from echoshot_ai_server.engine.upscaler import RunProfile, Upscaler
from echoshot_ai_server.media.probe import colour_of
from echoshot_ai_server.media.rawstream import TimedFrames
from echoshot_ai_server.media.reader import SCALE_FLAGS
from echoshot_ai_server.media.writer import EncoderSettings, FrameWriter

LOSSLESS = EncoderSettings(crf=0)  # x264 at CRF 0 keeps 8-bit 4:2:0 planes exactly


def natural_rgb(width: int = 320, height: int = 240) -> np.ndarray:
    """A frame with edges, gradients and grain (ffmpeg's Mandelbrot with noise), RGB uint8."""
    raw = subprocess.run(["ffmpeg", "-v", "error", "-f", "lavfi", "-i", f"mandelbrot=size={width}x{height}",
                          "-vf", "noise=alls=20:allf=t", "-frames:v", "1", "-f", "rawvideo", "-pix_fmt", "rgb24", "-"],
                         capture_output=True, check=True).stdout
    return np.frombuffer(raw, np.uint8).reshape(height, width, 3)


def ffmpeg_i420(rgb: np.ndarray, matrix: str) -> np.ndarray:
    """What the encoder's scale filter made of RGB frames before: the writer's own settings."""
    height, width, _ = rgb.shape
    raw = subprocess.run(["ffmpeg", "-v", "error", "-f", "rawvideo", "-pix_fmt", "rgb24", "-s", f"{width}x{height}",
                          "-i", "-", "-vf", f"scale=out_color_matrix={matrix}:out_range=tv:flags={SCALE_FLAGS},"
                          "format=yuv420p", "-f", "rawvideo", "-"], input=rgb.tobytes(), capture_output=True,
                         check=True).stdout
    return np.frombuffer(raw, np.uint8).reshape(height * 3 // 2, width)


def planes(i420: np.ndarray, height: int) -> tuple[np.ndarray, np.ndarray]:
    """(luma, both chroma planes) of I420 frames (..., H * 3 / 2, W)."""
    return i420[..., :height, :], i420[..., height:, :]


@pytest.mark.parametrize("matrix", sorted(LUMA_WEIGHTS))
def test_conversion_is_ffmpegs_within_a_level_or_two(matrix):
    rgb = natural_rgb()
    ours = rgb_to_i420(torch.from_numpy(rgb.copy()).permute(2, 0, 1)[None].float(), matrix)[0].numpy()
    reference = ffmpeg_i420(rgb, matrix)

    luma, chroma = planes(ours.astype(int), 240)
    ref_luma, ref_chroma = planes(reference.astype(int), 240)
    assert np.abs(luma - ref_luma).max() <= 1
    assert np.abs(chroma - ref_chroma).max() <= 5
    assert psnr(chroma, ref_chroma) >= 50, "the chroma filter is not ffmpeg's"


def test_odd_sizes_are_refused():
    with pytest.raises(ValueError, match="even size"):
        rgb_to_i420(torch.zeros(1, 3, 5, 4), "bt709")


def decode_i420(path) -> np.ndarray:
    video = streams_of(path, "video")[0]
    raw = subprocess.run(["ffmpeg", "-v", "error", "-i", str(path), "-f", "rawvideo", "-pix_fmt", "yuv420p", "-"],
                         capture_output=True, check=True).stdout
    return np.frombuffer(raw, np.uint8).reshape(-1, int(video["height"]) * 3 // 2, int(video["width"]))


def test_the_encoder_takes_converted_frames_as_they_are(tmp_path):
    frames = np.random.default_rng(0).integers(16, 236, (3, 72, 64), dtype=np.uint8)  # 64x48, I420
    out = tmp_path / "out.mp4"
    colour = colour_of({"color_space": "bt709", "color_primaries": "bt709", "color_transfer": "bt709"}, 64, 48)
    with FrameWriter(out, width=64, height=48, timescale=10, encoder=LOSSLESS, colour=colour, yuv_in=True) as writer:
        writer.write(TimedFrames(frames, [0, 1, 2], [1, 1, 1]))

    assert np.array_equal(decode_i420(out), frames)  # no conversion on the way
    video = streams_of(out, "video")[0]
    assert (video["pix_fmt"], video["color_space"], video["color_range"]) == ("yuv420p", "bt709", "tv")


def test_frames_of_the_wrong_layout_are_refused(tmp_path):
    with pytest.raises(ValueError, match=r"expected uint8 frames \(N, \(72, 64\)\)"):
        with FrameWriter(tmp_path / "o.mp4", width=64, height=48, timescale=10, encoder=LOSSLESS,
                         colour=colour_of({}, 64, 48), yuv_in=True) as writer:
            writer.write(TimedFrames(np.zeros((1, 48, 64, 3), np.uint8), [0], [1]))
    with pytest.raises(ValueError, match="8-bit"):
        FrameWriter(tmp_path / "o.mp4", width=64, height=48, timescale=10, encoder=LOSSLESS,
                    colour=colour_of({}, 64, 48), bits=10, yuv_in=True)


def tiny(yuv: bool) -> Upscaler:
    return Upscaler(make_tiny_model(), device="cpu", profile=RunProfile(tile=0, tile_pad=4, fallback_tile=0,
                    batch_frames=2, resize_on_device=True, yuv_on_device=yuv))


def test_deep_frames_or_a_host_resize_cannot_come_back_as_yuv():
    deep = np.zeros((1, 8, 8, 3), np.uint16)
    with pytest.raises(ValueError, match="8-bit"):
        tiny(True).upscale(deep, 4, yuv_matrix="bt709")
    host_resize = Upscaler(make_tiny_model(), device="cpu", profile=RunProfile(tile=0, tile_pad=4, fallback_tile=0))
    with pytest.raises(ValueError, match="resize on the device"):
        host_resize.upscale(np.zeros((1, 8, 8, 3), np.uint8), 2, yuv_matrix="bt709")


@pytest.mark.parametrize("tags, scale", [((), 4), (("-colorspace", "bt709", "-color_primaries", "bt709",
                                                     "-color_trc", "bt709"), 2)])
def test_a_job_converted_on_the_device_is_the_job_converted_by_ffmpeg(tmp_path, tags, scale):
    # Given a clip with or without colour tags (untagged and this small: BT.601)
    source = tmp_path / "src.mp4"
    ffmpeg("-f", "lavfi", "-i", "mandelbrot=size=48x32:rate=10,noise=alls=10:allf=t", "-frames:v", "5",
           "-c:v", "libx264", "-pix_fmt", "yuv420p", *tags, str(source))

    # When the same job runs with frames converted where they are upscaled and with ffmpeg converting
    outputs = {}
    for yuv in (True, False):
        outputs[yuv] = tmp_path / f"out-{yuv}.mp4"
        upscaler = tiny(yuv)
        result = upscale_video(source, outputs[yuv], scale=scale, device="cpu", get_upscaler=lambda: upscaler,
                               encoder=LOSSLESS)
        assert result.metadata.frame_count == 5

    # Then the encoded planes differ by ffmpeg's rounding only, the tags and times are the same, and
    # a player shows the same picture
    height = 32 * scale
    ours, theirs = decode_i420(outputs[True]), decode_i420(outputs[False])
    assert ours.shape == theirs.shape == (5, height * 3 // 2, 48 * scale)
    assert np.abs(planes(ours.astype(int), height)[0] - planes(theirs.astype(int), height)[0]).max() <= 1
    assert psnr(planes(ours, height)[1], planes(theirs, height)[1]) >= 48
    stream = {yuv: streams_of(path, "video")[0] for yuv, path in outputs.items()}
    for key in ("color_space", "color_primaries", "color_transfer", "color_range", "r_frame_rate", "duration"):
        assert stream[True].get(key) == stream[False].get(key), key
    assert psnr(decode_frames(outputs[True]), decode_frames(outputs[False])) >= 45


def test_timescales_survive_the_yuv_layout(tmp_path):
    """Frame times of a variable frame rate go through the converted layout as through RGB."""
    out = tmp_path / "vfr.mp4"
    pts = [0, 3, 4, 9]
    with FrameWriter(out, width=64, height=48, timescale=30, encoder=LOSSLESS, colour=colour_of({}, 64, 48),
                     yuv_in=True) as writer:
        writer.write(TimedFrames(np.full((4, 72, 64), 128, np.uint8), pts, [3, 1, 5, 3]))
    times = subprocess.run(["ffprobe", "-v", "error", "-select_streams", "v:0", "-show_entries", "frame=pts_time",
                            "-of", "csv=p=0", str(out)], capture_output=True, text=True, check=True).stdout.split()
    assert [round(float(t.strip(",")) * 30) for t in times] == pts
