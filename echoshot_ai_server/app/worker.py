"""The JobProcessor: polls the queue, runs jobs in slots, settles each message exactly once."""

import logging
import queue as stdlib_queue
import signal
import threading
import time
from concurrent.futures import Future, wait
from collections.abc import Mapping
from typing import Callable

from echoshot_ai_server.adapters.spring import SpringCallback
from echoshot_ai_server.adapters.sqs import JobQueue, QueueMessage
from echoshot_ai_server.app.heartbeat import VisibilityHeartbeat
from echoshot_ai_server.app.monitoring import Monitoring
from echoshot_ai_server.app.protection import ScaleInProtection
from echoshot_ai_server.app.attempt import JobAttempt, TaskOutcome
from echoshot_ai_server.app.task import UpscaleTask
from echoshot_ai_server.app.workspace import WorkerDirectory
from echoshot_ai_server.engine.upscaler import Upscaler
from echoshot_ai_server.errors import (
    ErrorCode, JobCancelled, JobError, PermanentError, ResultNotReported, RetryableError, backoff_s, classify,
)
from echoshot_ai_server.job import CallbackPayload, parse_job, read_job_id
from echoshot_ai_server.logs import job_context

log = logging.getLogger(__name__)

SETUP, CALLBACK = "setup", "callback"  # kinds of problems with the worker's surroundings
# After the grace period, running jobs are told to stop; this is how long they get to do so before
# their messages are released anyway and the worker exits.
STOP_WAIT_S = 15


class Worker:
    def __init__(
        self,
        *,
        job_queue: JobQueue,
        task: UpscaleTask,
        callback: SpringCallback,
        models: list[Mapping[str, Upscaler]],
        max_receive_count: int,
        dead_letter_queue: bool,
        poll_wait_s: int = 20,
        visibility_timeout_s: int = 300,
        visibility_extend_every_s: float = 60,
        shutdown_grace_s: float = 60,
        retry_base_delay_s: int = 10,
        retry_max_delay_s: int = 900,
        monitoring: Monitoring | None = None,
        metrics_address: tuple[str, int] | None = None,
        protection: ScaleInProtection | None = None,
        directory: WorkerDirectory | None = None,
        preflight: Callable[[], None] = lambda: None,
        recheck_every_s: float = 30,
        stop_wait_s: float = STOP_WAIT_S,
        warm_up: Callable[[], None] = lambda: None,
        started: float | None = None,
        redrive: dict[str, int | None] | None = None,
        overlap_finish: bool = False,
    ):
        self.queue = job_queue
        self.task = task
        self.callback = callback
        self.max_receive_count = max_receive_count
        self.dead_letter_queue = dead_letter_queue
        self.redrive = redrive or {}  # per queue url: its redrive policy's receive count (None: no dead-letter queue)
        # A job hands its slot (its models) on once its frames are done, and finishes (encoder drain,
        # checks, upload, callback) beside the next job's frames: at most twice as many jobs in flight.
        self.overlap_finish = overlap_finish
        self.poll_wait_s = poll_wait_s
        self.visibility_timeout_s = visibility_timeout_s
        self.shutdown_grace_s = shutdown_grace_s
        self.retry_base_delay_s = retry_base_delay_s
        self.retry_max_delay_s = retry_max_delay_s
        self.monitoring = monitoring or Monitoring()
        self.protection = protection
        self.metrics_address = metrics_address
        self.directory = directory
        self.preflight = preflight  # raises JobError while the worker's surroundings are wrong
        self.recheck_every_s = recheck_every_s
        self.stop_wait_s = stop_wait_s
        self.warm_up = warm_up  # tunes and compiles the engine: the worker is not ready before it is done
        self.started = time.monotonic() if started is None else started
        self.heartbeat = VisibilityHeartbeat(job_queue, timeout_s=visibility_timeout_s, every_s=visibility_extend_every_s,
                                             on_success=self.monitoring.queue_answered)
        self._slot_count = len(models)
        self._slots: stdlib_queue.Queue[Mapping[str, Upscaler]] = stdlib_queue.Queue()  # a slot: its models by name
        for slot in models:
            self._slots.put(slot)
        self._running: dict[Future, QueueMessage] = {}
        self._next_recheck = 0.0
        self.stopping = threading.Event()  # no new messages
        self.cancel = threading.Event()  # running jobs stop now and hand their messages back

    # -- the loop -------------------------------------------------------------------------
    def run(self) -> None:
        """Poll and work until asked to stop, then drain. Returns when every message is settled."""
        self._install_signal_handlers()
        if self.metrics_address is not None:
            self.monitoring.serve(*self.metrics_address)
        self.monitoring.model_loaded = False  # not ready before the engine is
        self.warm_up()
        self.monitoring.model_loaded = True
        startup_s = time.monotonic() - self.started
        self.monitoring.startup.set(startup_s)
        log.info("ready %.1fs after the process started", startup_s)
        self.heartbeat.start()
        log.info("worker started: %d slot(s), queue %s", self._slot_count, self.queue.url)
        while not self.stopping.is_set():
            try:
                self.run_once()
            except JobError as exc:
                log.warning("polling failed: %s; trying again in 5s", exc)
                self.stopping.wait(5)
        self.drain()
        log.info("worker stopped")

    def run_once(self) -> list[Future]:
        """Receive as many messages as there are free slots and start them. Returns their futures."""
        self._running = {f: m for f, m in self._running.items() if not f.done()}
        in_flight_limit = self._slot_count * (2 if self.overlap_finish else 1)
        free = min(self._slots.qsize(), in_flight_limit - len(self._running))  # only this loop takes slots
        if free <= 0:
            wait(list(self._running), timeout=1, return_when="FIRST_COMPLETED")
            return []
        if not self._surroundings_ok():
            self.stopping.wait(min(self.recheck_every_s, 5))
            return []
        try:
            messages = self.queue.receive(free, wait_s=self.poll_wait_s, visibility_timeout_s=self.visibility_timeout_s)
        except JobError as exc:
            self.monitoring.queue_failed(str(exc))
            raise
        self.monitoring.queue_answered()
        if self.stopping.is_set():
            for message in messages:
                self.queue.release(message)
            return []
        return [self._start(message, self._slots.get_nowait()) for message in messages]

    def _surroundings_ok(self) -> bool:
        """While a job has found the worker's surroundings wrong (bucket, work directory), take no
        message: check again now and then, and go back to work once the check passes."""
        if SETUP not in self.monitoring.problems:
            return True
        if time.monotonic() < self._next_recheck:
            return False
        self._next_recheck = time.monotonic() + self.recheck_every_s
        try:
            self.preflight()
        except JobError as exc:
            log.error("still not working: %s; checking again in %.0fs", exc, self.recheck_every_s)
            self.monitoring.problem(SETUP, str(exc))
            return False
        log.info("the problem is gone: taking jobs again")
        self.monitoring.clear(SETUP)
        return True

    def _start(self, message: QueueMessage, slot: Mapping[str, Upscaler]) -> Future:
        future: Future = Future()
        self._running[future] = message

        def work():
            try:
                self._handle_in_slot(message, slot)
            finally:
                future.set_result(None)

        # Daemon threads: a job stuck in a network call can never keep the process from exiting.
        threading.Thread(target=work, name=f"job-{message.message_id[:8]}", daemon=True).start()
        return future

    def drain(self) -> None:
        """Let running jobs finish within the grace period; then stop them and release their messages."""
        pending = [f for f in self._running if not f.done()]
        if pending:
            log.info("waiting up to %.0fs for %d running job(s)", self.shutdown_grace_s, len(pending))
            _, pending = wait(pending, timeout=self.shutdown_grace_s)
        if pending:
            log.warning("grace period over: stopping %d job(s), their messages go back to the queue", len(pending))
            self.cancel.set()
            _, pending = wait(pending, timeout=self.stop_wait_s)
        for future in pending:  # stuck in a call that ignores the stop: hand the message back ourselves
            message = self._running[future]
            log.error("job of message %s did not stop within %.0fs; releasing its message", message.message_id,
                      self.stop_wait_s)
            self.heartbeat.untrack(message)
            try:
                self.queue.release(message)
            except JobError as exc:
                log.error("could not release message %s (%s): it reappears after its visibility timeout",
                          message.message_id, exc)
        self.heartbeat.stop()
        self.monitoring.close()
        if self.directory is not None and not pending:
            self.directory.close()

    def request_stop(self, signum: int | None = None, _frame=None) -> None:
        if self.stopping.is_set():
            log.warning("second stop request: stopping running jobs now")
            self.cancel.set()
            return
        log.info("stop requested (%s): no new jobs", signal.Signals(signum).name if signum else "shutdown")
        self.stopping.set()

    def _install_signal_handlers(self) -> None:
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, self.request_stop)
            signal.signal(signal.SIGINT, self.request_stop)

    # -- one message ----------------------------------------------------------------------
    def _handle_in_slot(self, message: QueueMessage, slot: Mapping[str, Upscaler]) -> None:
        handed_on = threading.Event()

        def hand_on() -> None:  # once: when the frames are done (overlap_finish), else at the end
            if not handed_on.is_set():
                handed_on.set()
                self._slots.put(slot)

        try:
            self.handle(message, slot, frames_done=hand_on if self.overlap_finish else lambda: None)
        except Exception:  # settling failed (SQS down): the message reappears after its timeout
            log.exception("could not settle message %s", message.message_id)
        finally:
            hand_on()

    def handle(self, message: QueueMessage, models: Mapping[str, Upscaler],
               frames_done: Callable[[], None] = lambda: None) -> None:
        job_id = read_job_id(message.body)
        started = time.monotonic()
        with job_context(job_id or f"message:{message.message_id}"):
            self.heartbeat.track(message)  # first: nothing slow happens before the message is kept invisible
            self.monitoring.job_received(message.sent_at_ms)
            max_receives, _ = self._attempts_of(message)
            log.info("message received (attempt %d/%d)", message.receive_count, max_receives)
            if self.protection:
                self.protection.job_started()
            result, error = None, None
            try:
                job = parse_job(message.body)
                attempt = JobAttempt(message.message_id, self.cancel, lambda renew: self.heartbeat.attach(message, renew),
                                     final=message.receive_count >= max_receives, queue=self.queue.of(message),
                                     frames_done=frames_done)
                result = self.task.run(job, models, attempt)
            except BaseException as exc:  # noqa: BLE001 - classified in one place
                error = classify(exc)
            finally:
                self.heartbeat.untrack(message)
            outcome = "error"
            try:
                outcome = self._settle(message, job_id, result.outcome if result else None, error)
            finally:
                self.monitoring.job_settled(outcome, time.monotonic() - started, result.frames if result else 0,
                                            queue=self.queue.of(message).name,
                                            billed_s=result.billed_s if result and error is None else 0,
                                            compute_s=result.compute_s if result and error is None else 0)
                if self.protection:
                    self.protection.job_ended()

    def _settle(self, message: QueueMessage, job_id: str | None, outcome: TaskOutcome | None,
                error: JobError | JobCancelled | None) -> str:
        """Delete, release, back off or report: the one place that decides. Returns the outcome."""
        self._watch_surroundings(error, outcome)
        if error is None:
            self.queue.delete(message)
            if outcome is TaskOutcome.DUPLICATE:
                log.info("job already done or in progress under another message: this one is dropped")
                return "duplicate"
            if outcome is TaskOutcome.CANCELLED:
                log.info("job cancelled, message deleted")
                return "cancelled"
            if outcome in (TaskOutcome.SPLIT, TaskOutcome.SEGMENT):
                log.info("%s, message deleted", "job cut into segments" if outcome is TaskOutcome.SPLIT else "segment done")
                return outcome.value
            log.info("job done, message deleted")
            return "completed"
        if isinstance(error, JobCancelled):
            self.queue.release(message)
            log.warning("job stopped by shutdown; message visible again")
            return "released"
        if isinstance(error, PermanentError):
            log.error("job failed: %s", error)
            return self._report_failure_then(message, job_id, error, settle=self.queue.delete)
        if error.code == ErrorCode.INTERNAL_ERROR:
            log.error("unexpected error", exc_info=error.__cause__ or error)
        max_receives, dead_letter_queue = self._attempts_of(message)
        last_attempt = message.receive_count >= max_receives
        # With a redrive policy the next receive moves the message to the dead-letter queue.
        give_up = self.queue.release if dead_letter_queue else self.queue.delete
        if last_attempt and isinstance(error, ResultNotReported):
            log.error("COMPLETED never acknowledged after %d attempts, giving up (the result stays in S3): %s",
                      message.receive_count, error)
            give_up(message)
            return "failed"
        if last_attempt:
            log.error("job failed after %d attempts, giving up: %s", message.receive_count, error)
            return self._report_failure_then(message, job_id, error, settle=give_up)
        delay = self._retry_delay(message.receive_count)
        log.warning("job failed (attempt %d/%d), retry in %ds: %s", message.receive_count, max_receives, delay, error)
        self.queue.release(message, delay)
        return "retried"

    def _watch_surroundings(self, error: JobError | JobCancelled | None, outcome: TaskOutcome | None = None) -> None:
        """Not ready while a job says the worker's surroundings are wrong. A wrong bucket or work
        directory also pauses polling until the start-up checks pass again (`_surroundings_ok`);
        refused callback credentials do not (no check can tell when Spring accepts them again, only
        the next callback that goes through)."""
        if isinstance(error, JobError) and error.is_environment:
            log.error("the worker's setup is wrong, not the job: %s", error)
            kind = CALLBACK if error.code == ErrorCode.CALLBACK_MISCONFIGURED else SETUP
            self.monitoring.problem(kind, str(error))
            self._next_recheck = time.monotonic() + self.recheck_every_s
        elif error is None and outcome in (TaskOutcome.COMPLETED, TaskOutcome.REPORTED):  # COMPLETED went through
            self.monitoring.clear(CALLBACK)

    def _report_failure_then(self, message: QueueMessage, job_id: str | None, error: JobError, settle) -> str:
        """Tell Spring, then settle. If Spring cannot be told, keep the message for a later attempt."""
        if job_id is not None:
            try:
                self.callback.notify(CallbackPayload.failed(job_id, error), stop=self.cancel)
            except (RetryableError, JobCancelled) as exc:
                self._watch_surroundings(exc)
                delay = self._retry_delay(message.receive_count)
                log.error("FAILED callback not delivered (%s); message kept, retry in %ds", exc, delay)
                self.queue.release(message, delay)
                return "retried"
            except PermanentError as exc:
                log.error("%s", exc)
        else:
            log.error("message has no readable jobId, nobody to report to; dropped: %.200r", message.body)
        settle(message)
        return "failed"

    def _attempts_of(self, message: QueueMessage) -> tuple[int, bool]:
        """How many receives the message's queue allows, and whether its dead-letter queue takes it then."""
        if message.queue_url in self.redrive:
            limit = self.redrive[message.queue_url]
            return limit or self.max_receive_count, limit is not None
        return self.max_receive_count, self.dead_letter_queue

    def _retry_delay(self, receive_count: int) -> int:
        """Backoff from SQS's own receive count: the worker keeps no retry counter of its own."""
        return int(backoff_s(receive_count, self.retry_base_delay_s, self.retry_max_delay_s))
