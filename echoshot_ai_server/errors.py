"""Error classification, in one place.

Every failure that can end a job is one of two kinds:
- PermanentError: doing the same thing again gives the same result (a file that is not a video,
  an unsupported scale). Report it and never retry.
- RetryableError: the world may be different next time (a network hiccup, a busy GPU).

Each carries a stable `code` that callers (the CLI, the Spring callback) can show and match on.
"""

from enum import Enum


class ErrorCode(str, Enum):
    INVALID_MESSAGE = "INVALID_MESSAGE"
    UNSUPPORTED_TASK = "UNSUPPORTED_TASK"
    INVALID_PARAMETERS = "INVALID_PARAMETERS"
    SOURCE_NOT_FOUND = "SOURCE_NOT_FOUND"
    FORBIDDEN_SOURCE = "FORBIDDEN_SOURCE"
    INPUT_TOO_LARGE = "INPUT_TOO_LARGE"
    OUTPUT_TOO_LARGE = "OUTPUT_TOO_LARGE"
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
    QUEUE_UNAVAILABLE = "QUEUE_UNAVAILABLE"
    SCALING_UNAVAILABLE = "SCALING_UNAVAILABLE"
    CALLBACK_FAILED = "CALLBACK_FAILED"
    CALLBACK_REJECTED = "CALLBACK_REJECTED"
    INTERNAL_ERROR = "INTERNAL_ERROR"


class JobError(Exception):
    retryable = False

    def __init__(self, code: ErrorCode, message: str):
        super().__init__(message)
        self.code = code
        self.message = message

    def __str__(self) -> str:
        return f"[{self.code.value}] {self.message}"


class PermanentError(JobError):
    retryable = False


class RetryableError(JobError):
    retryable = True


class JobCancelled(Exception):
    """The worker is shutting down: stop the job and hand its message back to the queue."""
