"""ENCODE_PART_S: a long video encoded as parts by several encoders at once and joined
(media/parted_writer.py) comes back as one encoder would give it: every frame at its time, the audio
in sync, the same pictures, tags and aspect; a part that fails fails the job and nothing is left."""

import subprocess

import pytest

from conftest import ffmpeg, fill, make_noise_clip, psnr
from echoshot_ai_server.config import Settings
from echoshot_ai_server.errors import ErrorCode, JobCancelled, RetryableError, classify
from echoshot_ai_server.media.parted_writer import part_starts
from echoshot_ai_server.media.writer import EncoderSettings, join_parts
from test_what_comes_back import as_a_player_shows, colour_tags, frame_times, stream_times, upscale, video_stream


def keyframe_times(path) -> list[float]:
    out = subprocess.run(["ffprobe", "-v", "error", "-select_streams", "v:0", "-show_entries", "frame=pts_time,key_frame",
                          "-of", "csv=p=0", str(path)], check=True, capture_output=True, text=True).stdout
    return [float(time) for key, time in (line.split(",")[:2] for line in out.split()) if key == "1"]


def test_parts_are_cut_every_part_length_and_the_last_one_in_halves():
    assert part_starts(6, 1) == [0, 1, 2, 3, 4, 5, 5.5, 5.75]
    assert part_starts(10, 2) == [0, 2, 4, 6, 8, 9, 9.5, 9.75]
    assert part_starts(2.5, 1) == [0, 1, 1.5, 2, 2.25]  # the last second starts off the grid
    assert part_starts(1, 1) == part_starts(0.5, 1) == part_starts(9, 0) == [0.0]  # one part: one encoder


def test_a_long_video_in_parts_comes_back_as_one_encoder_gives_it(tmp_path):
    source = tmp_path / "late-vfr.mp4"  # variable frame rate, the video starting 0.3 s after its audio, 4:3 pixels
    plain = tmp_path / "plain.mp4"
    ffmpeg("-f", "lavfi", "-i", "testsrc2=size=64x48:rate=30:duration=4", "-f", "lavfi", "-i", "sine=duration=5",
           "-vf", "setsar=4/3,setpts='if(lt(N,30),N*0.05,1.5+(N-30)/30)/TB'", "-fps_mode", "vfr", "-c:v", "libx264",
           "-pix_fmt", "yuv420p", "-colorspace", "bt709", "-color_primaries", "bt709", "-color_trc", "bt709",
           "-c:a", "aac", str(plain))
    ffmpeg("-i", str(plain), "-itsoffset", "0.3", "-i", str(plain), "-map", "1:v", "-map", "0:a", "-c", "copy", str(source))
    whole, parted = tmp_path / "whole.mp4", tmp_path / "parted.mp4"

    _, one = upscale(source, tmp_path, name=whole.name, encoder=EncoderSettings(part_s=0))
    _, parts = upscale(source, tmp_path, name=parted.name, encoder=EncoderSettings(part_s=1))

    shown = frame_times(source)
    assert frame_times(parted) == pytest.approx(shown, abs=0.002) == frame_times(whole)
    for kind in ("video", "audio"):  # in sync, both ends
        assert stream_times(parted)[kind] == pytest.approx(stream_times(whole)[kind], abs=0.03)
    assert parts.metadata == one.metadata and parts.has_audio
    # a keyframe where each part starts: every second, then the last second in halves
    first = shown[0]
    starts = [first + s for s in part_starts(shown[-1] + 1 / 30 - first, 1)]
    expected = [next(t for t in shown if t >= start - 1e-3) for start in starts]
    assert keyframe_times(parted) == pytest.approx(sorted(set(expected)), abs=0.002)
    assert keyframe_times(whole) == pytest.approx([first], abs=0.002)
    video = video_stream(parted)
    assert (video["sample_aspect_ratio"], video["display_aspect_ratio"]) == ("4:3", "16:9")
    assert colour_tags(parted) == colour_tags(whole) == ("bt709", "bt709", "bt709", "tv")
    # the same pictures: as close to the source as one encoder's, at the same x264 settings
    sent = as_a_player_shows(source).repeat(2, axis=1).repeat(2, axis=2)
    parted_db, whole_db = psnr(as_a_player_shows(parted), sent), psnr(as_a_player_shows(whole), sent)
    assert parted_db > whole_db - 1 and whole_db > 25, (parted_db, whole_db)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["late-vfr.mp4", "parted.mp4", "plain.mp4", "whole.mp4"]


def test_a_short_video_takes_one_encoder(tmp_path):
    source = tmp_path / "short.mp4"
    ffmpeg("-f", "lavfi", "-i", "testsrc2=size=64x48:rate=10:duration=1.9", "-c:v", "libx264", "-pix_fmt", "yuv420p",
           str(source))
    upscale(source, tmp_path, encoder=EncoderSettings(part_s=1))
    assert keyframe_times(tmp_path / "out.mp4") == [0.0]


@pytest.fixture
def long_source(tmp_path):
    source = tmp_path / "long.mp4"
    ffmpeg("-f", "lavfi", "-i", "testsrc2=size=64x48:rate=10:duration=5", "-c:v", "libx264", "-pix_fmt", "yuv420p",
           str(source))
    return source


def test_a_part_that_cannot_be_encoded_fails_the_job_and_leaves_nothing(long_source, tmp_path):
    with pytest.raises(RetryableError) as failed:
        upscale(long_source, tmp_path, encoder=EncoderSettings(preset="no-such-preset", part_s=1))
    assert failed.value.code == ErrorCode.ENCODE_FAILED and "preset" in str(failed.value).lower()
    assert [p.name for p in tmp_path.iterdir()] == ["long.mp4"]


def test_a_job_cancelled_between_parts_stops_every_encoder_and_leaves_nothing(long_source, tmp_path):
    checks = []

    def stop_after_a_while() -> bool:
        checks.append(1)
        return len(checks) > 8  # 4 frames a batch: a few parts in

    with pytest.raises(JobCancelled):
        upscale(long_source, tmp_path, encoder=EncoderSettings(part_s=0.5), should_stop=stop_after_a_while)
    assert [p.name for p in tmp_path.iterdir()] == ["long.mp4"]
    ffmpegs = subprocess.run(["pgrep", "-f", f"ffmpeg.*{tmp_path}"], capture_output=True, text=True).stdout
    assert ffmpegs == ""


def test_the_setting_reaches_the_encoder(monkeypatch):
    from echoshot_ai_server.app.wiring import encoder_settings

    assert encoder_settings(Settings()).part_s == 0  # one encoder unless set
    monkeypatch.setenv("ENCODE_PART_S", "2")
    assert encoder_settings(Settings()).part_s == 2


@pytest.mark.parametrize("codec, profile", [("h264", "High 10"), ("hevc", "Main 10")])
def test_a_hdr_video_in_parts_keeps_its_depth_and_tags(tmp_path, codec, profile):
    source = tmp_path / "hdr.mov"
    ffmpeg("-f", "lavfi", "-i", "testsrc2=size=64x48:rate=10:duration=3", "-c:v", "libx265", "-x265-params",
           "log-level=error", "-pix_fmt", "yuv420p10le", "-colorspace", "bt2020nc", "-color_primaries", "bt2020",
           "-color_trc", "smpte2084", str(source))
    output, result = upscale(source, tmp_path, encoder=EncoderSettings(deep_codec=codec, part_s=1))
    video = video_stream(output)
    assert (video["profile"], video["pix_fmt"]) == (profile, "yuv420p10le")
    assert colour_tags(output) == ("bt2020nc", "bt2020", "smpte2084", "tv")
    assert frame_times(output) == pytest.approx(frame_times(source), abs=0.002) and result.metadata.frame_count == 30
    assert len(keyframe_times(output)) >= 3


def test_a_worker_encoding_in_parts_asks_for_room_for_the_parts_too(tmp_path, monkeypatch):
    import shutil
    from types import SimpleNamespace

    from echoshot_ai_server.app.task import UpscaleTask

    monkeypatch.setattr(shutil, "disk_usage", lambda path: SimpleNamespace(free=30 * 10**6))
    source, scale = 10**6, 4  # a result of up to 16 MB: 17 MB in all, 33 MB while parts are joined

    def task(part_s):
        return UpscaleTask(storage=None, callback=None, records=None, work_dir=tmp_path,
                           encoder=EncoderSettings(part_s=part_s), disk_headroom_bytes=0)

    task(0).check_disk(source, scale)
    with pytest.raises(RetryableError) as refused:
        task(2).check_disk(source, scale)
    assert refused.value.code == ErrorCode.INSUFFICIENT_DISK


@pytest.mark.parametrize("when", ["while-encoding", "at-the-join"])
def test_a_disk_that_fills_up_fails_the_job_as_retryable_and_keeps_nothing(tmp_path, small_disk, when):
    source = make_noise_clip(tmp_path / "noise.mp4", seconds=5)  # its 2x result in parts: about 150 KB
    checks, filler = [], []

    def fill_once(leave_bytes: int) -> None:
        if not filler:
            filler.append(fill(small_disk, leave_bytes))

    def should_stop() -> bool:
        checks.append(1)
        if when == "while-encoding" and len(checks) == 6:  # a few parts in
            fill_once(0)
        return False

    def frames_done() -> None:  # every frame handed over, the parts' last frames still encoding
        if when == "at-the-join":
            fill_once(20 * 1024)

    with pytest.raises(Exception) as failed:
        upscale(source, small_disk, encoder=EncoderSettings(part_s=1), should_stop=should_stop, frames_done=frames_done)
    assert classify(failed.value).code == ErrorCode.INSUFFICIENT_DISK, failed.value  # as the worker reports it
    assert [p.name for p in small_disk.iterdir()] == ["someone-else"]


def test_joining_on_a_full_disk_leaves_no_listing_behind(tmp_path, small_disk):
    part = tmp_path / "part.mp4"
    ffmpeg("-f", "lavfi", "-i", "testsrc2=size=64x48:rate=10:duration=1", "-c:v", "libx264", "-pix_fmt", "yuv420p",
           str(part))
    fill(small_disk, 0)
    with pytest.raises(OSError) as failed:  # the concat listing itself does not fit
        join_parts([(part, 1.0)], small_disk / "out.mp4", encoder=EncoderSettings(), streams_from=None, audio=False,
                   subtitles=(), video_start_s=0.0, end_s=1.0)
    assert classify(failed.value).code == ErrorCode.INSUFFICIENT_DISK
    assert [p.name for p in small_disk.iterdir()] == ["someone-else"]
