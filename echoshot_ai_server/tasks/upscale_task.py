"""The frame pipeline of one job: probe -> upscaler -> audio -> frames -> one encode -> check.

It works on local files only; where they come from and go to (a CLI argument, S3) is the
caller's business.
"""

import logging
import time
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Callable

from echoshot_ai_server.config import Device
from echoshot_ai_server.errors import ErrorCode, PermanentError
from echoshot_ai_server.upscaler import SUPPORTED_SCALES, Upscaler
from echoshot_ai_server.video import EncoderSettings, FrameReader, FrameWriter, audio_problem, probe

log = logging.getLogger(__name__)

ProgressFn = Callable[[int, int], None]
PROGRESS_LOG_STEP_PERCENT = 5.0


@dataclass(frozen=True)
class UpscaleResult:
    width: int
    height: int
    fps: Fraction
    frame_count: int
    duration_s: float
    has_audio: bool
    elapsed_s: float

    def metadata(self) -> dict:
        return {
            "width": self.width,
            "height": self.height,
            "fps": round(float(self.fps), 3),
            "frame_count": self.frame_count,
            "duration": round(self.duration_s, 3),
        }


def output_key(job_id: str, source_name: str) -> str:
    """Where a job's result lives in the bucket."""
    return f"processed/upscaled/{job_id}/{Path(source_name).stem}_upscaled.mp4"


def validate_scale(scale: int) -> None:
    if scale not in SUPPORTED_SCALES:
        raise PermanentError(ErrorCode.INVALID_PARAMETERS, f"scale must be 2 or 4, got {scale}")


class _ProgressLog:
    """One log line each time another 5 % of the frames is done."""

    def __init__(self, total: int):
        self.total = max(total, 1)
        self.next_percent = PROGRESS_LOG_STEP_PERCENT

    def update(self, done: int) -> None:
        percent = 100.0 * done / self.total
        if percent < self.next_percent or done >= self.total:
            return
        log.info("업스케일 진행률: %.1f%% (%d/%d)", percent, done, self.total)
        while self.next_percent <= percent:
            self.next_percent += PROGRESS_LOG_STEP_PERCENT


def upscale_video(
    source: Path,
    output: Path,
    *,
    scale: int,
    device: Device,
    get_upscaler: Callable[[], Upscaler],
    encoder: EncoderSettings,
    ffprobe: str = "ffprobe",
    on_progress: ProgressFn | None = None,
) -> UpscaleResult:
    """Upscale `source` into an H.264 MP4 at `output`, keeping its audio. Raises JobError."""
    started = time.monotonic()
    validate_scale(scale)
    log.info("업스케일 작업 시작 - Scale: %dx, Device: %s", scale, device.upper())

    info = probe(source, ffprobe)
    log.info(
        "비디오 정보 - 해상도: %dx%d, FPS: %.1f, 프레임: %d", info.width, info.height, float(info.fps), info.frame_count
    )
    if info.frame_count <= 0:
        raise PermanentError(ErrorCode.NO_FRAMES, f"{source.name} has no video frames")

    upscaler = get_upscaler()
    log.info("업스케일러 초기화 완료 - %s", upscaler.describe())

    audio_source = None
    if info.audio is None:
        log.info("오디오 트랙이 없습니다")
    elif (problem := audio_problem(source, encoder.ffmpeg)) is not None:
        log.warning("오디오 추출 실패 - 오디오 없이 진행합니다: %s", problem)
    else:
        log.info("오디오 트랙 발견 - 코덱: %s", info.audio.codec)
        audio_source = source

    out_w, out_h = info.width * scale, info.height * scale
    log.info("비디오 인코딩 중 (%s)...", "오디오 포함" if audio_source else "오디오 없음")
    progress = _ProgressLog(info.frame_count)
    with FrameReader(source, info.width, info.height) as reader, FrameWriter(
        output,
        width=out_w,
        height=out_h,
        fps=info.fps,
        encoder=encoder,
        audio_source=audio_source,
        duration_s=float(info.frame_count / info.fps),
    ) as writer:
        for batch in reader.batches(upscaler.batch_frames):
            writer.write(upscaler.upscale(batch, scale))
            progress.update(reader.frames_read)
            if on_progress:
                on_progress(reader.frames_read, info.frame_count)
        if reader.frames_read == 0:
            raise PermanentError(ErrorCode.NO_FRAMES, f"{source.name}: no frame could be decoded")
        log.info("프레임 업스케일 완료: %d/%d 프레임 처리", reader.frames_read, info.frame_count)
    if reader.frames_read != info.frame_count:
        log.warning("decoded %d frames where the container declares %d", reader.frames_read, info.frame_count)

    result_info = probe(output, ffprobe)
    if (result_info.width, result_info.height, result_info.frame_count) != (out_w, out_h, writer.frames_written):
        raise PermanentError(
            ErrorCode.OUTPUT_MISMATCH,
            f"encoded {result_info.width}x{result_info.height} with {result_info.frame_count} frames, "
            f"expected {out_w}x{out_h} with {writer.frames_written}",
        )
    log.info("최종 비디오 생성 완료")
    return UpscaleResult(
        width=out_w,
        height=out_h,
        fps=info.fps,
        frame_count=writer.frames_written,
        duration_s=result_info.duration_s,
        has_audio=result_info.has_audio,
        elapsed_s=time.monotonic() - started,
    )
