"""boto3 clients for S3 and SQS, and the translation of their errors into ours."""

import boto3
from botocore.config import Config
from botocore.exceptions import ClientError

from echoshot_ai_server.errors import ErrorCode, JobError, PermanentError, RetryableError

NOT_FOUND_CODES = {"404", "NoSuchKey", "NotFound"}


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


def translate(exc: Exception, what: str, unavailable: ErrorCode, not_found: ErrorCode | None = None) -> JobError:
    """A boto3/botocore exception as a PermanentError (the thing is not there) or a RetryableError."""
    if not_found is not None and isinstance(exc, ClientError):
        code = str(exc.response.get("Error", {}).get("Code", ""))
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        if code in NOT_FOUND_CODES or status == 404:
            return PermanentError(not_found, f"{what}: not found")
    return RetryableError(unavailable, f"{what}: {exc}")
