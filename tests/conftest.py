"""Shared fixtures: real ffmpeg clips, a tiny random RRDBNet, the official weights."""

import json
import logging
import os
import subprocess
import sys
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
import torch

from types import SimpleNamespace

from echoshot_ai_server.dev.local import CallbackReceiver, MotoServer, create_bucket, create_queue_with_dlq
from echoshot_ai_server.engine.models import build_model, reference_model
from echoshot_ai_server.engine.specs import RRDBNetArch
from echoshot_ai_server.engine.upscaler import RunProfile, Upscaler

REPO_ROOT = Path(__file__).resolve().parents[1]
# The official weights live beside the project (nothing can be downloaded in tests).
SHARED_WEIGHTS_DIR = REPO_ROOT.parent / "shared" / "weights"
REGION = "ap-northeast-2"
BUCKET = "echoshotx-videos"
TINY_ARCH = RRDBNetArch(num_feat=8, num_block=1, num_grow_ch=4, scale=4)


def ffmpeg(*args: str) -> None:
    subprocess.run(["ffmpeg", "-nostdin", "-loglevel", "error", "-y", *args], check=True)


def ffprobe_json(path: Path) -> dict:
    out = subprocess.run(
        ["ffprobe", "-v", "error", "-count_frames", "-print_format", "json", "-show_format", "-show_streams", str(path)],
        check=True, capture_output=True, text=True,
    ).stdout
    return json.loads(out)


def streams_of(path: Path, kind: str) -> list[dict]:
    return [s for s in ffprobe_json(path)["streams"] if s["codec_type"] == kind]


def decode_frames(path: Path) -> np.ndarray:
    """All frames of a video as uint8 BGR (N, H, W, 3), decoded by ffmpeg itself."""
    video = streams_of(path, "video")[0]
    w, h = int(video["width"]), int(video["height"])
    raw = subprocess.run(
        ["ffmpeg", "-nostdin", "-loglevel", "error", "-i", str(path), "-f", "rawvideo", "-pix_fmt", "bgr24", "-"],
        check=True, capture_output=True,
    ).stdout
    return np.frombuffer(raw, np.uint8).reshape(-1, h, w, 3)


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)


@pytest.fixture
def make_clip(tmp_path):
    """Generate a test video with ffmpeg: moving content, optional sine audio."""

    def make(
        name: str = "clip.mp4",
        size: tuple[int, int] = (64, 48),
        frames: int = 6,
        fps: str = "10",
        audio_s: float | None = None,
        vcodec: list[str] | None = None,
        acodec: list[str] | None = None,
        pattern: str = "testsrc2",  # testsrc2 rounds odd sizes down; testsrc keeps them (in RGB)
    ) -> Path:
        path = tmp_path / name
        # Half a frame short of the next frame, so that the source yields exactly `frames` frames.
        video_s = float((frames - Fraction(1, 2)) / Fraction(fps))
        args = ["-f", "lavfi", "-i", f"{pattern}=size={size[0]}x{size[1]}:rate={fps}:duration={video_s:.6f}"]
        if audio_s is not None:
            args += ["-f", "lavfi", "-i", f"sine=frequency=440:sample_rate=44100:duration={audio_s}"]
        args += vcodec if vcodec is not None else ["-c:v", "libx264", "-pix_fmt", "yuv420p"]
        if audio_s is not None:
            args += acodec if acodec is not None else ["-c:a", "aac"]
        args.append(str(path))
        ffmpeg(*args)
        return path

    return make


def make_noise_clip(path: Path, size: str = "64x48", seconds: float = 1.95, lossless: bool = False) -> Path:
    """Random noise at 10 fps: a clip that does not compress (about 33 KB for the defaults, x264 CRF 23)."""
    quality = ["-crf", "0"] if lossless else []
    ffmpeg("-f", "lavfi", "-i", f"nullsrc=s={size}:r=10:d={seconds},geq=lum='random(1)*255':cb=128:cr=128",
           "-c:v", "libx264", *quality, "-pix_fmt", "yuv420p", str(path))
    return path


def make_tiny_model(seed: int = 0) -> torch.nn.Module:
    """A small randomly initialised RRDBNet whose output depends visibly on its input."""
    torch.manual_seed(seed)
    model = build_model(TINY_ARCH).eval()
    for module in model.modules():
        if isinstance(module, torch.nn.Conv2d):
            module.reset_parameters()
    with torch.no_grad():
        model.conv_last.bias.fill_(0.5)
        model.conv_last.weight.mul_(8)
    return model


@pytest.fixture
def tiny_checkpoint(tmp_path) -> Path:
    path = tmp_path / "tiny.pth"
    torch.save({"params_ema": make_tiny_model().state_dict()}, path)
    return path


def tiny_upscaler(tile: int = 32, tile_pad: int = 4, fallback_tile: int = 16, batch_frames: int = 2) -> Upscaler:
    return Upscaler(
        make_tiny_model(), device="cpu", profile=RunProfile(half=False, tile=tile, tile_pad=tile_pad,
        fallback_tile=fallback_tile, batch_frames=batch_frames))


@pytest.fixture
def shared_weights_dir() -> Path:
    assert (SHARED_WEIGHTS_DIR / "RealESRGAN_x4plus.pth").is_file(), f"official weights missing in {SHARED_WEIGHTS_DIR}"
    return SHARED_WEIGHTS_DIR


@pytest.fixture
def echoshot_cli(tmp_path):
    """Run the installed `echoshot` command with a private work dir; returns CompletedProcess."""

    def run(*args: str, env: dict | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess:
        full_env = {k: v for k, v in os.environ.items() if k not in ("WEIGHTS_DIR", "WORK_DIR")}
        full_env.update({"WORK_DIR": str(tmp_path / "work")})
        full_env.update(env or {})
        return subprocess.run(
            [sys.executable, "-m", "echoshot_ai_server.cli", *args],
            capture_output=True, text=True, env=full_env, cwd=cwd or tmp_path, timeout=600,
        )

    return run


@pytest.fixture(autouse=True)
def _quiet_logs(caplog):
    caplog.set_level(logging.INFO)


def reference_enhancer(checkpoint: Path, arch: RRDBNetArch, *, tile: int, tile_pad: int, pre_pad: int = 0):
    """realesrgan's own RealESRGANer, fp32 on the CPU: the reference our pixels must equal."""
    model = reference_model(arch)  # basicsr's own network; realesrgan importable after it
    from realesrgan import RealESRGANer

    return RealESRGANer(
        scale=arch.scale, model_path=str(checkpoint), model=model, tile=tile, tile_pad=tile_pad,
        pre_pad=pre_pad, half=False, device=torch.device("cpu"),
    )


@pytest.fixture(scope="session")
def moto_server():
    with MotoServer() as server:
        yield server


@pytest.fixture
def stack(moto_server, tmp_path, monkeypatch):
    """A fresh bucket, job queue (redrive to a DLQ after 3 receives) and callback receiver."""
    moto_server.reset()
    for name, value in moto_server.env(REGION).items():
        monkeypatch.setenv(name, value)
    s3, sqs = moto_server.client("s3", REGION), moto_server.client("sqs", REGION)
    create_bucket(s3, BUCKET, REGION)
    queue_url, dlq_url = create_queue_with_dlq(sqs, "upscale-cpu-queue", max_receive_count=3, visibility_timeout_s=30)
    with CallbackReceiver() as receiver:
        yield SimpleNamespace(
            moto=moto_server, s3=s3, sqs=sqs, queue_url=queue_url, dlq_url=dlq_url, receiver=receiver,
            work_dir=tmp_path / "work",
        )


@pytest.fixture
def small_disk(tmp_path):
    """A 400 KB file system of its own (tmpfs), mounted for the test."""
    if os.geteuid() != 0:
        pytest.skip("mounting a small file system needs root")
    mount = tmp_path / "disk"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=400k,mode=0755", "tmpfs", str(mount)], check=True)
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def fill(disk: Path, leave_bytes: int) -> Path:
    """Take all of the disk's free space but `leave_bytes` (as another job or replica would)."""
    stats = os.statvfs(disk)
    filler = disk / "someone-else"
    with open(filler, "ab") as file:
        file.write(b"\0" * max(0, stats.f_bavail * stats.f_frsize - leave_bytes))
    return filler
