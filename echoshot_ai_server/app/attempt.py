"""One delivery of a message, as the worker hands it to the task, and what became of it."""

import threading
from dataclasses import dataclass
from enum import Enum
from typing import Callable, Protocol


class MessageSender(Protocol):
    """What a job needs of its queue (adapters/sqs.py): to send the messages of its segments."""

    def send(self, body: str, *, group_id: str, dedup_id: str) -> str: ...


class TaskOutcome(str, Enum):
    COMPLETED = "completed"  # computed, uploaded, COMPLETED acknowledged
    REPORTED = "reported"  # the result existed: COMPLETED sent for it
    DUPLICATE = "duplicate"  # done, or being done, under another message: nothing to do
    SPLIT = "split"  # cut into segments, each sent as a message of its own
    SEGMENT = "segment"  # one segment upscaled and stored
    CANCELLED = "cancelled"  # Spring cancelled the job: stopped (or never started), CANCELLED sent


@dataclass(frozen=True)
class TaskResult:
    outcome: TaskOutcome
    frames: int = 0
    billed_s: float = 0  # the source duration a completed job is billed
    compute_s: float = 0  # worker time this message spent on the job


@dataclass(frozen=True)
class JobAttempt:
    """What the worker hands the task about one delivery of a message."""

    message_id: str
    cancel: threading.Event  # set: stop now, the message goes back to the queue
    keep_alive: Callable[[Callable[[], None]], None]  # registers a renewal to run with the message's heartbeat
    final: bool = False  # the queue's last attempt: a failure now is the job's end
    queue: MessageSender | None = None  # the message's own queue: a job's segments go there (None: never cut)
    frames_done: Callable[[], None] = lambda: None  # the models are no longer needed: another job may have them
