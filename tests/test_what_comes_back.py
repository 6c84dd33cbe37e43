"""What comes back is what was sent, only sharper: colour as a player shows it, display aspect,
timing (start offsets, variable frame rates, duration), every audio stream, the containers and
codecs phones, editors and streaming tools produce, 10-bit and HDR. Real ffmpeg on generated clips.

The colour tests upscale by repeating pixels, so that any change of colour is the pipeline's."""

import json
import subprocess

import numpy as np
import pytest

from conftest import ffmpeg, ffprobe_json, streams_of, tiny_upscaler
from echoshot_ai_server.app.pipeline import upscale_video
from echoshot_ai_server.errors import ErrorCode, PermanentError
from echoshot_ai_server.media.writer import EncoderSettings

PLAYER_MATRICES = {"bt709": "bt709", "smpte170m": "smpte170m", "bt470bg": "bt470", "bt2020nc": "bt2020"}


class PixelRepeat:
    """An upscaler that repeats each pixel: exactly the source's colours, only bigger."""

    device, batch_frames, yuv_on_device = "cpu", 4, False

    def describe(self) -> str:
        return "Device: CPU, pixel repeat"

    def upscale(self, frames, scale):
        return frames.repeat(scale, axis=1).repeat(scale, axis=2)


def upscale(source, tmp_path, upscaler=None, scale=2, name="out.mp4", encoder=EncoderSettings(), **kwargs):
    output = tmp_path / name
    result = upscale_video(source, output, scale=scale, device="cpu", get_upscaler=lambda: upscaler or PixelRepeat(),
                           encoder=encoder, **kwargs)
    return output, result


def video_stream(path) -> dict:
    return streams_of(path, "video")[0]


def as_a_player_shows(path) -> np.ndarray:
    """RGB frames as a player shows them: with the file's colour tags, or, untagged, BT.709 from
    720 lines up and BT.601 below, limited range unless tagged full."""
    video = video_stream(path)
    w, h = int(video["width"]), int(video["height"])
    matrix = video.get("color_space")
    matrix = PLAYER_MATRICES.get(matrix, "bt709" if h >= 720 or w >= 1280 else "smpte170m")
    full = video.get("color_range") == "pc" or video.get("pix_fmt", "").startswith("yuvj")
    raw = subprocess.run(
        ["ffmpeg", "-nostdin", "-loglevel", "error", "-i", str(path), "-vf",
         f"scale=in_color_matrix={matrix}:in_range={'pc' if full else 'tv'},format=rgb24", "-f", "rawvideo", "-"],
        check=True, capture_output=True).stdout
    return np.frombuffer(raw, np.uint8).reshape(-1, h, w, 3)


def blocks(frames: np.ndarray, block: int) -> np.ndarray:
    n, h, w, c = frames.shape
    return frames[:, : h // block * block, : w // block * block].reshape(n, h // block, block, w // block, block, c)


def assert_same_colours(source, output, scale=2, smooth=2.0):
    """Colour as a player shows it, compared on the flat parts of the picture: the middle of each
    flat 8x8 patch. At edges, 4:2:0 chroma smears colours over a pixel or two either way (the
    source's as much as the result's), which is not what this is about."""
    seen = blocks(as_a_player_shows(source).astype(float), 8)
    got = blocks(as_a_player_shows(output).astype(float), 8 * scale)
    flat = seen.std(axis=(2, 4)).max(axis=-1) < smooth
    assert flat.mean() > 0.5  # most of the picture is compared
    middle = seen[:, :, 2:6, :, 2:6].mean(axis=(2, 4)), got[:, :, 2 * scale:6 * scale, :, 2 * scale:6 * scale].mean(axis=(2, 4))
    difference = np.abs(middle[0] - middle[1])[flat]
    assert np.median(difference) <= 1 and difference.max() <= 5, (np.median(difference), difference.max())


def colour_tags(path) -> tuple:
    video = video_stream(path)
    return video.get("color_space"), video.get("color_primaries"), video.get("color_transfer"), video.get("color_range")


# -- colour ----------------------------------------------------------------------------------
def test_sd_colour_bars_come_back_as_a_player_showed_them(tmp_path):
    source = tmp_path / "bars.mp4"
    ffmpeg("-f", "lavfi", "-i", "smptebars=size=480x360:rate=10:duration=0.15", "-c:v", "libx264", "-pix_fmt",
           "yuv420p", str(source))
    assert colour_tags(source) == ("unknown", "unknown", "unknown", "unknown") or colour_tags(source)[0] is None

    output, _ = upscale(source, tmp_path)  # 960x720: HD, which players would read as BT.709 if untagged

    assert colour_tags(output) == ("smpte170m", "smpte170m", "smpte170m", "tv")
    assert_same_colours(source, output)


def test_a_sky_blue_stays_sky_blue(tmp_path):
    source = tmp_path / "sky.mp4"
    ffmpeg("-f", "lavfi", "-i", "color=c=0x28A0C8:size=480x360:rate=10:duration=0.15", "-c:v", "libx264", "-pix_fmt",
           "yuv420p", str(source))
    output, _ = upscale(source, tmp_path)
    shown = as_a_player_shows(output)[0, 300:400, 400:500].reshape(-1, 3).mean(axis=0)
    assert np.abs(shown - [40, 160, 200]).max() <= 3, shown


def test_hd_and_full_range_and_tagged_sources_keep_their_colours(tmp_path):
    hd = tmp_path / "hd.mp4"  # untagged 720p, made the way players read it: BT.709
    ffmpeg("-f", "lavfi", "-i", "smptehdbars=size=1280x720:rate=10:duration=0.05", "-vf", "scale=out_color_matrix=bt709",
           "-c:v", "libx264", "-pix_fmt", "yuv420p", str(hd))
    full = tmp_path / "full.mp4"  # full-range (phones' JPEG-style YUV), tagged so
    ffmpeg("-f", "lavfi", "-i", "testsrc2=size=320x240:rate=10:duration=0.15", "-vf", "scale=out_range=pc",
           "-c:v", "libx264", "-pix_fmt", "yuvj420p", "-color_range", "pc", str(full))
    tagged = tmp_path / "tagged.mp4"  # SD tagged BT.709, as some phones write it
    ffmpeg("-f", "lavfi", "-i", "smptebars=size=320x240:rate=10:duration=0.15", "-vf", "scale=out_color_matrix=bt709",
           "-c:v", "libx264", "-pix_fmt", "yuv420p", "-colorspace", "bt709", "-color_primaries", "bt709",
           "-color_trc", "bt709", str(tagged))
    for source, tags in ((hd, ("bt709", "bt709", "bt709", "tv")), (full, None), (tagged, ("bt709", "bt709", "bt709", "tv"))):
        output, _ = upscale(source, tmp_path, name=f"up-{source.name}")
        if tags:
            assert colour_tags(output) == tags
        assert colour_tags(output)[3] == "tv"  # every result is limited range, and says so
        assert_same_colours(source, output)


def test_a_natural_picture_keeps_its_colours(tmp_path):
    source = tmp_path / "mandelbrot.mp4"  # smooth gradients of many hues: a stand-in for natural footage
    ffmpeg("-f", "lavfi", "-i", "mandelbrot=size=480x360:rate=10", "-frames:v", "2", "-c:v", "libx264",
           "-pix_fmt", "yuv420p", str(source))
    output, _ = upscale(source, tmp_path)
    assert_same_colours(source, output, smooth=4)


# -- display geometry -------------------------------------------------------------------------
def test_the_display_aspect_is_kept(tmp_path):
    source = tmp_path / "anamorphic.mp4"  # 64x48 stored, shown 16:9
    ffmpeg("-f", "lavfi", "-i", "testsrc2=size=64x48:rate=10:duration=0.35", "-vf", "setsar=4/3", "-c:v", "libx264",
           "-pix_fmt", "yuv420p", str(source))
    assert video_stream(source)["display_aspect_ratio"] == "16:9"

    output, result = upscale(source, tmp_path, upscaler=tiny_upscaler())

    video = video_stream(output)
    assert (video["width"], video["height"], video["sample_aspect_ratio"], video["display_aspect_ratio"]) == (
        128, 96, "4:3", "16:9")
    assert (result.metadata.width, result.metadata.height) == (128, 96)


# -- timing -----------------------------------------------------------------------------------
def stream_times(path) -> dict:
    """When each stream starts and ends, as a player lays them out: from the stream's own start and
    duration where the container keeps them, else from its packets."""
    data = json.loads(subprocess.run(
        ["ffprobe", "-v", "error", "-show_entries", "packet=stream_index,pts_time,duration_time",
         "-show_entries", "stream=index,codec_type,start_time,duration", "-of", "json", str(path)],
        check=True, capture_output=True, text=True).stdout)
    times = {}
    for stream in data["streams"]:
        packets = [p for p in data["packets"] if p["stream_index"] == stream["index"]]
        start = float(stream.get("start_time", 0))
        if "duration" in stream:
            end = start + float(stream["duration"])
        else:
            end = max(float(p["pts_time"]) + float(p.get("duration_time") or 0) for p in packets)
        times[stream["codec_type"]] = (start, end)
    return times


@pytest.mark.parametrize("container", ["mp4", "mkv"])
def test_a_video_that_starts_after_its_audio_stays_in_sync(tmp_path, container):
    plain = tmp_path / "plain.mp4"
    ffmpeg("-f", "lavfi", "-i", "testsrc2=size=64x48:rate=10:duration=1.95", "-f", "lavfi", "-i",
           "sine=frequency=440:duration=2.5", "-c:v", "libx264", "-pix_fmt", "yuv420p", "-c:a", "aac", str(plain))
    source = tmp_path / f"late-video.{container}"
    ffmpeg("-i", str(plain), "-itsoffset", "0.5", "-i", str(plain), "-map", "1:v", "-map", "0:a", "-c", "copy", str(source))
    before = stream_times(source)
    assert before["video"][0] - before["audio"][0] == pytest.approx(0.5, abs=0.05)

    output, _ = upscale(source, tmp_path, upscaler=tiny_upscaler())

    after = stream_times(output)
    frame = 0.1
    assert after["video"][0] == pytest.approx(before["video"][0], abs=frame)  # starts when it did
    assert after["audio"][0] == pytest.approx(before["audio"][0], abs=frame)
    assert after["video"][1] == pytest.approx(before["video"][1], abs=frame)  # and ends when it did
    assert after["audio"][1] == pytest.approx(before["video"][1], abs=frame)  # the audio, trimmed to the video's end


def frame_times(path) -> list[float]:
    out = subprocess.run(["ffprobe", "-v", "error", "-select_streams", "v:0", "-show_entries", "frame=pts_time",
                          "-of", "json", str(path)], check=True, capture_output=True, text=True).stdout
    return [float(f["pts_time"]) for f in json.loads(out)["frames"]]


def test_variable_frame_rate_timestamps_are_carried_over(tmp_path):
    source = tmp_path / "vfr.mp4"  # 10 frames 0.1 s apart, 30 frames 1/30 s apart, 20 frames 0.25 s apart
    ffmpeg("-f", "lavfi", "-i", "testsrc2=size=64x48:rate=30:duration=2", "-vf",
           "setpts='if(lt(N,10),N*0.1,if(lt(N,40),1+(N-10)/30,2+(N-40)/4))/TB'", "-fps_mode", "vfr",
           "-c:v", "libx264", "-pix_fmt", "yuv420p", str(source))
    shown = frame_times(source)
    assert len(shown) == 60

    output, result = upscale(source, tmp_path, upscaler=tiny_upscaler())

    assert frame_times(output) == pytest.approx(shown, abs=0.002)  # frame i shown when source frame i was
    source_s = float(ffprobe_json(source)["format"]["duration"])
    assert float(ffprobe_json(output)["format"]["duration"]) == pytest.approx(source_s, abs=0.04)  # a frame at most
    assert result.metadata.duration == pytest.approx(source_s, abs=0.04)


# -- audio and subtitles ------------------------------------------------------------------------
def test_mp3_audio_and_srt_subtitles_in_matroska_come_back(tmp_path):
    subtitles = tmp_path / "s.srt"
    subtitles.write_text("1\n00:00:00,000 --> 00:00:01,000\nhello\n")
    source = tmp_path / "mp3.mkv"
    ffmpeg("-f", "lavfi", "-i", "testsrc2=size=64x48:rate=10:duration=1.95", "-f", "lavfi", "-i", "sine=duration=2",
           "-i", str(subtitles), "-map", "0", "-map", "1", "-map", "2", "-c:v", "libx264", "-pix_fmt", "yuv420p",
           "-c:a", "libmp3lame", "-c:s", "srt", str(source))

    output, result = upscale(source, tmp_path, upscaler=tiny_upscaler())

    assert [s["codec_name"] for s in streams_of(output, "audio")] == ["aac"]
    assert [s["codec_name"] for s in streams_of(output, "subtitle")] == ["mov_text"]
    assert result.has_audio


def test_a_result_missing_a_stream_fails_the_job(make_clip, tmp_path):
    source = make_clip(frames=4, audio_s=0.4)
    dropper = tmp_path / "ffmpeg"  # an encoder that quietly loses the audio
    dropper.write_text('#!/bin/sh\ncase "$*" in *"pipe:0"*) set -- $(echo "$@" | sed "s/-map 1:a//"); esac\nexec ffmpeg "$@"\n')
    dropper.chmod(0o755)
    with pytest.raises(PermanentError) as err:
        upscale(source, tmp_path, upscaler=tiny_upscaler(), encoder=EncoderSettings(ffmpeg=str(dropper)))
    assert err.value.code == ErrorCode.OUTPUT_MISMATCH and "0 audio" in err.value.message


# -- containers and codecs ---------------------------------------------------------------------
@pytest.mark.parametrize("name, args", [
    ("clip.ts", ["-c:v", "libx264", "-pix_fmt", "yuv420p", "-c:a", "aac", "-f", "mpegts"]),
    ("clip.m2ts", ["-c:v", "libx264", "-pix_fmt", "yuv420p", "-c:a", "aac", "-f", "mpegts", "-mpegts_m2ts_mode", "1"]),
    ("clip.mkv", ["-c:v", "libaom-av1", "-cpu-used", "8", "-pix_fmt", "yuv420p", "-c:a", "libopus"]),
], ids=["mpeg-ts", "m2ts", "av1"])
def test_streaming_and_modern_formats_are_accepted(tmp_path, name, args):
    source = tmp_path / name
    ffmpeg("-f", "lavfi", "-i", "testsrc2=size=64x48:rate=10:duration=0.95", "-f", "lavfi", "-i", "sine=duration=1",
           *args, str(source))
    output, result = upscale(source, tmp_path, upscaler=tiny_upscaler())
    assert result.metadata.frame_count == len(frame_times(source)) == 10
    assert len(streams_of(output, "audio")) == 1


def test_an_mp4_trimmed_with_an_edit_list_gives_the_frames_a_player_shows(tmp_path):
    whole = tmp_path / "whole.mp4"
    ffmpeg("-f", "lavfi", "-i", "testsrc2=size=64x48:rate=10:duration=1.15", "-c:v", "libx264", "-g", "5",
           "-pix_fmt", "yuv420p", str(whole))
    source = tmp_path / "trimmed.mp4"
    ffmpeg("-ss", "0.35", "-i", str(whole), "-c", "copy", str(source))
    shown = frame_times(source)

    output, result = upscale(source, tmp_path, upscaler=tiny_upscaler())

    assert result.metadata.frame_count == len(shown) == len(frame_times(output))
    assert len(shown) < int(video_stream(source)["nb_frames"])  # the container stores more than it shows


# -- 10-bit and HDR -----------------------------------------------------------------------------
@pytest.mark.parametrize("codec, name, profile, transfer", [
    ("h264", "h264", "High 10", "smpte2084"), ("hevc", "hevc", "Main 10", "smpte2084"), ("h264", "h264", "High 10", "arib-std-b67"),
], ids=["hdr10-h264", "hdr10-hevc", "hlg-h264"])
def test_a_hdr_source_gives_a_10_bit_result_with_its_tags(tmp_path, codec, name, profile, transfer):
    source = tmp_path / "hdr.mov"
    ffmpeg("-f", "lavfi", "-i", "testsrc2=size=64x48:rate=10:duration=0.35", "-c:v", "libx265", "-x265-params",
           "log-level=error", "-pix_fmt", "yuv420p10le", "-colorspace", "bt2020nc", "-color_primaries", "bt2020",
           "-color_trc", transfer, str(source))
    assert video_stream(source)["pix_fmt"] == "yuv420p10le"

    output, result = upscale(source, tmp_path, upscaler=tiny_upscaler(), encoder=EncoderSettings(deep_codec=codec))

    video = video_stream(output)
    assert (video["codec_name"], video["profile"], video["pix_fmt"]) == (name, profile, "yuv420p10le")
    assert colour_tags(output) == ("bt2020nc", "bt2020", transfer, "tv")
    assert result.metadata.frame_count == 4


def test_ten_bit_frames_keep_their_precision(tmp_path):
    source = tmp_path / "gradient10.mkv"  # a slow gradient: 8 bits would band it
    ffmpeg("-f", "lavfi", "-i", "gradients=size=256x64:rate=10:duration=0.15:c0=0x202020:c1=0x303030:type=linear:seed=7",
           "-c:v", "ffv1", "-pix_fmt", "yuv444p10le", str(source))
    output, _ = upscale(source, tmp_path)
    raw = subprocess.run(["ffmpeg", "-loglevel", "error", "-i", str(output), "-f", "rawvideo", "-pix_fmt", "gray10le", "-"],
                         check=True, capture_output=True).stdout
    luma = np.frombuffer(raw, "<u2")
    assert len(np.unique(luma)) > 2 * len(np.unique(luma >> 2))  # levels between the 8-bit ones survive
