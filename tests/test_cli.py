"""`echoshot upscale` and `echoshot check-env` as a developer runs them, with the official weights."""

import re

import cv2
import numpy as np
import pytest

from conftest import decode_frames, psnr, reference_enhancer, streams_of
from echoshot_ai_server.engine.specs import X4PLUS


def luma(frame: np.ndarray) -> np.ndarray:
    return cv2.cvtColor(frame, cv2.COLOR_BGR2YUV)[..., 0]


def no_traceback(stderr: str) -> bool:
    return "Traceback" not in stderr


def test_upscale_with_the_official_weights(echoshot_cli, make_clip, shared_weights_dir, tmp_path):
    # Given a tiny clip with audio
    source = make_clip("sample clip.mp4", size=(40, 30), frames=4, fps="10", audio_s=0.4)

    # When a developer upscales it 2x on the CPU
    run = echoshot_cli("upscale", "--input", str(source), "--scale", "2", "--output", "results",
                       env={"WEIGHTS_DIR": str(shared_weights_dir)})

    # Then the environment report and the summary are printed and the result is where it says
    assert run.returncode == 0, run.stderr
    assert "PyTorch 버전" in run.stdout and "✅ 모델 가중치 확인" in run.stdout
    job_id = re.search(r"Job ID: (test_\d{8}_\d{6})", run.stdout).group(1)
    assert f"출력 키: processed/upscaled/{job_id}/sample clip_upscaled.mp4" in run.stdout
    for line in ("width: 80", "height: 60", "fps: 10.0", "frame_count: 4"):
        assert line in run.stdout
    output = tmp_path / "results" / f"{job_id}_sample clip_upscaled.mp4"
    assert output.is_file()
    assert "업스케일:" in run.stderr and "4/4" in run.stderr  # the progress bar
    assert len(streams_of(output, "audio")) == 1

    # And its pixels are Real-ESRGAN's (up to H.264's loss, so compared on luma), not a plain resize
    reference = reference_enhancer(shared_weights_dir / X4PLUS.weights_file, X4PLUS.arch, tile=128, tile_pad=5)
    for got, frame in zip(decode_frames(output), decode_frames(source)):
        expected, _ = reference.enhance(frame, outscale=2)
        resized = cv2.resize(frame, (80, 60), interpolation=cv2.INTER_LANCZOS4)
        assert psnr(luma(got), luma(expected)) > 33
        assert psnr(luma(got), luma(expected)) > psnr(luma(resized), luma(expected)) + 6

    # And nothing is left in the work directory
    assert list((tmp_path / "work").iterdir()) == []


def test_check_env_reports_everything(echoshot_cli, shared_weights_dir):
    run = echoshot_cli("check-env", env={"WEIGHTS_DIR": str(shared_weights_dir)})
    assert run.returncode == 0, run.stderr
    for fact in ("PyTorch 버전:", "CUDA 사용 가능:", "ffmpeg: ffmpeg version", "ffprobe: ffprobe version", "✅ 모델 가중치 확인"):
        assert fact in run.stdout


def test_check_env_fails_without_weights(echoshot_cli, tmp_path):
    run = echoshot_cli("check-env", env={"WEIGHTS_DIR": str(tmp_path / "nowhere")})
    assert run.returncode == 1
    assert "❌ model weights not found" in run.stdout


def test_missing_weights_is_one_clear_line(echoshot_cli, make_clip, tmp_path):
    source = make_clip(frames=2)
    weights_dir = tmp_path / "empty-weights"
    run = echoshot_cli("upscale", "--input", str(source), "--no-validation", env={"WEIGHTS_DIR": str(weights_dir)})
    assert run.returncode == 1 and no_traceback(run.stderr)
    error = [line for line in run.stderr.splitlines() if line.startswith("error:")]
    assert len(error) == 1
    assert "[WEIGHTS_MISSING]" in error[0] and str(weights_dir / "RealESRGAN_x4plus.pth") in error[0]
    assert "curl -L https://github.com/xinntao/Real-ESRGAN/releases" in error[0]
    assert list((tmp_path / "work").iterdir()) == []


@pytest.mark.parametrize("content", ["plain text", ""])
def test_not_a_video_is_one_clear_line(echoshot_cli, tmp_path, shared_weights_dir, content):
    source = tmp_path / "holiday.mp4"
    source.write_text(content)
    run = echoshot_cli("upscale", "--input", str(source), "--no-validation", env={"WEIGHTS_DIR": str(shared_weights_dir)})
    assert run.returncode == 1 and no_traceback(run.stderr)
    assert re.search(r"^error: \[INVALID_VIDEO\] holiday.mp4 is not a readable video", run.stderr, re.M)
    assert list((tmp_path / "work").iterdir()) == []
    assert not (tmp_path / "output_upscaled").exists() or not any((tmp_path / "output_upscaled").iterdir())


def test_missing_input(echoshot_cli, tmp_path):
    run = echoshot_cli("upscale", "--input", str(tmp_path / "nope.mp4"), "--no-validation")
    assert run.returncode == 1 and "[INPUT_NOT_FOUND]" in run.stderr and no_traceback(run.stderr)


def test_unsupported_scale_is_refused_by_the_cli(echoshot_cli, tmp_path):
    run = echoshot_cli("upscale", "--input", "x.mp4", "--scale", "3")
    assert run.returncode == 2 and "invalid choice: 3" in run.stderr


def test_invalid_setting_is_one_clear_line(echoshot_cli):
    run = echoshot_cli("check-env", env={"CPU_TILE": "big"})
    assert run.returncode == 1 and no_traceback(run.stderr)
    assert re.search(r"^error: invalid setting CPU_TILE", run.stderr, re.M)


def test_the_daemon_logs_the_traceback_of_a_bug(monkeypatch, capsys, caplog):
    from echoshot_ai_server import cli

    def broken(settings, **kwargs):
        raise KeyError("a bug")

    monkeypatch.setattr(cli, "build_worker", broken)
    assert cli.main(["worker"]) == 1
    assert capsys.readouterr().err.strip() == "error: KeyError: 'a bug'"
    [record] = [r for r in caplog.records if r.exc_info]
    assert "the worker stopped on an unexpected error" in record.getMessage()
