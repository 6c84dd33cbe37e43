"""The whole frame pipeline on real clips: sizes, frames, audio, logs and failures."""

import subprocess

import numpy as np
import pytest

from conftest import decode_frames, psnr, streams_of, tiny_upscaler
from echoshot_ai_server.errors import ErrorCode, PermanentError
from echoshot_ai_server.app.pipeline import upscale_video
from echoshot_ai_server.job import output_key
from echoshot_ai_server.media.writer import EncoderSettings
from echoshot_ai_server.media.probe import probe
from echoshot_ai_server.media.reader import FrameReader
from test_video import corrupt_audio_codec


def run_pipeline(source, tmp_path, scale=2, upscaler=None, **kwargs):
    upscaler = upscaler or tiny_upscaler()
    output = tmp_path / "out.mp4"
    result = upscale_video(
        source, output, scale=scale, device="cpu", get_upscaler=lambda: upscaler, encoder=EncoderSettings(), **kwargs
    )
    return output, result


@pytest.mark.parametrize("scale", [2, 4])
@pytest.mark.parametrize("with_audio", [True, False])
def test_output_is_h264_at_scale_with_every_frame_and_the_audio(make_clip, tmp_path, scale, with_audio):
    # Given a clip of a size that is no multiple of 8, with or without audio
    source = make_clip(size=(66, 50), frames=8, fps="10", audio_s=0.8 if with_audio else None)

    # When it is upscaled
    output, result = run_pipeline(source, tmp_path, scale=scale)

    # Then ffprobe sees H.264 at exactly scale x the size, the same rate and frame count
    video = streams_of(output, "video")[0]
    assert video["codec_name"] == "h264" and video["pix_fmt"] == "yuv420p"
    assert (video["width"], video["height"]) == (66 * scale, 50 * scale)
    assert video["r_frame_rate"] == "10/1" and int(video["nb_read_frames"]) == 8
    audio = streams_of(output, "audio")
    if with_audio:
        assert len(audio) == 1 and audio[0]["codec_name"] == "aac"
        assert float(audio[0]["duration"]) == pytest.approx(0.8, abs=0.1)
    else:
        assert audio == []
    assert result.metadata.model_dump() == {"width": 66 * scale, "height": 50 * scale, "fps": 10.0, "frame_count": 8,
                                 "duration": pytest.approx(0.8, abs=0.05)}
    assert result.has_audio is with_audio


def distinct_frames_clip(path, n, h, w):
    """A lossless clip whose frames are clearly different from each other."""
    yy, xx = np.mgrid[0:h, 0:w]
    frames = np.stack([
        np.stack([(xx * (i + 2) * 5) % 256, (yy * (7 - i) * 5) % 256, np.full_like(xx, 40 * i)], -1) for i in range(n)
    ]).astype(np.uint8)
    subprocess.run(
        ["ffmpeg", "-loglevel", "error", "-y", "-f", "rawvideo", "-pix_fmt", "bgr24", "-video_size", f"{w}x{h}",
         "-framerate", "10", "-i", "-", "-c:v", "ffv1", str(path)],
        input=frames.tobytes(), check=True,
    )
    return path


def test_frames_are_the_upscalers_frames_in_order(tmp_path):
    source = distinct_frames_clip(tmp_path / "distinct.mkv", 6, 32, 48)
    upscaler = tiny_upscaler()
    with FrameReader(source, probe(source)) as reader:
        expected = np.concatenate([upscaler.upscale(b.frames, 2) for b in reader.batches(6)])

    output, _ = run_pipeline(source, tmp_path, upscaler=upscaler)

    decoded = decode_frames(output)
    assert decoded.shape == expected.shape
    for i in range(len(expected)):
        # H.264 at CRF 23 blurs the tiny model's noisy output: the right frame is the closest by far
        scores = [psnr(decoded[i], e) for e in expected]
        runner_up = max(s for j, s in enumerate(scores) if j != i)
        assert scores[i] > 27 and scores[i] > runner_up + 2, f"frame {i}: {scores}"


def test_odd_sized_source(make_clip, tmp_path):
    source = make_clip("odd.mkv", size=(65, 47), frames=4, vcodec=["-c:v", "ffv1"], pattern="testsrc")
    output, result = run_pipeline(source, tmp_path, scale=2)
    assert (result.metadata.width, result.metadata.height, result.metadata.frame_count) == (130, 94, 4)


def test_audio_shorter_than_the_video_keeps_every_frame(make_clip, tmp_path):
    source = make_clip(frames=20, fps="10", audio_s=0.5)
    output, result = run_pipeline(source, tmp_path)
    assert result.metadata.frame_count == 20
    assert float(streams_of(output, "audio")[0]["duration"]) == pytest.approx(0.5, abs=0.1)


def test_audio_longer_than_the_video_is_trimmed_to_it(make_clip, tmp_path):
    source = make_clip("long-audio.mkv", frames=6, fps="10", audio_s=2.0, acodec=["-c:a", "libopus"])
    output, _ = run_pipeline(source, tmp_path)
    assert float(streams_of(output, "audio")[0]["duration"]) == pytest.approx(0.6, abs=0.1)


def test_unusable_audio_gives_a_warning_and_a_video_only_result(make_clip, tmp_path, caplog):
    source = corrupt_audio_codec(make_clip("bad-audio.mkv", frames=4, audio_s=0.4))

    output, result = run_pipeline(source, tmp_path)

    assert streams_of(output, "audio") == [] and result.metadata.frame_count == 4
    assert "오디오 추출 실패" in caplog.text


def test_the_guides_log_lines_in_order(make_clip, tmp_path, caplog):
    source = make_clip(size=(32, 24), frames=40, fps="20", audio_s=2.0)
    run_pipeline(source, tmp_path, upscaler=tiny_upscaler(batch_frames=1))

    messages = [r.getMessage() for r in caplog.records if r.name == "echoshot_ai_server.tasks.upscale_task"]
    expected_order = [
        "업스케일 작업 시작 - Scale: 2x, Device: CPU",
        "비디오 정보 - 해상도: 32x24, FPS: 20.0, 프레임: 40",
        "업스케일러 초기화 완료 - Device: CPU, Tile: 32, Half Precision: False",
        "오디오 트랙 발견 - 코덱: aac",
        "비디오 인코딩 중 (오디오 포함)...",
        "업스케일 진행률: 5.0% (2/40)",
        "업스케일 진행률: 95.0% (38/40)",
        "프레임 업스케일 완료: 40/40 프레임 처리",
        "최종 비디오 생성 완료",
    ]
    positions = [messages.index(m) for m in expected_order]
    assert positions == sorted(positions)
    assert sum("진행률" in m for m in messages) == 19  # every 5 % from 5 to 95


def test_progress_callback_sees_every_batch(make_clip, tmp_path):
    seen = []
    run_pipeline(make_clip(frames=5), tmp_path, upscaler=tiny_upscaler(batch_frames=2),
                 on_progress=lambda done, total: seen.append((done, total)))
    assert seen == [(2, 5), (4, 5), (5, 5)]


def test_not_a_video(tmp_path):
    source = tmp_path / "video.mp4"
    source.write_text("definitely not a video")
    with pytest.raises(PermanentError) as err:
        run_pipeline(source, tmp_path)
    assert err.value.code == ErrorCode.INVALID_VIDEO


def test_video_whose_frames_cannot_be_decoded(make_clip, tmp_path):
    # A faststart MP4 cut right after its header: ffprobe counts 4 frames, none can be decoded
    data = make_clip(frames=4, vcodec=["-c:v", "libx264", "-movflags", "+faststart"]).read_bytes()
    source = tmp_path / "truncated.mp4"
    source.write_bytes(data[: data.index(b"mdat") + 4])

    with pytest.raises(PermanentError) as err:
        run_pipeline(source, tmp_path)
    assert err.value.code == ErrorCode.NO_FRAMES


def test_scale_is_checked_before_any_work(tmp_path):
    with pytest.raises(PermanentError) as err:
        run_pipeline(tmp_path / "missing.mp4", tmp_path, scale=3)
    assert err.value.code == ErrorCode.INVALID_PARAMETERS


def test_output_key_follows_the_contract():
    assert output_key("job-1", "uploads/user123/my video.mov") == "processed/upscaled/job-1/my video_upscaled.mp4"


def test_a_stop_request_ends_the_job_between_batches_and_kills_the_encoder(make_clip, tmp_path):
    from echoshot_ai_server.errors import JobCancelled

    calls = []

    def stop_after_two_batches():
        calls.append(1)
        return len(calls) > 2

    with pytest.raises(JobCancelled):
        run_pipeline(make_clip(frames=10), tmp_path, upscaler=tiny_upscaler(batch_frames=1), should_stop=stop_after_two_batches)
    assert len(calls) == 3
