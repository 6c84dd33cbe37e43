"""boto3 clients for S3 and SQS, and the translation of their errors into ours."""

from contextlib import contextmanager
from typing import Iterator

import boto3
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError, PartialCredentialsError

from echoshot_ai_server.errors import ErrorCode, JobError, PermanentError, RetryableError

AWS_ERRORS = (ClientError, BotoCoreError)
NOT_FOUND_CODES = {"404", "NoSuchKey", "NotFound"}
# Answers that mean the worker's own setup is wrong (bucket, region, credentials, permissions), not
# the job: every job would fail the same way until someone fixes it.
MISCONFIGURED_CODES = {
    "NoSuchBucket", "AccessDenied", "AllAccessDisabled", "AccountProblem", "InvalidAccessKeyId",
    "SignatureDoesNotMatch", "ExpiredToken", "InvalidToken", "TokenRefreshRequired", "InvalidClientTokenId",
    "UnrecognizedClientException", "AuthorizationHeaderMalformed", "PermanentRedirect", "InvalidBucketName",
    "AWS.SimpleQueueService.NonExistentQueue", "QueueDoesNotExist",
}
MISCONFIGURED_STATUSES = {301, 403}  # HEAD answers carry no error code: wrong region, no permission
PRECONDITION_CODES = {"PreconditionFailed", "412", "ConditionalRequestConflict", "409"}


def client(service: str, *, region: str, endpoint_url: str | None, connect_timeout_s: float = 5,
           read_timeout_s: float = 60):
    config = Config(
        retries={"max_attempts": 4, "mode": "standard"},
        connect_timeout=connect_timeout_s,
        # SQS long polls keep a request open for up to 20 s: the read timeout must be longer.
        read_timeout=read_timeout_s if service != "sqs" else max(read_timeout_s, 30),
        max_pool_connections=16,
    )
    return boto3.client(service, region_name=region, endpoint_url=endpoint_url, config=config)


def error_code(exc: BaseException) -> str:
    """The AWS error code of a ClientError (the HTTP status where the answer had no body), else ''."""
    if not isinstance(exc, ClientError):
        return ""
    return str(exc.response.get("Error", {}).get("Code", "")) or str(status(exc) or "")


def status(exc: BaseException) -> int | None:
    return exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") if isinstance(exc, ClientError) else None


def is_precondition_failure(exc: BaseException) -> bool:
    """A conditional request (If-Match / If-None-Match) whose condition did not hold."""
    return error_code(exc) in PRECONDITION_CODES or status(exc) in (409, 412)


def translate(exc: BaseException, what: str, unavailable: ErrorCode, *, not_found: ErrorCode | None = None,
              misconfigured: ErrorCode | None = None) -> JobError:
    """A boto3/botocore exception as one of ours (all retryable but the first): the thing is not
    there (`not_found`, when given), the worker's setup is wrong (`misconfigured`, when given), or
    the service is unavailable for now."""
    code = error_code(exc)
    if not_found is not None and (code in NOT_FOUND_CODES or status(exc) == 404) and code not in MISCONFIGURED_CODES:
        return PermanentError(not_found, f"{what}: not found")
    if misconfigured is not None and (code in MISCONFIGURED_CODES or status(exc) in MISCONFIGURED_STATUSES
                                      or isinstance(exc, (NoCredentialsError, PartialCredentialsError))):
        return RetryableError(misconfigured, f"{what}: {exc}")
    return RetryableError(unavailable, f"{what}: {exc}")


@contextmanager
def translated(what: str, unavailable: ErrorCode, *, not_found: ErrorCode | None = None,
               misconfigured: ErrorCode | None = None) -> Iterator[None]:
    """Within this block, boto3/botocore errors are raised as ours (see `translate`)."""
    try:
        yield
    except AWS_ERRORS as exc:
        raise translate(exc, what, unavailable, not_found=not_found, misconfigured=misconfigured) from exc
