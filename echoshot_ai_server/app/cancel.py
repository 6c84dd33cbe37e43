"""Spring cancels a job by putting an object at `control/cancel/{jobId}` (any content) in the bucket.

A queued job whose marker is there is never processed; a running one is stopped by its watch, which
looks for the marker every few seconds (and passes the worker's own stop on). Either way the job's
record is marked cancelled by one attempt, which alone sends the CANCELLED callback.
"""

import logging
import threading
import time
from typing import Callable

from echoshot_ai_server.errors import JobError

log = logging.getLogger(__name__)

CANCEL_PREFIX = "control/cancel/"


def cancel_key(job_id: str) -> str:
    return f"{CANCEL_PREFIX}{job_id}"


class CancelWatch:
    """A job's own stop: set when Spring's cancel marker appears (`by_request`) or the worker stops."""

    def __init__(self, requested: Callable[[], bool], worker_stop: threading.Event, every_s: float):
        self.stop = threading.Event()
        self.by_request = False
        self._requested = requested
        self._worker_stop = worker_stop
        self._every_s = every_s
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, name="cancel-watch", daemon=True)

    def __enter__(self) -> "CancelWatch":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._done.set()
        self._thread.join()

    def _run(self) -> None:
        next_look = time.monotonic() + self._every_s
        while not self._done.is_set():
            if self._worker_stop.is_set():
                self.stop.set()
                return
            if time.monotonic() >= next_look:
                try:
                    if self._requested():
                        log.warning("cancelled by request: stopping the job")
                        self.by_request = True
                        self.stop.set()
                        return
                except JobError as exc:  # the job itself will meet the same problem and say so
                    log.warning("cancel marker not checked: %s", exc)
                next_look = time.monotonic() + self._every_s
            self._done.wait(0.1)
