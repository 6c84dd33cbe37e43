"""One job from the queue: claim it, S3 download -> the frame pipeline -> S3 upload -> Spring told.

The task talks to storage and Spring through the small protocols below, not the adapters' classes.
"""

import logging
import shutil
import threading
import time
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Callable, Protocol

from echoshot_ai_server.app.pipeline import InputLimits, UpscaleResult, upscale_video
from echoshot_ai_server.app.records import Claim, Decision, JobRecords, LostClaim, fingerprint
from echoshot_ai_server.app.workspace import job_workspace
from echoshot_ai_server.engine.upscaler import Upscaler
from echoshot_ai_server.errors import (
    ErrorCode, JobCancelled, JobError, PermanentError, ResultNotReported, RetryableError, human_bytes,
)
from echoshot_ai_server.job import CallbackPayload, JobMessage, JobStatus, ResultMetadata, check_source_key, output_key
from echoshot_ai_server.media.writer import EncoderSettings

# The guide's log lines of a job carry this logger name (its module before the package had wings).
log = logging.getLogger("echoshot_ai_server.tasks.upscale_task")

PROGRESS_CLOSE_WAIT_S = 5


class SourceObject(Protocol):
    key: str
    size: int


class ObjectStore(Protocol):
    """What the task needs of S3 (adapters/s3.py)."""

    def url(self, key: str) -> str: ...
    def head(self, key: str) -> SourceObject | None: ...
    def download(self, source: SourceObject, path: Path, *, max_bytes: int, should_stop: Callable[[], bool]) -> int: ...
    def upload(self, path: Path, key: str, *, content_type: str, metadata: dict[str, str],
               should_stop: Callable[[], bool]) -> None: ...


class Notifier(Protocol):
    """What the task needs of the Spring callback (adapters/spring.py)."""

    timeout_s: float

    def notify(self, payload: CallbackPayload, *, attempts: int | None = None,
               stop: threading.Event | None = None) -> None: ...


class ProgressReporter:
    """PROCESSING callbacks with percent and ETA, sent by a thread of their own.

    The frame loop only records how far it is (`update`) and never waits on the network. At most one
    callback per interval, always the latest figure; the first one and the one at 100 % go at once.
    One attempt each: progress is best effort and never fails the job."""

    def __init__(self, callback: Notifier, job_id: str, interval_s: float):
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
            result, key = self._compute(job, upscaler, attempt.cancel)
            self.records.completed(claim, key, result.metadata.model_dump())
            self._report_completed(job, claim, attempt.cancel)
            return TaskResult(TaskOutcome.COMPLETED, result.metadata.frame_count)
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
                self.storage.upload(workspace / "output.mp4", key, content_type="video/mp4",
                                    metadata=result.metadata.as_s3_metadata(), should_stop=cancel.is_set)
        finally:
            progress.close()
        log.info("result uploaded: %s (%.1fs)", self.storage.url(key), result.elapsed_s)
        return result, key

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
