"""One job from the queue: claim it, S3 download -> the frame pipeline -> S3 upload -> Spring told.

A job longer than `segment_s` is cut into segments instead (app/segment_steps.py). The task talks
to storage, the queue and Spring through the small protocols below, not the adapters' classes.
"""

import logging
import shutil
import threading
import time
from dataclasses import dataclass, replace
from pathlib import Path
from collections.abc import Mapping
from typing import Callable, Protocol

from echoshot_ai_server.app.attempt import JobAttempt, TaskOutcome, TaskResult
from echoshot_ai_server.app.cancel import CancelWatch, cancel_key
from echoshot_ai_server.app.estimate import ComputeEstimator
from echoshot_ai_server.app.pipeline import InputLimits, UpscaleResult, upscale_video
from echoshot_ai_server.app.progress import Notifier, ProgressReporter
from echoshot_ai_server.app.records import Claim, Decision, JobRecords, LostClaim, fingerprint
from echoshot_ai_server.app.segment_steps import SegmentSteps
from echoshot_ai_server.app.segments import Segment, SegmentPlan
from echoshot_ai_server.app.workspace import job_workspace
from echoshot_ai_server.engine.upscaler import Upscaler
from echoshot_ai_server.errors import (
    ErrorCode, JobCancelled, JobError, PermanentError, ResultNotReported, RetryableError, human_bytes,
)
from echoshot_ai_server.job import (
    CallbackPayload, JobMessage, JobStatus, ResultMetadata, Usage, check_source_key, output_key,
)
from echoshot_ai_server.media.writer import EncoderSettings

# The guide's log lines of a job carry this logger name (its module before the package had wings).
log = logging.getLogger("echoshot_ai_server.tasks.upscale_task")

__all__ = ["JobAttempt", "TaskOutcome", "TaskResult", "UpscaleTask"]


class SourceObject(Protocol):
    key: str
    size: int
    etag: str
    version_id: str | None


class ObjectStore(Protocol):
    """What the task needs of S3 (adapters/s3.py)."""

    def url(self, key: str) -> str: ...
    def head(self, key: str) -> SourceObject | None: ...
    def download(self, source: SourceObject, path: Path, *, max_bytes: int, should_stop: Callable[[], bool]) -> int: ...
    def upload(self, path: Path, key: str, *, content_type: str, metadata: dict[str, str],
               should_stop: Callable[[], bool], tags: dict[str, str] | None = None) -> None: ...
    def list_keys(self, prefix: str) -> dict[str, int]: ...
    def delete_prefix(self, prefix: str) -> int: ...


@dataclass
class UpscaleTask:
    """One job from the queue: S3 download -> upscale -> S3 upload -> Spring callback -> cleanup."""

    storage: ObjectStore
    callback: Notifier
    records: JobRecords
    work_dir: Path
    encoder: EncoderSettings
    ffprobe: str = "ffprobe"
    progress_interval_s: float = 10
    limits: InputLimits = InputLimits()
    allowed_source_prefixes: tuple[str, ...] = ("uploads/",)
    disk_headroom_bytes: int = 2**30
    segment_s: float = 0  # jobs longer than this are cut into segments of about this length (0: never)
    estimator: ComputeEstimator | None = None  # estimates (and refuses) a job's compute before its frames
    pre_resize_max_height: int = 0  # taller sources are scaled down to this height first (0: never)
    cancel_check_s: float = 2  # how often a running job looks for Spring's cancel marker

    def run(self, job: JobMessage, models: Mapping[str, Upscaler], attempt: JobAttempt) -> TaskResult:
        """Do the job (or one step of a job cut into segments) with the model it asks for among
        `models`, or find that it is done or being done. Raises JobError or JobCancelled; the caller
        settles the message."""
        check_source_key(job.source_s3_key, list(self.allowed_source_prefixes))
        upscaler = model_for(job, models)
        if self.cancel_requested(job):  # cancelled while it waited in the queue: never processed
            return self._cancelled(job, attempt)
        with CancelWatch(lambda: self.cancel_requested(job), attempt.cancel, self.cancel_check_s) as watch:
            try:
                return self._run(job, upscaler, replace(attempt, cancel=watch.stop))
            except JobCancelled:
                if not watch.by_request:
                    raise
        return self._cancelled(job, attempt)

    def _run(self, job: JobMessage, upscaler: Upscaler, attempt: JobAttempt) -> TaskResult:
        if job.segment is not None:
            return SegmentSteps(self, attempt.queue).run(job, upscaler, attempt)
        wanted = fingerprint(job.source_s3_key, job.parameters.work())
        decision, claim = self.records.claim(job.job_id, wanted, attempt.message_id)
        if decision is Decision.DUPLICATE:
            return TaskResult(TaskOutcome.DUPLICATE)
        if decision is Decision.BUSY:
            raise RetryableError(ErrorCode.JOB_ID_IN_USE, "another message with this jobId but other work is in progress")
        if decision is Decision.SEGMENTED:  # cut by this message before: make sure every segment's message is out
            SegmentSteps(self, attempt.queue).send_segments(job, SegmentPlan.from_json(claim.record.plan))
            return TaskResult(TaskOutcome.SPLIT)
        attempt.keep_alive(lambda: self.records.renew(claim))
        try:
            if decision is Decision.REPORT:
                log.info("result already in %s: not recomputed, COMPLETED sent again",
                         self.storage.url(claim.record.output_key))
                self.report_completed(job, claim, attempt.cancel)
                return TaskResult(TaskOutcome.REPORTED)
            return self._compute(job, upscaler, claim, attempt)
        except LostClaim as exc:  # our hold lapsed (a stall longer than the lease) and another attempt has the job
            log.warning("%s: it reports the job, this attempt stops", exc)
            return TaskResult(TaskOutcome.DUPLICATE)
        except JobError as exc:
            if isinstance(exc, PermanentError) or attempt.final:
                self.let_go(claim)
            raise

    def cancel_requested(self, job: JobMessage) -> bool:
        return self.storage.head(cancel_key(job.job_id)) is not None

    def _cancelled(self, job: JobMessage, attempt: JobAttempt) -> TaskResult:
        """Spring cancelled the job: mark its record, remove what it left in S3, and tell Spring once."""
        decision, plan = self.records.cancel(job.job_id, attempt.message_id)
        if decision == "too late":  # it ended first: its own outcome stands (sent again on redelivery)
            log.info("cancel request for a job that has ended: its result stands")
            raise JobCancelled()
        if decision == "drop":
            log.info("job cancelled by request (reported by another attempt): message dropped")
            return TaskResult(TaskOutcome.CANCELLED)
        if plan is not None:
            SegmentSteps(self, attempt.queue).remove_pieces(job, plan["run"])
        self.callback.notify(CallbackPayload(job_id=job.job_id, status=JobStatus.CANCELLED), stop=attempt.cancel)
        self.records.cancel_reported(job.job_id)
        log.info("job cancelled by request: CANCELLED callback delivered")
        return TaskResult(TaskOutcome.CANCELLED)

    def let_go(self, claim: Claim) -> None:
        try:
            self.records.let_go(claim)
        except Exception as exc:  # noqa: BLE001 - the job's own error is the one to report; the hold expires anyway
            log.warning("could not free the record %s: %s", claim.name, exc)

    def find_source(self, job: JobMessage) -> SourceObject:
        source_object = self.storage.head(job.source_s3_key)
        if source_object is None:
            raise PermanentError(ErrorCode.SOURCE_NOT_FOUND, f"{self.storage.url(job.source_s3_key)}: not found")
        max_bytes = self.limits.max_download_bytes
        if max_bytes and source_object.size > max_bytes:
            raise PermanentError(ErrorCode.INPUT_TOO_LARGE, f"source is {source_object.size} bytes, more than {max_bytes}")
        return source_object

    def fetch_source(self, job: JobMessage, source_object: SourceObject, workspace: Path, cancel: threading.Event) -> Path:
        # The source's own name never reaches the file system: only its extension.
        source = workspace / f"source{Path(job.source_s3_key).suffix[:10]}"
        self.storage.download(source_object, source, max_bytes=self.limits.max_download_bytes, should_stop=cancel.is_set)
        log.info("source downloaded: %s (%s)", self.storage.url(job.source_s3_key), human_bytes(source_object.size))
        return source

    def _compute(self, job: JobMessage, upscaler: Upscaler, claim: Claim, attempt: JobAttempt) -> TaskResult:
        cancel = attempt.cancel
        started = time.monotonic()
        source_object = self.find_source(job)
        self.check_disk(source_object.size, job.parameters.scale_factor)
        progress = ProgressReporter(self.callback, job.job_id, self.progress_interval_s)
        key = output_key(job.job_id, job.source_s3_key)
        try:
            with job_workspace(self.work_dir, job.job_id) as workspace:
                source = self.fetch_source(job, source_object, workspace, cancel)
                if attempt.queue is not None and SegmentSteps(self, attempt.queue).split(
                        job, source, source_object, claim, upscaler, progress, cancel):
                    return TaskResult(TaskOutcome.SPLIT)
                result = self.upscale(job, source, workspace / "output.mp4", upscaler, progress, cancel,
                                      frames_done=attempt.frames_done)
                self.storage.upload(workspace / "output.mp4", key, content_type="video/mp4",
                                    metadata=result.metadata.as_s3_metadata(), should_stop=cancel.is_set)
        finally:
            progress.close()
        log.info("result uploaded: %s (%.1fs)", self.storage.url(key), result.elapsed_s)
        usage = Usage(billed_seconds=result.metadata.duration, compute_seconds=round(time.monotonic() - started, 1))
        self.records.completed(claim, key, result.metadata.model_dump(), usage.model_dump(by_alias=True))
        self.report_completed(job, claim, cancel)
        return TaskResult(TaskOutcome.COMPLETED, result.metadata.frame_count, usage.billed_seconds, usage.compute_seconds)

    def upscale(self, job: JobMessage, source: Path, output: Path, upscaler: Upscaler, progress: ProgressReporter,
                cancel: threading.Event, segment: Segment | None = None,
                should_stop: Callable[[], bool] | None = None, max_input_height: int | None = None,
                frames_done: Callable[[], None] = lambda: None) -> UpscaleResult:
        def before_frames(frames: int, width: int, height: int) -> None:
            if segment is None:  # a job in segments was estimated whole when it was cut
                progress.start(self.estimate(job, upscaler, frames, width, height))

        try:
            return upscale_video(
                source, output, scale=job.parameters.scale_factor, device=job.parameters.device,
                get_upscaler=lambda: upscaler, encoder=self.encoder, ffprobe=self.ffprobe,
                on_progress=progress.update, should_stop=should_stop or cancel.is_set, limits=self.limits,
                segment=segment, before_frames=before_frames, frames_done=frames_done,
                max_input_height=self.max_input_height(job) if max_input_height is None else max_input_height,
            )
        except PermanentError as exc:
            if exc.code == ErrorCode.INPUT_NOT_FOUND:  # our own download vanished: not the job's fault
                raise RetryableError(ErrorCode.WORK_DIR_UNUSABLE, "the downloaded source disappeared from the work directory") from exc
            raise

    def estimate(self, job: JobMessage, upscaler: Upscaler, frames: int, width: int, height: int) -> float | None:
        """The compute time of `frames` at this size (None: no estimator); JOB_TOO_LARGE over the limit."""
        if self.estimator is None:
            return None
        return self.estimator.check(job.parameters.model, upscaler, frames, width, height)

    def max_input_height(self, job: JobMessage) -> int:
        """The height sources are scaled down to first: the job's or the setting's, the lower (0: none)."""
        asked = [h for h in (job.parameters.max_input_height, self.pre_resize_max_height) if h]
        return min(asked, default=0)

    def check_disk(self, source_bytes: int, scale: int) -> None:
        """Room for the source and a result that may be scale^2 times its size (twice, while a video
        encoded in parts is joined), plus headroom."""
        try:
            self.work_dir.mkdir(parents=True, exist_ok=True)
            free = shutil.disk_usage(self.work_dir).free
        except OSError as exc:
            raise RetryableError(ErrorCode.WORK_DIR_UNUSABLE, f"work directory unusable: {exc.strerror}") from exc
        results = 2 if self.encoder.part_s > 0 else 1
        needed = source_bytes * (1 + results * scale * scale) + self.disk_headroom_bytes
        if free < needed:
            raise RetryableError(
                ErrorCode.INSUFFICIENT_DISK, f"{human_bytes(free)} free in the work directory, {human_bytes(needed)} needed "
                f"(a {human_bytes(source_bytes)} source, its result, and {human_bytes(self.disk_headroom_bytes)} to spare)",
            )

    def report_completed(self, job: JobMessage, claim: Claim, cancel: threading.Event) -> None:
        """COMPLETED for a result that is in S3. From here on the job can no longer fail: a callback
        that does not go through is retried later, never turned into FAILED."""
        record = claim.record
        payload = CallbackPayload(job_id=job.job_id, status=JobStatus.COMPLETED, output_s3_key=record.output_key,
                                  metadata=ResultMetadata.model_validate(record.metadata),
                                  usage=Usage.model_validate(record.usage) if record.usage else None)
        try:
            self.callback.notify(payload, stop=cancel)
        except PermanentError as exc:
            log.error("%s; the result stays at %s", exc, self.storage.url(record.output_key))
        except RetryableError as exc:
            raise ResultNotReported(exc.code, exc.message) from exc
        else:
            log.info("COMPLETED callback delivered")
        self.records.reported(claim)


def model_for(job: JobMessage, models: Mapping[str, Upscaler]) -> Upscaler:
    name = job.parameters.model
    if name not in models:
        raise PermanentError(ErrorCode.INVALID_PARAMETERS,
                             f"model {name} is not served by this worker (MODELS: {', '.join(models)})")
    return models[name]
