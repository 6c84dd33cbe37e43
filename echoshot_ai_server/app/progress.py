"""PROCESSING callbacks: how far a job is, sent now and then while it runs."""

import logging
import threading
import time
from typing import TYPE_CHECKING, Protocol

from echoshot_ai_server.errors import JobCancelled
from echoshot_ai_server.job import CallbackPayload, JobStatus

if TYPE_CHECKING:
    from echoshot_ai_server.app.segment_steps import WholeJobProgress

# The guide's log lines of a job carry this logger name (its module before the package had wings).
log = logging.getLogger("echoshot_ai_server.tasks.upscale_task")

PROGRESS_CLOSE_WAIT_S = 5


class Notifier(Protocol):
    """What a job needs of the Spring callback (adapters/spring.py)."""

    timeout_s: float

    def notify(self, payload: CallbackPayload, *, attempts: int | None = None,
               stop: threading.Event | None = None) -> None: ...


class ProgressReporter:
    """PROCESSING callbacks with percent and ETA, sent by a thread of their own.

    The frame loop only records how far it is (`update`) and never waits on the network. At most one
    callback per interval, always the latest figure; the first one and the one at 100 % go at once.
    One attempt each: progress is best effort and never fails the job."""

    def __init__(self, callback: Notifier, job_id: str, interval_s: float, whole_job: "WholeJobProgress | None" = None):
        """`whole_job`: this is one segment of a job; the figures sent are the whole job's."""
        self.callback = callback
        self.job_id = job_id
        self.interval_s = interval_s
        self.whole_job = whole_job
        self._abort = threading.Event()  # ends a callback in flight
        self.started = time.monotonic()
        self._estimate_s: float | None = None
        self._pending: tuple[int, int] | None = None
        self._closing = False
        self._changed = threading.Condition()
        self._thread = threading.Thread(target=self._run, name=f"progress-{job_id}", daemon=True)
        self._thread.start()

    def start(self, estimate_s: float | None) -> None:
        """The first PROCESSING: 0 % and the estimated time of the work (None: not known)."""
        self.started = time.monotonic()
        self._estimate_s = estimate_s
        self.update(0, 1)

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
        if self.whole_job is not None:
            figures = self.whole_job.record(done, self.interval_s)
            if figures is None:  # another segment's worker reported the job a moment ago
                return
            percent, eta = figures
        else:
            elapsed = time.monotonic() - self.started
            percent, eta = 100.0 * done / max(total, 1), elapsed / done * (total - done) if done else self._estimate_s
        payload = CallbackPayload(
            job_id=self.job_id, status=JobStatus.PROCESSING,
            progress=round(percent, 1), eta_seconds=None if eta is None else round(eta, 1),
        )
        try:
            self.callback.notify(payload, attempts=1, stop=self._abort)
        except JobCancelled:
            log.warning("progress callback abandoned: the job has ended")
        except Exception as exc:  # noqa: BLE001 - best effort: nothing may end this thread early
            log.warning("progress callback not delivered: %s", exc)
