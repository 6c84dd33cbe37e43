"""One upscaling job.

`upscale_video` is the frame pipeline on local files: probe -> upscaler -> audio -> frames ->
one encode -> check. `UpscaleTask` wraps it for a queued job: S3 in, S3 out, Spring told.
"""

import logging
import threading
import time
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from echoshot_ai_server.background import Prefetch
from echoshot_ai_server.config import Device
from echoshot_ai_server.errors import ErrorCode, JobCancelled, JobError, PermanentError
from echoshot_ai_server.job import CallbackPayload, JobMessage, JobStatus, ResultMetadata
from echoshot_ai_server.upscaler import SUPPORTED_SCALES, Upscaler
from echoshot_ai_server.video import EncoderSettings, FrameReader, FrameWriter, audio_problem, probe
from echoshot_ai_server.workspace import job_workspace

if TYPE_CHECKING:  # the frame pipeline itself needs neither boto3 nor requests
    from echoshot_ai_server.callback import SpringCallback
    from echoshot_ai_server.storage import Storage

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
    should_stop: Callable[[], bool] = lambda: False,
) -> UpscaleResult:
    """Upscale `source` into an H.264 MP4 at `output`, keeping its audio.

    Raises JobError, or JobCancelled when `should_stop()` turns true between two batches.
    """
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
    done = 0
    # Three stages overlap: decoding (a thread), the model (here), encoding (ffmpeg, fed by a thread).
    with FrameReader(source, info.width, info.height) as reader, FrameWriter(
        output,
        width=out_w,
        height=out_h,
        fps=info.fps,
        encoder=encoder,
        audio_source=audio_source,
        duration_s=float(info.frame_count / info.fps),
    ) as writer, Prefetch(reader.batches(upscaler.batch_frames)) as batches:
        for batch in batches:
            if should_stop():
                raise JobCancelled()
            writer.write(upscaler.upscale(batch, scale))
            done += len(batch)
            progress.update(done)
            if on_progress:
                on_progress(done, info.frame_count)
        if done == 0:
            raise PermanentError(ErrorCode.NO_FRAMES, f"{source.name}: no frame could be decoded")
        log.info("프레임 업스케일 완료: %d/%d 프레임 처리", done, info.frame_count)
    if done != info.frame_count:
        log.warning("decoded %d frames where the container declares %d", done, info.frame_count)

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


class _ProgressCallbacks:
    """PROCESSING callbacks with percent and ETA, at most one per interval; never fails the job."""

    def __init__(self, callback: "SpringCallback", job_id: str, interval_s: float):
        self.callback = callback
        self.job_id = job_id
        self.interval_s = interval_s
        self.started = time.monotonic()
        self.last_sent = float("-inf")

    def send(self, done: int, total: int) -> None:
        now = time.monotonic()
        if now - self.last_sent < self.interval_s and done < total:
            return
        self.last_sent = now
        eta = (now - self.started) / done * (total - done) if done else None
        payload = CallbackPayload(
            job_id=self.job_id, status=JobStatus.PROCESSING,
            progress=round(100.0 * done / max(total, 1), 1), eta_seconds=None if eta is None else round(eta, 1),
        )
        try:
            self.callback.notify(payload, attempts=1)
        except JobError as exc:
            log.warning("progress callback not delivered: %s", exc)


@dataclass
class UpscaleTask:
    """One job from the queue: S3 download -> upscale -> S3 upload -> Spring callback -> cleanup."""

    storage: "Storage"
    callback: "SpringCallback"
    work_dir: Path
    encoder: EncoderSettings
    ffprobe: str = "ffprobe"
    progress_interval_s: float = 10

    def run(self, job: JobMessage, upscaler: Upscaler, cancel: threading.Event) -> None:
        """Do the job and send COMPLETED. Raises JobError or JobCancelled; the caller settles the message."""
        key = output_key(job.job_id, job.source_s3_key)
        existing = self.storage.metadata(key)
        if existing is not None:
            log.info("result already in %s: not recomputed, COMPLETED sent again", self.storage.url(key))
            self._completed(job, key, ResultMetadata.model_validate(existing), cancel)
            return

        size = self.storage.size(job.source_s3_key)
        progress = _ProgressCallbacks(self.callback, job.job_id, self.progress_interval_s)
        progress.send(0, 1)
        with job_workspace(self.work_dir, job.job_id) as workspace:
            # The source's own name never reaches the file system: only its extension.
            source = workspace / f"source{Path(job.source_s3_key).suffix[:10]}"
            self.storage.download(job.source_s3_key, source)
            log.info("source downloaded: %s (%.1f MB)", self.storage.url(job.source_s3_key), size / 1e6)
            result = upscale_video(
                source,
                workspace / "output.mp4",
                scale=job.parameters.scale_factor,
                device=job.parameters.device,
                get_upscaler=lambda: upscaler,
                encoder=self.encoder,
                ffprobe=self.ffprobe,
                on_progress=progress.send,
                should_stop=cancel.is_set,
            )
            metadata = ResultMetadata.model_validate(result.metadata())
            self.storage.upload(
                workspace / "output.mp4", key, content_type="video/mp4",
                metadata={k: str(v) for k, v in metadata.model_dump().items()},
            )
        log.info("result uploaded: %s (%.1fs)", self.storage.url(key), result.elapsed_s)
        self._completed(job, key, metadata, cancel)

    def _completed(self, job: JobMessage, key: str, metadata: ResultMetadata, cancel: threading.Event) -> None:
        payload = CallbackPayload(job_id=job.job_id, status=JobStatus.COMPLETED, output_s3_key=key, metadata=metadata)
        self.callback.notify(payload, stop=cancel)
        log.info("COMPLETED callback delivered")
