"""The JobProcessor: polls the queue, runs jobs in slots, settles each message exactly once."""

import logging
import queue as stdlib_queue
import random
import shutil
import signal
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor, wait

from echoshot_ai_server.callback import SpringCallback
from echoshot_ai_server.errors import ErrorCode, JobCancelled, JobError, PermanentError, RetryableError
from echoshot_ai_server.job import CallbackPayload, parse_job, read_job_id
from echoshot_ai_server.job_queue import JobQueue, QueueMessage
from echoshot_ai_server.logs import job_context
from echoshot_ai_server.monitoring import Monitoring
from echoshot_ai_server.scaling import ScaleInProtection
from echoshot_ai_server.tasks.upscale_task import UpscaleTask
from echoshot_ai_server.upscaler import Upscaler

log = logging.getLogger(__name__)


class VisibilityHeartbeat:
    """Keeps the messages of running jobs invisible, so that no second worker picks them up."""

    def __init__(self, job_queue: JobQueue, *, timeout_s: int, every_s: float):
        self.queue = job_queue
        self.timeout_s = timeout_s
        self.every_s = every_s
        self._messages: dict[str, QueueMessage] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name="visibility-heartbeat", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def track(self, message: QueueMessage) -> None:
        with self._lock:
            self._messages[message.message_id] = message

    def untrack(self, message: QueueMessage) -> None:
        # Holding the lock means no extension of this message is in flight once we return, so a
        # release that follows cannot be undone by a late extension.
        with self._lock:
            self._messages.pop(message.message_id, None)

    def _beat(self) -> None:
        while not self._stop.wait(self.every_s):
            with self._lock:
                for message in self._messages.values():
                    try:
                        self.queue.extend_visibility(message, self.timeout_s)
                    except JobError as exc:
                        log.warning("could not extend visibility of message %s: %s", message.message_id, exc)


class Worker:
    def __init__(
        self,
        *,
        job_queue: JobQueue,
        task: UpscaleTask,
        callback: SpringCallback,
        upscalers: list[Upscaler],
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
    ):
        self.queue = job_queue
        self.task = task
        self.callback = callback
        self.max_receive_count = max_receive_count
        self.dead_letter_queue = dead_letter_queue
        self.poll_wait_s = poll_wait_s
        self.visibility_timeout_s = visibility_timeout_s
        self.shutdown_grace_s = shutdown_grace_s
        self.retry_base_delay_s = retry_base_delay_s
        self.retry_max_delay_s = retry_max_delay_s
        self.monitoring = monitoring or Monitoring()
        self.protection = protection
        self.metrics_address = metrics_address
        self.heartbeat = VisibilityHeartbeat(job_queue, timeout_s=visibility_timeout_s, every_s=visibility_extend_every_s)
        self._slot_count = len(upscalers)
        self._slots: stdlib_queue.Queue[Upscaler] = stdlib_queue.Queue()
        for upscaler in upscalers:
            self._slots.put(upscaler)
        self._executor = ThreadPoolExecutor(max_workers=len(upscalers), thread_name_prefix="job")
        self._in_flight: set[Future] = set()
        self.stopping = threading.Event()  # no new messages
        self.cancel = threading.Event()  # running jobs stop now and hand their messages back

    # -- the loop -------------------------------------------------------------------------
    def run(self) -> None:
        """Poll and work until asked to stop, then drain. Returns when every message is settled."""
        self._install_signal_handlers()
        if self.metrics_address is not None:
            self.monitoring.serve(*self.metrics_address)
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
        self._in_flight = {f for f in self._in_flight if not f.done()}
        free = self._slot_count - len(self._in_flight)
        if free <= 0:
            wait(self._in_flight, timeout=1, return_when="FIRST_COMPLETED")
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
        futures = [self._executor.submit(self._handle_in_slot, message) for message in messages]
        self._in_flight.update(futures)
        return futures

    def drain(self) -> None:
        """Let running jobs finish within the grace period; then stop them and release their messages."""
        pending = {f for f in self._in_flight if not f.done()}
        if pending:
            log.info("waiting up to %.0fs for %d running job(s)", self.shutdown_grace_s, len(pending))
            _, pending = wait(pending, timeout=self.shutdown_grace_s)
        if pending:
            log.warning("grace period over: stopping %d job(s), their messages go back to the queue", len(pending))
            self.cancel.set()
            wait(pending)
        self._executor.shutdown(wait=True)
        self.heartbeat.stop()
        self.monitoring.close()
        shutil.rmtree(self.task.work_dir, ignore_errors=True)

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
    def _handle_in_slot(self, message: QueueMessage) -> None:
        upscaler = self._slots.get()
        try:
            self.handle(message, upscaler)
        except Exception:  # a bug must not kill the slot; the message reappears after its timeout
            log.exception("unexpected error while settling message %s", message.message_id)
        finally:
            self._slots.put(upscaler)

    def handle(self, message: QueueMessage, upscaler: Upscaler) -> None:
        job_id = read_job_id(message.body)
        started = time.monotonic()
        self.monitoring.job_received(message.sent_at_ms)
        if self.protection:
            self.protection.job_started()
        frames = 0
        with job_context(job_id or f"message:{message.message_id}"):
            log.info("message received (attempt %d/%d)", message.receive_count, self.max_receive_count)
            self.heartbeat.track(message)
            try:
                job = parse_job(message.body)
                result = self.task.run(job, upscaler, self.cancel)
                frames = result.frame_count if result else 0
                error = None
            except Exception as exc:  # classified below, in one place
                error = exc
            finally:
                self.heartbeat.untrack(message)
            outcome = "error"
            try:
                outcome = self._settle(message, job_id, error)
            finally:
                self.monitoring.job_settled(outcome, time.monotonic() - started, frames)
                if self.protection:
                    self.protection.job_ended()

    def _settle(self, message: QueueMessage, job_id: str | None, error: BaseException | None) -> str:
        """Delete, release, back off or report: the one place that decides. Returns the outcome."""
        if error is None:
            self.queue.delete(message)
            log.info("job done, message deleted")
            return "completed"
        if isinstance(error, JobCancelled):
            self.queue.release(message)
            log.warning("job stopped by shutdown; message visible again")
            return "released"
        if isinstance(error, PermanentError):
            log.error("job failed: %s", error)
            return self._report_failure_then(message, job_id, error, settle=self.queue.delete)
        if not isinstance(error, RetryableError):
            log.exception("unexpected error", exc_info=error)
            error = RetryableError(ErrorCode.INTERNAL_ERROR, f"{type(error).__name__}: {error}")
        if message.receive_count >= self.max_receive_count:
            log.error("job failed after %d attempts, giving up: %s", message.receive_count, error)
            # With a redrive policy the next receive moves the message to the dead-letter queue.
            give_up = self.queue.release if self.dead_letter_queue else self.queue.delete
            return self._report_failure_then(message, job_id, error, settle=give_up)
        delay = self._retry_delay(message.receive_count)
        log.warning("job failed (attempt %d/%d), retry in %ds: %s", message.receive_count, self.max_receive_count, delay, error)
        self.queue.release(message, delay)
        return "retried"

    def _report_failure_then(self, message: QueueMessage, job_id: str | None, error: JobError, settle) -> str:
        """Tell Spring, then settle. If Spring cannot be told, keep the message for a later attempt."""
        if job_id is not None:
            try:
                self.callback.notify(CallbackPayload.failed(job_id, error))
            except RetryableError as exc:
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

    def _retry_delay(self, receive_count: int) -> int:
        """Capped exponential backoff with jitter, from SQS's own receive count."""
        delay = min(self.retry_max_delay_s, self.retry_base_delay_s * 2 ** max(receive_count - 1, 0))
        return int(delay * random.uniform(0.5, 1.0))
