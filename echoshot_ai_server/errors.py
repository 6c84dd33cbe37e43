"""Error classification, in one place.

Every failure that can end a job is one of two kinds:
- PermanentError: doing the same thing again gives the same result (a file that is not a video,
  an unsupported scale). Report it and never retry.
- RetryableError: the world may be different next time (a network hiccup, a busy GPU).

Each carries a stable `code` that callers (the CLI, the Spring callback) can show and match on.
Some retryable codes say that the worker's own surroundings are wrong (a missing bucket, a work
directory it cannot write, a callback token Spring no longer accepts): no job can succeed until
that is fixed, so the job is not blamed and the worker reports itself not ready.

`classify()` turns any exception raised while a job runs into one of these: the one place that
decides what an unexpected exception means.
"""

import errno
import random
from enum import Enum


class ErrorCode(str, Enum):
    INVALID_MESSAGE = "INVALID_MESSAGE"
    UNSUPPORTED_TASK = "UNSUPPORTED_TASK"
    INVALID_PARAMETERS = "INVALID_PARAMETERS"
    SOURCE_NOT_FOUND = "SOURCE_NOT_FOUND"
    FORBIDDEN_SOURCE = "FORBIDDEN_SOURCE"
    INPUT_TOO_LARGE = "INPUT_TOO_LARGE"
    OUTPUT_TOO_LARGE = "OUTPUT_TOO_LARGE"
    JOB_TOO_LARGE = "JOB_TOO_LARGE"
    INSUFFICIENT_DISK = "INSUFFICIENT_DISK"
    INPUT_NOT_FOUND = "INPUT_NOT_FOUND"
    INVALID_VIDEO = "INVALID_VIDEO"
    NO_FRAMES = "NO_FRAMES"
    DECODE_FAILED = "DECODE_FAILED"
    ENCODE_FAILED = "ENCODE_FAILED"
    OUTPUT_MISMATCH = "OUTPUT_MISMATCH"
    WEIGHTS_MISSING = "WEIGHTS_MISSING"
    WEIGHTS_INVALID = "WEIGHTS_INVALID"
    TOOL_MISSING = "TOOL_MISSING"
    OUT_OF_MEMORY = "OUT_OF_MEMORY"
    STORAGE_UNAVAILABLE = "STORAGE_UNAVAILABLE"
    STORAGE_MISCONFIGURED = "STORAGE_MISCONFIGURED"
    SOURCE_CHANGED = "SOURCE_CHANGED"
    WORK_DIR_UNUSABLE = "WORK_DIR_UNUSABLE"
    QUEUE_UNAVAILABLE = "QUEUE_UNAVAILABLE"
    SCALING_UNAVAILABLE = "SCALING_UNAVAILABLE"
    CALLBACK_FAILED = "CALLBACK_FAILED"
    CALLBACK_REJECTED = "CALLBACK_REJECTED"
    CALLBACK_MISCONFIGURED = "CALLBACK_MISCONFIGURED"
    JOB_ID_IN_USE = "JOB_ID_IN_USE"
    SEGMENT_MISSING = "SEGMENT_MISSING"
    INTERNAL_ERROR = "INTERNAL_ERROR"


# The worker's surroundings are wrong, not the job: fix the setting, and every job works again.
ENVIRONMENT_CODES = frozenset({
    ErrorCode.STORAGE_MISCONFIGURED, ErrorCode.WORK_DIR_UNUSABLE, ErrorCode.CALLBACK_MISCONFIGURED,
})
DISK_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})


class JobError(Exception):
    def __init__(self, code: ErrorCode, message: str):
        super().__init__(message)
        self.code = code
        self.message = message

    def __str__(self) -> str:
        return f"[{self.code.value}] {self.message}"

    @property
    def is_environment(self) -> bool:
        return self.code in ENVIRONMENT_CODES


class PermanentError(JobError):
    pass


class RetryableError(JobError):
    pass


class ResultNotReported(RetryableError):
    """The result is in S3 but Spring has not acknowledged COMPLETED: retry the report later, and
    never report FAILED for this job (that would contradict a result that exists)."""


class JobCancelled(Exception):
    """The worker is shutting down: stop the job and hand its message back to the queue."""


def classify(exc: BaseException) -> JobError | JobCancelled:
    """What an exception raised while a job ran means for the job."""
    if isinstance(exc, (JobError, JobCancelled)):
        return exc
    if isinstance(exc, OSError) and exc.errno in DISK_FULL_ERRNOS:
        error = RetryableError(ErrorCode.INSUFFICIENT_DISK, f"the work directory is full: {exc.strerror}")
    elif isinstance(exc, MemoryError):
        error = RetryableError(ErrorCode.OUT_OF_MEMORY, "the worker ran out of memory")
    else:
        error = RetryableError(ErrorCode.INTERNAL_ERROR, f"{type(exc).__name__}: {exc}")
    error.__cause__ = exc
    return error


def human_bytes(count: float) -> str:
    """1536 -> '1.5 KB': sizes in messages people read (decimal units, as df -H prints them)."""
    if abs(count) < 1000:
        return f"{count:.0f} B"
    for unit in ("KB", "MB", "GB", "TB"):
        count /= 1000
        if abs(count) < 1000:
            return f"{count:.1f} {unit}"
    return f"{count / 1000:.1f} PB"


def backoff_s(attempt: int, base_s: float, max_s: float) -> float:
    """How long to wait before attempt `attempt + 1`: doubling from `base_s`, at most `max_s`, jittered
    (between half and all of it) so that workers that failed together do not retry together."""
    return min(max_s, base_s * 2 ** max(attempt - 1, 0)) * random.uniform(0.5, 1.0)
