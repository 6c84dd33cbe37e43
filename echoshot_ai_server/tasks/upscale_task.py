"""One upscaling job.

`upscale_video` is the frame pipeline on local files: probe -> upscaler -> audio -> frames ->
one encode -> check. `UpscaleTask` wraps it for a queued job: S3 in, S3 out, Spring told.
"""

import logging
import re
import shutil
import threading
import time
from dataclasses import dataclass
from enum import Enum
from fractions import Fraction
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from echoshot_ai_server.media.prefetch import Prefetch
from echoshot_ai_server.config import InputLimits
from echoshot_ai_server.engine.device import DeviceOutOfMemory
from echoshot_ai_server.engine.specs import Device, scale_problem
from echoshot_ai_server.engine.upscaler import Upscaler
from echoshot_ai_server.errors import (
    ErrorCode, JobCancelled, JobError, PermanentError, ResultNotReported, RetryableError, human_bytes,
)
from echoshot_ai_server.job import CallbackPayload, JobMessage, JobStatus, ResultMetadata, check_source_key
from echoshot_ai_server.job_records import Claim, Decision, JobRecords, LostClaim, fingerprint
from echoshot_ai_server.media.writer import EncoderSettings, FrameWriter
from echoshot_ai_server.media.reader import FrameReader
from echoshot_ai_server.media.probe import VideoInfo, audio_problem, probe
from echoshot_ai_server.workspace import job_workspace

if TYPE_CHECKING:  # the frame pipeline itself needs neither boto3 nor the callback's HTTP
    from echoshot_ai_server.adapters.spring import SpringCallback
    from echoshot_ai_server.adapters.s3 import Storage

log = logging.getLogger(__name__)

ProgressFn = Callable[[int, int], None]
PROGRESS_LOG_STEP_PERCENT = 5.0
# Containers' frame counts can be a little off (AVI counts a trailing packet, for one); a file that
# decodes clearly fewer frames than it declares is truncated or corrupt.
MISSING_FRAMES_TOLERATED = 2
MISSING_SHARE_TOLERATED = 0.02
# The guide's warning, logged wherever a GPU was asked for and the CPU does the work.
GPU_FALLBACK_WARNING = "GPU가 요청되었지만 사용 불가능합니다. CPU로 대체합니다."
PROGRESS_CLOSE_WAIT_S = 5


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
    """Where a job's result lives in the bucket. Only the source's file stem is used, with anything
    but letters, digits, spaces and . _ - replaced, so a file name cannot move the result."""
    stem = re.sub(r"[^\w .-]", "_", Path(source_name).stem).strip(" .") or "video"
    return f"processed/upscaled/{job_id}/{stem[:100]}_upscaled.mp4"


def check_limits(info: VideoInfo, scale: int, limits: InputLimits) -> None:
    """Refuse, before any heavy work, what the settings do not allow."""
    problems = []
    if limits.max_width and info.width > limits.max_width:
        problems.append(f"width {info.width} > {limits.max_width}")
    if limits.max_height and info.height > limits.max_height:
        problems.append(f"height {info.height} > {limits.max_height}")
    if limits.max_pixels and info.width * info.height > limits.max_pixels:
        problems.append(f"{info.width}x{info.height} is more than {limits.max_pixels} pixels")
    if limits.max_duration_s and info.duration_s > limits.max_duration_s:
        problems.append(f"duration {info.duration_s:.1f}s > {limits.max_duration_s:g}s")
    if limits.max_frame_count and info.frame_count > limits.max_frame_count:
        problems.append(f"{info.frame_count} frames > {limits.max_frame_count}")
    if problems:
        raise PermanentError(ErrorCode.INPUT_TOO_LARGE, "input over the limits: " + "; ".join(problems))
    out_pixels = info.width * scale * info.height * scale
    if limits.max_output_pixels and out_pixels > limits.max_output_pixels:
        raise PermanentError(
            ErrorCode.OUTPUT_TOO_LARGE,
            f"{scale}x of {info.width}x{info.height} would be {info.width * scale}x{info.height * scale}, "
            f"more than {limits.max_output_pixels} pixels",
        )


def validate_scale(scale: int) -> None:
    if (problem := scale_problem(scale)) is not None:
        raise PermanentError(ErrorCode.INVALID_PARAMETERS, problem)


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


def _streams_to_keep(source: Path, info: VideoInfo, ffmpeg: str, should_stop) -> tuple[bool, tuple[int, ...]]:
    """Whether the audio goes along (all of it, when it decodes) and which subtitle streams do."""
    audio = False
    if info.audio is None:
        log.info("오디오 트랙이 없습니다")
    elif (problem := audio_problem(source, ffmpeg, should_stop)) is not None:
        log.warning("오디오 추출 실패 - 오디오 없이 진행합니다: %s", problem)
    else:
        log.info("오디오 트랙 발견 - 코덱: %s", ", ".join(a.codec for a in info.audio_streams))
        audio = True
    subtitles = tuple(sub.stream_index for sub in info.subtitles if sub.is_text)
    if len(subtitles) < len(info.subtitles):
        log.warning("bitmap subtitles cannot go into MP4 and are left out: %s",
                    ", ".join(sub.codec for sub in info.subtitles if not sub.is_text))
    return audio, subtitles


def _check_every_frame_decoded(done: int, declared: int) -> None:
    if declared - done > max(MISSING_FRAMES_TOLERATED, declared * MISSING_SHARE_TOLERATED):
        raise PermanentError(
            ErrorCode.DECODE_FAILED, f"only {done} of {declared} frames could be decoded: truncated or corrupt"
        )
    if done != declared:
        log.warning("decoded %d frames where the container declares %d", done, declared)


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
    limits: InputLimits = InputLimits(),
) -> UpscaleResult:
    """Upscale `source` into an H.264 MP4 at `output`, keeping its audio.

    Raises JobError, or JobCancelled when `should_stop()` turns true between two batches.
    """
    started = time.monotonic()
    validate_scale(scale)
    log.info("업스케일 작업 시작 - Scale: %dx, Device: %s", scale, device.upper())

    info = probe(source, ffprobe, should_stop)
    width, height = info.display_size
    log.info("비디오 정보 - 해상도: %dx%d, FPS: %.1f, 프레임: %d", width, height, float(info.fps), info.frame_count)
    if info.is_still_image:
        raise PermanentError(ErrorCode.INVALID_VIDEO, f"{source.name} is a still image ({info.format_name}), not a video")
    if info.frame_count <= 0:
        raise PermanentError(ErrorCode.NO_FRAMES, f"{source.name} has no video frames")
    check_limits(info, scale, limits)

    upscaler = get_upscaler()
    if device == "gpu" and upscaler.device != "gpu":
        log.warning(GPU_FALLBACK_WARNING)
    log.info("업스케일러 초기화 완료 - %s", upscaler.describe())

    audio, subtitles = _streams_to_keep(source, info, encoder.ffmpeg, should_stop)
    out_w, out_h = width * scale, height * scale
    log.info("비디오 인코딩 중 (%s)...", "오디오 포함" if audio else "오디오 없음")
    progress = _ProgressLog(info.frame_count)
    done = 0
    # Three stages overlap: decoding (a thread), the model (here), encoding (ffmpeg, fed by a thread).
    with FrameReader(source, width, height) as reader, FrameWriter(
        output,
        width=out_w,
        height=out_h,
        fps=info.fps,
        encoder=encoder,
        streams_from=source,
        audio=audio,
        subtitles=subtitles,
        duration_s=float(info.frame_count / info.fps),
    ) as writer, Prefetch(reader.batches(upscaler.batch_frames)) as batches:
        for batch in batches:
            if should_stop():
                raise JobCancelled()
            try:
                writer.write(upscaler.upscale(batch, scale))
            except DeviceOutOfMemory as exc:
                raise RetryableError(ErrorCode.OUT_OF_MEMORY, str(exc)) from exc
            done += len(batch)
            progress.update(done)
            if on_progress:
                on_progress(done, info.frame_count)
        if done == 0:
            raise PermanentError(ErrorCode.NO_FRAMES, f"{source.name}: no frame could be decoded")
        log.info("프레임 업스케일 완료: %d/%d 프레임 처리", done, info.frame_count)
    _check_every_frame_decoded(done, info.frame_count)
    result_info = _probe_result(output, ffprobe, should_stop)
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


def _probe_result(output: Path, ffprobe: str, should_stop) -> VideoInfo:
    """The encoded file's facts. The file is of our own making: if it is missing or unreadable,
    something happened to the disk or the encoder, which is worth another attempt."""
    try:
        return probe(output, ffprobe, should_stop)
    except PermanentError as exc:
        raise RetryableError(ErrorCode.ENCODE_FAILED, f"the encoded file cannot be read back: {exc.message}") from exc


class ProgressReporter:
    """PROCESSING callbacks with percent and ETA, sent by a thread of their own.

    The frame loop only records how far it is (`update`) and never waits on the network. At most one
    callback per interval, always the latest figure; the first one and the one at 100 % go at once.
    One attempt each: progress is best effort and never fails the job."""

    def __init__(self, callback: "SpringCallback", job_id: str, interval_s: float):
        self.callback = callback
        self.job_id = job_id
        self.interval_s = interval_s
        self._abort = threading.Event()  # ends a callback in flight
        self.started = time.monotonic()
        self._pending: tuple[int, int] | None = None
        self._closing = False
        self._changed = threading.Condition()
        self._thread = threading.Thread(target=self._run, name=f"progress-{job_id}", daemon=True)
        self._thread.start()

    def update(self, done: int, total: int) -> None:
        with self._changed:
            self._pending = (done, total)
            self._changed.notify()

    def close(self) -> None:
        """Send what is pending (the 100 % figure), then stop. A Spring that takes longer than a few
        seconds does not hold up the job: the callback in flight is abandoned (so that no PROCESSING
        can arrive after the job's final callback)."""
        with self._changed:
            self._closing = True
            self._changed.notify()
        self._thread.join(timeout=PROGRESS_CLOSE_WAIT_S)
        self._abort.set()
        self._thread.join()

    def _run(self) -> None:
        last_sent = float("-inf")
        while True:
            with self._changed:
                while True:
                    final = self._pending is not None and self._pending[0] >= self._pending[1]
                    if self._closing and not final:
                        return  # a figure short of 100 % is not worth a callback once the job has ended
                    wait_s = None if self._pending is None else 0 if final else last_sent + self.interval_s - time.monotonic()
                    if wait_s is not None and wait_s <= 0:
                        done, total = self._pending
                        self._pending = None
                        break
                    self._changed.wait(wait_s)
            last_sent = time.monotonic()
            self._send(done, total)

    def _send(self, done: int, total: int) -> None:
        elapsed = time.monotonic() - self.started
        eta = elapsed / done * (total - done) if done else None
        payload = CallbackPayload(
            job_id=self.job_id, status=JobStatus.PROCESSING,
            progress=round(100.0 * done / max(total, 1), 1), eta_seconds=None if eta is None else round(eta, 1),
        )
        try:
            self.callback.notify(payload, attempts=1, stop=self._abort)
        except JobCancelled:
            log.warning("progress callback abandoned: the job has ended")
        except Exception as exc:  # noqa: BLE001 - best effort: nothing may end this thread early
            log.warning("progress callback not delivered: %s", exc)


class TaskOutcome(str, Enum):
    COMPLETED = "completed"  # computed, uploaded, COMPLETED acknowledged
    REPORTED = "reported"  # the result existed: COMPLETED sent for it
    DUPLICATE = "duplicate"  # done, or being done, under another message: nothing to do


@dataclass(frozen=True)
class TaskResult:
    outcome: TaskOutcome
    frames: int = 0


@dataclass(frozen=True)
class JobAttempt:
    """What the worker hands the task about one delivery of a message."""

    message_id: str
    cancel: threading.Event  # set: stop now, the message goes back to the queue
    keep_alive: Callable[[Callable[[], None]], None]  # registers a renewal to run with the message's heartbeat
    final: bool = False  # the queue's last attempt: a failure now is the job's end


@dataclass
class UpscaleTask:
    """One job from the queue: S3 download -> upscale -> S3 upload -> Spring callback -> cleanup."""

    storage: "Storage"
    callback: "SpringCallback"
    records: JobRecords
    work_dir: Path
    encoder: EncoderSettings
    ffprobe: str = "ffprobe"
    progress_interval_s: float = 10
    limits: InputLimits = InputLimits()
    allowed_source_prefixes: tuple[str, ...] = ("uploads/",)
    disk_headroom_bytes: int = 2**30

    def run(self, job: JobMessage, upscaler: Upscaler, attempt: JobAttempt) -> TaskResult:
        """Do the job, or find that it is done or being done. Raises JobError or JobCancelled; the
        caller settles the message."""
        check_source_key(job.source_s3_key, list(self.allowed_source_prefixes))
        wanted = fingerprint(job.source_s3_key, job.parameters.model_dump(mode="json"))
        decision, claim = self.records.claim(job.job_id, wanted, attempt.message_id)
        if decision is Decision.DUPLICATE:
            return TaskResult(TaskOutcome.DUPLICATE)
        if decision is Decision.BUSY:
            raise RetryableError(ErrorCode.JOB_ID_IN_USE, "another message with this jobId but other work is in progress")
        attempt.keep_alive(lambda: self.records.renew(claim))
        try:
            if decision is Decision.REPORT:
                log.info("result already in %s: not recomputed, COMPLETED sent again",
                         self.storage.url(claim.record.output_key))
                self._report_completed(job, claim, attempt.cancel)
                return TaskResult(TaskOutcome.REPORTED)
            result, key, metadata = self._compute(job, upscaler, attempt.cancel)
            self.records.completed(claim, key, metadata.model_dump())
            self._report_completed(job, claim, attempt.cancel)
            return TaskResult(TaskOutcome.COMPLETED, result.frame_count)
        except LostClaim as exc:  # our hold lapsed (a stall longer than the lease) and another attempt has the job
            log.warning("%s: it reports the job, this attempt stops", exc)
            return TaskResult(TaskOutcome.DUPLICATE)
        except JobError as exc:
            if isinstance(exc, PermanentError) or attempt.final:
                self._let_go(claim)
            raise

    def _let_go(self, claim: Claim) -> None:
        try:
            self.records.let_go(claim)
        except Exception as exc:  # noqa: BLE001 - the job's own error is the one to report; the hold expires anyway
            log.warning("could not free the job record: %s", exc)

    def _compute(self, job: JobMessage, upscaler: Upscaler, cancel: threading.Event):
        source_object = self.storage.head(job.source_s3_key)
        if source_object is None:
            raise PermanentError(ErrorCode.SOURCE_NOT_FOUND, f"{self.storage.url(job.source_s3_key)}: not found")
        max_bytes = self.limits.max_download_bytes
        if max_bytes and source_object.size > max_bytes:
            raise PermanentError(ErrorCode.INPUT_TOO_LARGE, f"source is {source_object.size} bytes, more than {max_bytes}")
        self._check_disk(source_object.size, job.parameters.scale_factor)
        progress = ProgressReporter(self.callback, job.job_id, self.progress_interval_s)
        progress.update(0, 1)
        key = output_key(job.job_id, job.source_s3_key)
        try:
            with job_workspace(self.work_dir, job.job_id) as workspace:
                # The source's own name never reaches the file system: only its extension.
                source = workspace / f"source{Path(job.source_s3_key).suffix[:10]}"
                self.storage.download(source_object, source, max_bytes=max_bytes, should_stop=cancel.is_set)
                log.info("source downloaded: %s (%s)", self.storage.url(job.source_s3_key), human_bytes(source_object.size))
                result = self._upscale(job, source, workspace / "output.mp4", upscaler, progress, cancel)
                metadata = ResultMetadata.model_validate(result.metadata())
                self.storage.upload(
                    workspace / "output.mp4", key, content_type="video/mp4",
                    metadata={k: str(v) for k, v in metadata.model_dump().items()}, should_stop=cancel.is_set,
                )
        finally:
            progress.close()
        log.info("result uploaded: %s (%.1fs)", self.storage.url(key), result.elapsed_s)
        return result, key, metadata

    def _upscale(self, job: JobMessage, source: Path, output: Path, upscaler: Upscaler, progress: ProgressReporter,
                 cancel: threading.Event) -> UpscaleResult:
        try:
            return upscale_video(
                source, output, scale=job.parameters.scale_factor, device=job.parameters.device,
                get_upscaler=lambda: upscaler, encoder=self.encoder, ffprobe=self.ffprobe,
                on_progress=progress.update, should_stop=cancel.is_set, limits=self.limits,
            )
        except PermanentError as exc:
            if exc.code == ErrorCode.INPUT_NOT_FOUND:  # our own download vanished: not the job's fault
                raise RetryableError(ErrorCode.WORK_DIR_UNUSABLE, "the downloaded source disappeared from the work directory") from exc
            raise

    def _check_disk(self, source_bytes: int, scale: int) -> None:
        """Room for the source and a result that may be scale^2 times its size, plus headroom."""
        try:
            self.work_dir.mkdir(parents=True, exist_ok=True)
            free = shutil.disk_usage(self.work_dir).free
        except OSError as exc:
            raise RetryableError(ErrorCode.WORK_DIR_UNUSABLE, f"work directory unusable: {exc.strerror}") from exc
        needed = source_bytes * (1 + scale * scale) + self.disk_headroom_bytes
        if free < needed:
            raise RetryableError(
                ErrorCode.INSUFFICIENT_DISK, f"{human_bytes(free)} free in the work directory, {human_bytes(needed)} needed "
                f"(a {human_bytes(source_bytes)} source, its result, and {human_bytes(self.disk_headroom_bytes)} to spare)",
            )

    def _report_completed(self, job: JobMessage, claim: Claim, cancel: threading.Event) -> None:
        """COMPLETED for a result that is in S3. From here on the job can no longer fail: a callback
        that does not go through is retried later, never turned into FAILED."""
        record = claim.record
        payload = CallbackPayload(job_id=job.job_id, status=JobStatus.COMPLETED, output_s3_key=record.output_key,
                                  metadata=ResultMetadata.model_validate(record.metadata))
        try:
            self.callback.notify(payload, stop=cancel)
        except PermanentError as exc:
            log.error("%s; the result stays at %s", exc, self.storage.url(record.output_key))
        except RetryableError as exc:
            raise ResultNotReported(exc.code, exc.message) from exc
        else:
            log.info("COMPLETED callback delivered")
        self.records.reported(claim)
