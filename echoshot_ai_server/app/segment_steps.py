"""A long job across many workers: cut into segments, each segment a message, then one assembly.

SQS and S3 are the whole machinery (docs/job-contract.md, "Long videos"):
1. The job's message is claimed as usual. Its worker downloads and probes the source; a video
   longer than `segment_s` is planned (app/segments.py), the plan goes into the job's record
   (state "segmented") and one message per segment goes on the queue; the job's message is done.
2. Any worker takes a segment's message: claims the segment's record, decodes exactly its frames,
   upscales them and stores the segment's video under the job's prefix. A segment whose video is
   already stored is not computed again. The worker then lists the stored segments; when all are
   there it sends the assembly message. (Each worker lists after its own upload, so the last of
   two that finish together always sees both.)
3. The worker that takes the assembly message claims the job's record, joins the segments by
   stream copy with the source's audio, uploads the result, sends COMPLETED once, and removes
   the segments and their records.
A segment that fails for good fails the job: the first such segment marks the job's record failed
and reports FAILED with its error; every other step of that plan finds the job over and drops.
"""

import hashlib
import logging
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING

from echoshot_ai_server.app.attempt import JobAttempt, MessageSender, TaskOutcome, TaskResult
from echoshot_ai_server.app.pipeline import check_limits, input_size, join_segments
from echoshot_ai_server.app.progress import ProgressReporter
from echoshot_ai_server.app.records import Claim, Decision, LostClaim, fingerprint
from echoshot_ai_server.app.segments import (
    SEGMENT_TAG, Segment, SegmentPlan, SourceVersion, cut, new_run, part_key, part_record_name, part_records_prefix,
    parts_prefix, progress_key,
)
from echoshot_ai_server.app.workspace import job_workspace
from echoshot_ai_server.engine.upscaler import Upscaler
from echoshot_ai_server.errors import ErrorCode, JobCancelled, JobError, PermanentError, RetryableError
from echoshot_ai_server.job import JobMessage, SegmentStep, Usage, output_key
from echoshot_ai_server.media.probe import probe

if TYPE_CHECKING:
    from echoshot_ai_server.app.task import UpscaleTask

# The guide's log lines of a job carry this logger name (its module before the package had wings).
log = logging.getLogger("echoshot_ai_server.tasks.upscale_task")

TAGS = dict([SEGMENT_TAG])


def _message_ids(job: JobMessage, step: str) -> dict[str, str]:
    """FIFO queues: each segment in a group of its own (so that segments run side by side), and a
    deduplication id per step of the plan (so that sending a step twice puts it on the queue once)."""
    digest = hashlib.sha256(f"{job.job_id}/{step}".encode()).hexdigest()
    return {"group_id": digest, "dedup_id": digest}


class SegmentSteps:
    def __init__(self, task: "UpscaleTask", queue: MessageSender):
        """`queue`: the queue of the job's messages, where its segments' messages go."""
        self.task = task
        self.queue = queue
        self.storage = task.storage
        self.records = task.records

    # -- 1. the job's message ---------------------------------------------------------------
    def split(self, job: JobMessage, source: Path, source_object, claim: Claim, upscaler: Upscaler,
              progress: ProgressReporter, cancel: threading.Event) -> bool:
        """Cut the job into segments if it is long enough; False: it runs in one piece. The whole job
        is estimated (and may be refused) here, and its first PROCESSING sent with the estimate."""
        if self.task.segment_s <= 0:
            return False
        info = probe(source, self.task.ffprobe, cancel.is_set)
        segments = cut(info, self.task.segment_s)
        if segments is None:
            return False
        max_input_height = self.task.max_input_height(job)
        size = input_size(info, max_input_height)
        check_limits(info, job.parameters.scale_factor, self.task.limits, size)
        progress.start(self.task.estimate(job, upscaler, info.frame_count, *size))
        plan = SegmentPlan(new_run(), tuple(segments),
                           SourceVersion(source_object.key, source_object.size, source_object.etag,
                                         source_object.version_id), time.time(), max_input_height)
        self.records.segmented(claim, plan.to_json())
        log.info("%.1fs of video cut into %d segments of about %.1fs (plan %s)", info.video_duration_s, len(segments),
                 info.video_duration_s / len(segments), plan.run)
        self.send_segments(job, plan)
        return True

    def send_segments(self, job: JobMessage, plan: SegmentPlan) -> None:
        queue = self.queue
        for segment in plan.segments:
            queue.send(job.body_for(SegmentStep(run=plan.run, index=segment.index)),
                       **_message_ids(job, f"{plan.run}/{segment.name}"))
        log.info("%d segment messages sent", len(plan.segments))

    # -- 2. and 3. ----------------------------------------------------------------------------
    def run(self, job: JobMessage, upscaler: Upscaler, attempt: JobAttempt) -> TaskResult:
        wanted = fingerprint(job.source_s3_key, job.parameters.work())
        if job.segment.assemble:
            return self._assemble(job, wanted, attempt)
        found = self.records.read(job.job_id)
        plan = self._plan_in_progress(found[0] if found else None, wanted, job.segment.run)
        if plan is None:
            log.info("segment %d of a job no longer in progress under plan %s: dropped", job.segment.index,
                     job.segment.run)
            return TaskResult(TaskOutcome.DUPLICATE)
        if job.segment.index >= len(plan.segments):
            raise PermanentError(ErrorCode.INVALID_MESSAGE, f"segment {job.segment.index} is not in plan {plan.run}")
        return self._segment(job, wanted, plan, plan.segments[job.segment.index], upscaler, attempt)

    @staticmethod
    def _plan_in_progress(record, wanted: str, run: str) -> SegmentPlan | None:
        if record is None or record.fingerprint != wanted or record.state != "segmented":
            return None
        if (record.plan or {}).get("run") != run:
            return None
        return SegmentPlan.from_json(record.plan)

    def _segment(self, job: JobMessage, wanted: str, plan: SegmentPlan, segment: Segment, upscaler: Upscaler,
                 attempt: JobAttempt) -> TaskResult:
        decision, claim = self.records.claim(part_record_name(job.job_id, plan.run, segment), wanted,
                                             attempt.message_id, tags=TAGS)
        if decision is not Decision.WORK:  # being done under another message, or done
            if decision is Decision.REPORT:
                self.records.reported(claim)
            self._assemble_when_complete(job, plan)
            return TaskResult(TaskOutcome.DUPLICATE)
        attempt.keep_alive(lambda: self.records.renew(claim))
        key = part_key(job.job_id, plan.run, segment)
        progress = WholeJobProgress(self, job, plan, segment)
        started = time.monotonic()
        try:
            if self.storage.head(key) is not None:
                log.info("segment %d is stored already: not computed again", segment.index)
            else:
                self._compute_segment(job, plan, segment, key, upscaler, progress, attempt)
            seconds = round(time.monotonic() - started, 1)
            self.records.completed(claim, key, {"frames": segment.frames, "seconds": seconds})
            self.records.reported(claim)
        except LostClaim as exc:
            log.warning("%s: it does this segment, this attempt stops", exc)
            return TaskResult(TaskOutcome.DUPLICATE)
        except JobCancelled:
            if progress.job_over.is_set():
                log.info("segment %d stopped: the job failed meanwhile", segment.index)
                return TaskResult(TaskOutcome.DUPLICATE)
            raise
        except JobError as exc:
            if not (isinstance(exc, PermanentError) or attempt.final):
                raise
            self.task.let_go(claim)
            if not self.records.fail_segmented(job.job_id, plan.run):
                return TaskResult(TaskOutcome.DUPLICATE)  # another segment failed it first and reported
            log.error("segment %d failed: the job fails", segment.index)
            self.remove_pieces(job, plan.run)
            raise
        if self._plan_in_progress(self._job_record(job), wanted, plan.run) is None:
            log.info("the job ended while segment %d ran: its pieces are removed", segment.index)
            self.remove_pieces(job, plan.run)
        else:
            self._assemble_when_complete(job, plan)
        return TaskResult(TaskOutcome.SEGMENT, segment.frames, compute_s=seconds)

    def _compute_segment(self, job: JobMessage, plan: SegmentPlan, segment: Segment, key: str, upscaler: Upscaler,
                         progress: "WholeJobProgress", attempt: JobAttempt) -> None:
        cancel = attempt.cancel
        self.task.check_disk(plan.source.size, job.parameters.scale_factor)
        reporter = ProgressReporter(self.task.callback, job.job_id, self.task.progress_interval_s, whole_job=progress)
        try:
            with job_workspace(self.task.work_dir, job.job_id) as workspace:
                source = self.task.fetch_source(job, plan.source, workspace, cancel)
                output = workspace / f"{segment.name}.mp4"
                result = self.task.upscale(job, source, output, upscaler, reporter, cancel, segment=segment,
                                           should_stop=lambda: cancel.is_set() or progress.job_over.is_set(),
                                           max_input_height=plan.max_input_height, frames_done=attempt.frames_done)
                self.storage.upload(output, key, content_type="video/mp4", metadata=result.metadata.as_s3_metadata(),
                                    should_stop=cancel.is_set, tags=TAGS)
        finally:
            reporter.close()
        log.info("segment %d stored: %s (%d frames, %.1fs)", segment.index, self.storage.url(key),
                 result.metadata.frame_count, result.elapsed_s)

    def _assemble_when_complete(self, job: JobMessage, plan: SegmentPlan) -> None:
        stored = self.storage.list_keys(parts_prefix(job.job_id, plan.run))
        missing = [s.index for s in plan.segments if part_key(job.job_id, plan.run, s) not in stored]
        if missing:
            log.info("%d of %d segments stored", len(plan.segments) - len(missing), len(plan.segments))
            return
        self.queue.send(job.body_for(SegmentStep(run=plan.run, assemble=True)),
                             **_message_ids(job, f"{plan.run}/assemble"))
        log.info("all %d segments stored: assembly message sent", len(plan.segments))

    def _assemble(self, job: JobMessage, wanted: str, attempt: JobAttempt) -> TaskResult:
        run = job.segment.run
        decision, claim = self.records.claim(job.job_id, wanted, attempt.message_id, run=run)
        if decision is Decision.DUPLICATE:
            return TaskResult(TaskOutcome.DUPLICATE)
        attempt.keep_alive(lambda: self.records.renew(claim))
        try:
            if decision is Decision.REPORT:  # joined and stored before; COMPLETED not acknowledged
                self.remove_pieces(job, run)
                self.task.report_completed(job, claim, attempt.cancel)
                return TaskResult(TaskOutcome.REPORTED)
            plan = SegmentPlan.from_json(claim.record.plan)
            started = time.monotonic()
            result, key = self._join(job, plan, attempt.cancel)
            assembly_s = time.monotonic() - started
            usage = Usage(billed_seconds=result.metadata.duration,
                          compute_seconds=round(self._segments_seconds(job, plan) + assembly_s, 1))
            self.records.completed(claim, key, result.metadata.model_dump(), usage.model_dump(by_alias=True))
            self.remove_pieces(job, run)
            self.task.report_completed(job, claim, attempt.cancel)
            # its frames and their compute were counted as its segments were upscaled
            return TaskResult(TaskOutcome.COMPLETED, billed_s=usage.billed_seconds, compute_s=assembly_s)
        except LostClaim as exc:
            log.warning("%s: it reports the job, this attempt stops", exc)
            return TaskResult(TaskOutcome.DUPLICATE)
        except JobError as exc:
            if isinstance(exc, PermanentError) or attempt.final:
                self.task.let_go(claim)
                self.remove_pieces(job, run)
            raise

    def _join(self, job: JobMessage, plan: SegmentPlan, cancel: threading.Event):
        stored = self.storage.list_keys(parts_prefix(job.job_id, plan.run))
        keys = [part_key(job.job_id, plan.run, segment) for segment in plan.segments]
        missing = [segment.index for segment, key in zip(plan.segments, keys) if key not in stored]
        if missing:
            raise RetryableError(ErrorCode.SEGMENT_MISSING, f"segments {missing} of plan {plan.run} are not stored")
        self.task.check_disk(plan.source.size + sum(stored.values()), 1)
        key = output_key(job.job_id, job.source_s3_key)
        with job_workspace(self.task.work_dir, job.job_id) as workspace:
            source = self.task.fetch_source(job, plan.source, workspace, cancel)
            parts = []
            for segment, part in zip(plan.segments, keys):
                stored_part = self.storage.head(part)
                if stored_part is None:
                    raise RetryableError(ErrorCode.SEGMENT_MISSING, f"{self.storage.url(part)} disappeared")
                parts.append(workspace / f"{segment.name}.mp4")
                self.storage.download(stored_part, parts[-1], max_bytes=0, should_stop=cancel.is_set)
            result = join_segments(source, parts, plan.segments, workspace / "output.mp4",
                                   scale=job.parameters.scale_factor, encoder=self.task.encoder,
                                   ffprobe=self.task.ffprobe, should_stop=cancel.is_set,
                                   max_input_height=plan.max_input_height)
            self.storage.upload(workspace / "output.mp4", key, content_type="video/mp4",
                                metadata=result.metadata.as_s3_metadata(), should_stop=cancel.is_set)
        log.info("result uploaded: %s (%d segments joined in %.1fs, %.1fs since the job was cut)",
                 self.storage.url(key), len(plan.segments), result.elapsed_s, time.time() - plan.started_at)
        return result, key

    # -- helpers ------------------------------------------------------------------------------
    def _job_record(self, job: JobMessage):
        found = self.records.read(job.job_id)
        return found[0] if found else None

    def _segments_seconds(self, job: JobMessage, plan: SegmentPlan) -> float:
        """The worker time the segments took, from their records."""
        total = 0.0
        for segment in plan.segments:
            found = self.records.read(part_record_name(job.job_id, plan.run, segment))
            total += float(((found[0].metadata or {}) if found else {}).get("seconds", 0))
        return total

    def remove_pieces(self, job: JobMessage, run: str) -> None:
        """The segments' videos, records and progress ledger: not needed once the job has ended.
        Best effort: whatever stays carries the tag a lifecycle rule expires."""
        try:
            removed = sum(self.storage.delete_prefix(prefix)
                          for prefix in (parts_prefix(job.job_id, run), part_records_prefix(job.job_id, run)))
        except JobError as exc:
            log.warning("could not remove the segments of plan %s: %s", run, exc)
        else:
            log.info("segments of plan %s removed (%d objects)", run, removed)


class WholeJobProgress:
    """The whole job's progress, shared by the workers of its segments through one small object in
    S3 (a ledger: frames done per segment, when the job was last reported, the last figure), written
    conditionally. Whoever finds the last report older than the interval sends the next one, so Spring
    gets one callback per interval for the job, never a figure lower than the one before.
    Also tells the segment's worker when the job has failed elsewhere (`job_over`)."""

    def __init__(self, steps: SegmentSteps, job: JobMessage, plan: SegmentPlan, segment: Segment):
        self.steps = steps
        self.job = job
        self.plan = plan
        self.segment = segment
        self.key = progress_key(job.job_id, plan.run)
        self.job_over = threading.Event()

    def record(self, done: int, interval_s: float) -> tuple[float, float | None] | None:
        """Add this segment's frames done; (percent, ETA) when this worker is to report them now."""
        try:
            if self.steps._plan_in_progress(self.steps._job_record(self.job), self.plan_fingerprint, self.plan.run) is None:
                self.job_over.set()
                return None
            for _ in range(3):  # a write lost to another segment's worker is read and done again
                figures, written = self._update(done, interval_s)
                if written:
                    return figures
        except JobError as exc:
            log.warning("job progress not recorded: %s", exc)
        return None

    @property
    def plan_fingerprint(self) -> str:
        return fingerprint(self.job.source_s3_key, self.job.parameters.work())

    def _update(self, done: int, interval_s: float):
        storage = self.steps.storage
        found = storage.read_json(self.key)
        ledger = found[0] if found else {}
        frames = {**ledger.get("frames", {}), self.segment.name: done}
        total_done = sum(frames.values())
        percent = max(float(ledger.get("percent", 0)), 100.0 * total_done / max(self.plan.total_frames, 1))
        now = time.time()
        due = now - float(ledger.get("reported_at", 0)) >= interval_s
        elapsed = now - self.plan.started_at
        eta = elapsed / total_done * (self.plan.total_frames - total_done) if total_done else None
        data = {"frames": frames, "percent": percent if due else ledger.get("percent", 0),
                "reported_at": now if due else ledger.get("reported_at", 0)}
        etag = storage.put_json(self.key, data, if_match=found[1] if found else None, if_absent=not found, tags=TAGS)
        return ((percent, eta) if due else None), etag is not None
