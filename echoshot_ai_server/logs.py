"""Logging set-up: every line of a job carries its job id."""

import contextvars
import logging
from contextlib import contextmanager
from typing import Iterator

_job_id = contextvars.ContextVar("job_id", default="-")
_base_factory = logging.getLogRecordFactory()


def _record_with_job_id(*args, **kwargs) -> logging.LogRecord:
    record = _base_factory(*args, **kwargs)
    record.job_id = _job_id.get()
    return record


# Installed on import, so that every record (in tests too) has a job_id attribute.
logging.setLogRecordFactory(_record_with_job_id)


LOG_FORMAT = "%(asctime)s [%(levelname)s] %(name)s [job=%(job_id)s]: %(message)s"


def configure_logging(level: str) -> None:
    logging.basicConfig(
        level=level.upper(),
        format=LOG_FORMAT,
        datefmt="%Y-%m-%d %H:%M:%S",
    )
    for noisy in ("botocore", "boto3", "s3transfer", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def printable(text: str) -> str:
    """`text` with anything that could break a log line (newlines, control characters) escaped."""
    return text if text.isprintable() else text.encode("unicode_escape").decode("ascii")


@contextmanager
def job_context(job_id: str) -> Iterator[None]:
    """Within this block (in this thread) log lines carry `job_id` (escaped: it may come from anyone)."""
    token = _job_id.set(printable(job_id))
    try:
        yield
    finally:
        _job_id.reset(token)
