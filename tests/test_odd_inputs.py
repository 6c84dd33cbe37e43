"""Files from strangers: each bad one gets a clear error code; odd but valid ones work."""

import subprocess

import numpy as np
import pytest

from conftest import ffmpeg, ffprobe_json, streams_of, tiny_upscaler
from echoshot_ai_server.errors import ErrorCode, PermanentError
from echoshot_ai_server.app.pipeline import upscale_video
from echoshot_ai_server.media.writer import EncoderSettings


def run(source, tmp_path, scale=2):
    output = tmp_path / "out.mp4"
    result = upscale_video(source, output, scale=scale, device="cpu", get_upscaler=lambda: tiny_upscaler(),
                           encoder=EncoderSettings())
    return output, result


def failure(source, tmp_path) -> PermanentError:
    with pytest.raises(PermanentError) as err:
        run(source, tmp_path)
    return err.value


# -- bad input -----------------------------------------------------------------------------
@pytest.mark.parametrize("name, content", [
    ("notes.mp4", b"hello, this is text\n" * 20),
    ("random.mp4", np.random.default_rng(0).integers(0, 256, 20000, dtype=np.uint8).tobytes()),
    ("empty.mp4", b""),
])
def test_files_that_are_not_videos(tmp_path, name, content):
    source = tmp_path / name
    source.write_bytes(content)
    assert failure(source, tmp_path).code == ErrorCode.INVALID_VIDEO


@pytest.mark.parametrize("extension", ["png", "jpg"])
def test_a_still_image_is_not_a_video(tmp_path, extension):
    source = tmp_path / f"photo.{extension}"
    ffmpeg("-f", "lavfi", "-i", "testsrc2=size=64x48", "-frames:v", "1", str(source))
    error = failure(source, tmp_path)
    assert error.code == ErrorCode.INVALID_VIDEO and "still image" in error.message


def test_audio_only_file(tmp_path):
    source = tmp_path / "song.mp4"
    ffmpeg("-f", "lavfi", "-i", "sine=duration=0.5", "-c:a", "aac", str(source))
    assert failure(source, tmp_path).code == ErrorCode.INVALID_VIDEO


def test_a_codec_nobody_can_decode(make_clip, tmp_path):
    source = make_clip("clip.mkv", frames=4)
    data = source.read_bytes()
    source.write_bytes(data.replace(b"V_MPEG4/ISO/AVC", b"V_MPEG4/ISO/ZZZ"))
    assert failure(source, tmp_path).code in (ErrorCode.DECODE_FAILED, ErrorCode.NO_FRAMES)


def test_a_file_cut_in_the_middle(make_clip, tmp_path):
    data = make_clip(size=(64, 48), frames=60, vcodec=["-c:v", "libx264", "-g", "10", "-movflags", "+faststart"]).read_bytes()
    source = tmp_path / "cut.mp4"
    source.write_bytes(data[: len(data) // 2])
    error = failure(source, tmp_path)
    assert error.code == ErrorCode.DECODE_FAILED and "of 60 frames could be decoded" in error.message


def test_zero_frames(make_clip, tmp_path):
    data = make_clip(frames=4, vcodec=["-c:v", "libx264", "-movflags", "+faststart"]).read_bytes()
    source = tmp_path / "header-only.mp4"
    source.write_bytes(data[: data.index(b"mdat") + 4])
    assert failure(source, tmp_path).code == ErrorCode.NO_FRAMES


# -- odd but valid -------------------------------------------------------------------------
def test_variable_frame_rate_keeps_every_frame_and_the_duration(tmp_path):
    source = tmp_path / "vfr.mkv"
    ffmpeg("-f", "lavfi", "-i", "testsrc2=size=64x48:rate=10:duration=1", "-f", "lavfi",
           "-i", "testsrc2=size=64x48:rate=30:duration=1", "-filter_complex", "[0][1]concat=n=2:v=1",
           "-fps_mode", "vfr", "-c:v", "libx264", str(source))
    frames = int(streams_of(source, "video")[0]["nb_read_frames"])
    assert frames == 40

    output, result = run(source, tmp_path)

    video = streams_of(output, "video")[0]
    assert int(video["nb_read_frames"]) == 40
    source_s = float(ffprobe_json(source)["format"]["duration"])
    assert float(ffprobe_json(output)["format"]["duration"]) == pytest.approx(source_s, abs=0.1)  # one frame at 10 fps


@pytest.mark.parametrize("rotation, size", [(90, (96, 128)), (180, (128, 96)), (270, (96, 128))])
def test_rotated_source_comes_out_upright(make_clip, tmp_path, rotation, size):
    stored = make_clip("stored.mp4", size=(64, 48), frames=3)
    source = tmp_path / "rotated.mp4"
    ffmpeg("-i", str(stored), "-c", "copy", "-metadata:s:v:0", f"rotate={rotation}", str(source))

    output, result = run(source, tmp_path)

    video = streams_of(output, "video")[0]
    assert (video["width"], video["height"]) == size == (result.metadata.width, result.metadata.height)
    assert not video.get("side_data_list")  # upright pixels, nothing left for a player to turn


def test_ten_bit_source(make_clip, tmp_path):
    source = make_clip("ten.mp4", frames=3, vcodec=["-c:v", "libx264", "-pix_fmt", "yuv420p10le"])
    assert streams_of(source, "video")[0]["pix_fmt"] == "yuv420p10le"
    output, result = run(source, tmp_path)
    assert streams_of(output, "video")[0]["pix_fmt"] == "yuv420p10le" and result.metadata.frame_count == 3


@pytest.mark.parametrize("name, vcodec, acodec", [
    ("clip.mp4", ["-c:v", "libx264", "-pix_fmt", "yuv420p"], ["-c:a", "ac3"]),
    ("clip.mov", ["-c:v", "libx264", "-pix_fmt", "yuv420p"], ["-c:a", "pcm_s16le"]),
    ("clip.mkv", ["-c:v", "libx264", "-pix_fmt", "yuv420p"], ["-c:a", "flac"]),
    ("clip.webm", ["-c:v", "libvpx-vp9", "-b:v", "200k"], ["-c:a", "libvorbis"]),
    ("clip.avi", ["-c:v", "mpeg4"], ["-c:a", "libmp3lame"]),
])
def test_containers_and_audio_codecs(make_clip, tmp_path, name, vcodec, acodec):
    source = make_clip(name, size=(64, 48), frames=10, audio_s=1.0, vcodec=vcodec, acodec=acodec)

    output, result = run(source, tmp_path)

    [audio] = streams_of(output, "audio")
    assert audio["codec_name"] == "aac" and float(audio["duration"]) == pytest.approx(1.0, abs=0.1)
    assert result.metadata.frame_count == 10


def test_every_audio_stream_is_kept(make_clip, tmp_path):
    stereo = make_clip("a.mkv", frames=10, audio_s=1.0)
    source = tmp_path / "two-tracks.mkv"
    ffmpeg("-i", str(stereo), "-f", "lavfi", "-i", "sine=frequency=880:duration=1", "-map", "0:v", "-map", "0:a",
           "-map", "1:a", "-c:v", "copy", "-c:a", "libopus", str(source))

    output, _ = run(source, tmp_path)

    assert [a["codec_name"] for a in streams_of(output, "audio")] == ["aac", "aac"]


def test_text_subtitles_are_kept(make_clip, tmp_path):
    srt = tmp_path / "subs.srt"
    srt.write_text("1\n00:00:00,000 --> 00:00:00,800\n안녕하세요\n", encoding="utf-8")
    video = make_clip("v.mkv", frames=10, audio_s=1.0)
    source = tmp_path / "subtitled.mkv"
    ffmpeg("-i", str(video), "-i", str(srt), "-map", "0", "-map", "1", "-c", "copy", str(source))

    output, _ = run(source, tmp_path)

    [subtitle] = streams_of(output, "subtitle")
    assert subtitle["codec_name"] == "mov_text"
    text = subprocess.run(["ffmpeg", "-loglevel", "error", "-i", str(output), "-map", "0:s:0", "-f", "srt", "-"],
                          capture_output=True, text=True, check=True).stdout
    assert "안녕하세요" in text


def test_a_single_frame(make_clip, tmp_path):
    output, result = run(make_clip(frames=1, audio_s=0.1), tmp_path)
    assert result.metadata.frame_count == 1 and int(streams_of(output, "video")[0]["nb_read_frames"]) == 1
