"""ffprobe facts, OpenCV decoding and the single ffmpeg encode, against real files."""

from fractions import Fraction

import dataclasses
import subprocess
import numpy as np
import pytest

from conftest import decode_frames, ffmpeg, psnr, streams_of
from echoshot_ai_server.errors import ErrorCode, JobError, PermanentError, RetryableError
from echoshot_ai_server.media.probe import colour_of
from echoshot_ai_server.media.rawstream import TimedFrames
from echoshot_ai_server.media.reader import FrameReader
from echoshot_ai_server.media.writer import EncoderSettings, FrameWriter
from echoshot_ai_server.media.probe import audio_problem, probe


def test_probe_reads_size_rate_frames_duration_and_audio(make_clip):
    clip = make_clip(size=(66, 50), frames=12, fps="30000/1001", audio_s=0.4)

    info = probe(clip)

    assert (info.width, info.height, info.frame_count) == (66, 50, 12)
    assert info.fps == Fraction(30000, 1001)
    assert info.duration_s == pytest.approx(0.4, abs=0.05)
    assert info.audio is not None and info.audio.codec == "aac"


def test_probe_counts_frames_where_the_container_does_not_store_them(make_clip):
    clip = make_clip("clip.mkv", frames=7)
    info = probe(clip)
    assert info.frame_count == 7 and info.audio is None


@pytest.mark.parametrize(
    "name, content, code",
    [
        ("notes.mp4", b"this is a text file, not a video\n", ErrorCode.INVALID_VIDEO),
        ("empty.mp4", b"", ErrorCode.INVALID_VIDEO),
    ],
)
def test_probe_rejects_files_that_are_not_videos(tmp_path, name, content, code):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(PermanentError) as err:
        probe(path)
    assert err.value.code == code and name in err.value.message


def test_probe_rejects_audio_only_files(tmp_path):
    path = tmp_path / "song.m4a"
    ffmpeg("-f", "lavfi", "-i", "sine=duration=0.5", "-c:a", "aac", str(path))
    with pytest.raises(PermanentError, match="no video stream"):
        probe(path)


def test_probe_of_a_missing_file(tmp_path):
    with pytest.raises(PermanentError) as err:
        probe(tmp_path / "nope.mp4")
    assert err.value.code == ErrorCode.INPUT_NOT_FOUND


def test_reader_yields_every_frame_in_batches(make_clip):
    clip = make_clip(size=(64, 48), frames=7)
    with FrameReader(clip, probe(clip)) as reader:
        batches = list(reader.batches(3))
    assert [len(b) for b in batches] == [3, 3, 1]
    assert batches[0].frames.shape == (3, 48, 64, 3) and batches[0].frames.dtype == np.uint8
    assert reader.frames_read == 7
    # each frame with its time: 10 fps
    times = [t / reader.track.timescale for b in batches for t in b.pts]
    assert times == pytest.approx([i / 10 for i in range(7)])
    # the same pixels ffmpeg decodes, read as a player reads untagged SD (BT.601, full chroma resolution)
    raw = subprocess.run(["ffmpeg", "-loglevel", "error", "-i", str(clip), "-vf",
                          "scale=in_color_matrix=smpte170m:flags=accurate_rnd+full_chroma_int,format=bgr24",
                          "-f", "rawvideo", "-"], check=True, capture_output=True).stdout
    assert psnr(np.concatenate([b.frames for b in batches]), np.frombuffer(raw, np.uint8).reshape(7, 48, 64, 3)) > 45


def test_reader_rejects_frames_of_an_unexpected_size(make_clip):
    clip = make_clip(size=(64, 48), frames=2)
    wrong = dataclasses.replace(probe(clip), width=32)
    with pytest.raises(PermanentError, match="decodes as 64x48, expected 32x48"):
        with FrameReader(clip, wrong) as reader:
            list(reader.batches(1))


def write_clip(path, frames, fps=Fraction(10), audio_source=None, encoder=EncoderSettings()):
    n, h, w, _ = frames.shape
    with FrameWriter(
        path, width=w, height=h, timescale=fps.numerator, encoder=encoder, colour=colour_of({}, w, h),
        streams_from=audio_source, audio=audio_source is not None, end_s=float(n / fps) if audio_source else None,
    ) as writer:
        for i, frame in enumerate(frames):
            writer.write(TimedFrames(frame[None], [i * fps.denominator], [fps.denominator]))
    return writer


def gradient_frames(n: int, h: int, w: int) -> np.ndarray:
    yy, xx = np.mgrid[0:h, 0:w]
    return np.stack([np.stack([(xx * 4 + i * 9) % 256, (yy * 4) % 256, np.full_like(xx, 60 + i * 20)], -1)
                     for i in range(n)]).astype(np.uint8)


def test_writer_encodes_h264_yuv420p_with_faststart(tmp_path):
    frames = gradient_frames(5, 48, 64)
    out = tmp_path / "out.mp4"

    writer = write_clip(out, frames, fps=Fraction(25))

    video = streams_of(out, "video")[0]
    assert (video["codec_name"], video["pix_fmt"], video["width"], video["height"]) == ("h264", "yuv420p", 64, 48)
    assert video["r_frame_rate"] == "25/1" and int(video["nb_read_frames"]) == 5 == writer.frames_written
    assert streams_of(out, "audio") == []
    data = out.read_bytes()
    assert data.index(b"moov") < data.index(b"mdat"), "moov atom must come first (+faststart)"
    assert psnr(decode_frames(out), frames) > 30


def test_writer_maps_the_source_audio_as_aac(make_clip, tmp_path):
    source = make_clip(frames=10, fps="10", audio_s=1.0, acodec=["-c:a", "libopus"], name="src.mkv")
    out = tmp_path / "out.mp4"

    write_clip(out, gradient_frames(10, 48, 64), audio_source=source)

    audio = streams_of(out, "audio")
    assert len(audio) == 1 and audio[0]["codec_name"] == "aac"
    assert 96_000 <= int(audio[0]["bit_rate"]) <= 170_000  # 128k, give or take a 1-s clip's overhead
    assert float(audio[0]["duration"]) == pytest.approx(1.0, abs=0.1)


def test_writer_failure_is_reported_with_ffmpegs_message(tmp_path):
    with pytest.raises(RetryableError) as err:
        write_clip(tmp_path / "out.mp4", gradient_frames(2, 48, 64), encoder=EncoderSettings(preset="no-such-preset"))
    assert err.value.code == ErrorCode.ENCODE_FAILED
    assert "no-such-preset" in err.value.message or "preset" in err.value.message.lower()


def test_writer_rejects_frames_of_the_wrong_size(tmp_path):
    with pytest.raises(ValueError, match="expected uint8 frames"):
        with FrameWriter(tmp_path / "o.mp4", width=64, height=48, timescale=10, encoder=EncoderSettings(),
                         colour=colour_of({}, 64, 48)) as w:
            w.write(TimedFrames(np.zeros((1, 48, 32, 3), np.uint8), [0], [1]))
    assert not (tmp_path / "o.mp4").exists() or (tmp_path / "o.mp4").stat().st_size < 1000


def test_missing_ffmpeg_is_a_clear_error(tmp_path, make_clip):
    clip = make_clip(frames=2)
    with pytest.raises(JobError) as err:
        probe(clip, ffprobe="no-such-ffprobe")
    assert err.value.code == ErrorCode.TOOL_MISSING


def corrupt_audio_codec(path):
    """Relabel the Matroska audio track with an unknown codec: ffprobe lists it, nobody decodes it."""
    data = path.read_bytes()
    assert b"A_AAC" in data
    path.write_bytes(data.replace(b"A_AAC", b"A_ZZZ"))
    return path


def test_audio_problem_detects_undecodable_audio(make_clip):
    good = make_clip("good.mkv", audio_s=0.6)
    bad = corrupt_audio_codec(make_clip("bad.mkv", audio_s=0.6))
    assert audio_problem(good) is None
    assert "not found" in audio_problem(bad).lower() or audio_problem(bad)
