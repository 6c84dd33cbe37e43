"""Keeps the messages of running jobs invisible, and what else they hold alive (their job records)."""

import logging
import threading
from dataclasses import dataclass, field
from typing import Callable

from echoshot_ai_server.adapters.sqs import JobQueue, QueueMessage
from echoshot_ai_server.errors import JobError

log = logging.getLogger(__name__)


@dataclass
class _Beat:
    message: QueueMessage
    renewals: list[Callable[[], None]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)
    tracked: bool = True


class VisibilityHeartbeat:
    """Keeps the messages of running jobs invisible, so that no second worker picks them up, and
    renews whatever else a job holds for as long (its job record)."""

    def __init__(self, job_queue: JobQueue, *, timeout_s: int, every_s: float, on_success: Callable[[], None] = lambda: None):
        self.queue = job_queue
        self.timeout_s = timeout_s
        self.every_s = every_s
        self.on_success = on_success
        self._beats: dict[str, _Beat] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="visibility-heartbeat", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()

    def track(self, message: QueueMessage) -> None:
        with self._lock:
            self._beats[message.message_id] = _Beat(message)

    def attach(self, message: QueueMessage, renew: Callable[[], None]) -> None:
        """Also call `renew` on every beat while the message is tracked."""
        with self._lock:
            beat = self._beats.get(message.message_id)
        if beat is not None:
            beat.renewals.append(renew)

    def untrack(self, message: QueueMessage) -> None:
        # Waiting for this message's own beat (and no other) means no extension of it is in flight
        # once we return, so a release that follows cannot be undone by a late extension.
        with self._lock:
            beat = self._beats.pop(message.message_id, None)
        if beat is not None:
            with beat.lock:
                beat.tracked = False

    def _run(self) -> None:
        while not self._stop.wait(self.every_s):
            with self._lock:
                beats = list(self._beats.values())
            for beat in beats:
                try:
                    self._beat(beat)
                except Exception:  # noqa: BLE001 - whatever happens, the next beat must come
                    log.exception("heartbeat of message %s failed", beat.message.message_id)

    def _beat(self, beat: _Beat) -> None:
        with beat.lock:
            if not beat.tracked:
                return
            try:
                self.queue.extend_visibility(beat.message, self.timeout_s)
                self.on_success()
            except JobError as exc:
                log.warning("could not extend visibility of message %s: %s", beat.message.message_id, exc)
            for renew in beat.renewals:
                try:
                    renew()
                except Exception as exc:  # noqa: BLE001 - a failed renewal is retried on the next beat
                    log.warning("could not renew the job record of message %s: %s", beat.message.message_id, exc)
