"""S3: where sources come from, results go, and each job's record is kept."""

import json
import logging
import time
from urllib.parse import urlencode
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from boto3.s3.transfer import TransferConfig, create_transfer_manager
from s3transfer.exceptions import CancelledError

from echoshot_ai_server.adapters import aws
from echoshot_ai_server.errors import ErrorCode, JobCancelled, PermanentError, RetryableError, human_bytes

log = logging.getLogger(__name__)

CHUNK_BYTES = 64 * 1024  # a stop is seen between two chunks
RESUMES = 3  # a download cut off in the middle goes on from where it stopped, this many times


@dataclass(frozen=True)
class StoredObject:
    """One version of an object, as a HEAD request saw it."""

    key: str
    size: int
    etag: str
    version_id: str | None = None
    metadata: dict[str, str] = field(default_factory=dict)


@dataclass
class _Progress:
    bytes: int


class Storage:
    def __init__(self, bucket: str, *, region: str, endpoint_url: str | None = None, **timeouts: float):
        self.bucket = bucket
        self._s3 = aws.client("s3", region=region, endpoint_url=endpoint_url, **timeouts)

    def url(self, key: str) -> str:
        return f"s3://{self.bucket}/{key}"

    def _translated(self, what: str, not_found: ErrorCode | None = None):
        return aws.translated(what, ErrorCode.STORAGE_UNAVAILABLE, not_found=not_found,
                              misconfigured=ErrorCode.STORAGE_MISCONFIGURED)

    def check_bucket(self) -> None:
        """Raises RetryableError(STORAGE_MISCONFIGURED) unless the bucket exists and can be reached."""
        try:
            with self._translated(f"bucket {self.bucket}", not_found=ErrorCode.STORAGE_MISCONFIGURED):
                self._s3.head_bucket(Bucket=self.bucket)
        except PermanentError as exc:  # a missing bucket is the worker's setup, never the job's fault
            raise RetryableError(ErrorCode.STORAGE_MISCONFIGURED, exc.message) from exc

    def head(self, key: str) -> StoredObject | None:
        """The object at `key`, or None when there is none. A missing bucket is not a missing object:
        it raises RetryableError(STORAGE_MISCONFIGURED)."""
        try:
            with self._translated(f"head {self.url(key)}", not_found=ErrorCode.SOURCE_NOT_FOUND):
                head = self._s3.head_object(Bucket=self.bucket, Key=key)
        except PermanentError:  # HEAD answers have no body: a 404 may also mean "no such bucket"
            self.check_bucket()
            return None
        return StoredObject(key, int(head["ContentLength"]), head["ETag"], head.get("VersionId"), head.get("Metadata", {}))

    def download(self, source: StoredObject, path: Path, *, max_bytes: int = 0,
                 should_stop: Callable[[], bool] = lambda: False) -> int:
        """Fetch exactly the version of `source` that was seen (its ETag, and its version id where
        the bucket keeps versions) into `path`; returns its size.

        Raises RetryableError(SOURCE_CHANGED) when the object was replaced in between,
        PermanentError(INPUT_TOO_LARGE) as soon as more than `max_bytes` arrive, JobCancelled when
        `should_stop()` turns true."""
        pinned = {"IfMatch": source.etag, **({"VersionId": source.version_id} if source.version_id else {})}
        written = 0
        with open(path, "wb") as file:
            for attempt in range(RESUMES + 1):
                ranged = {"Range": f"bytes={written}-"} if written else {}
                progress = _Progress(written)
                try:
                    with self._translated(f"download {self.url(source.key)}", not_found=ErrorCode.SOURCE_NOT_FOUND):
                        written = self._stream(source, pinned | ranged, file, progress, max_bytes, should_stop)
                    break
                except RetryableError as exc:
                    if aws.is_precondition_failure(exc.__cause__):
                        raise RetryableError(ErrorCode.SOURCE_CHANGED,
                                             f"{self.url(source.key)} was replaced while it was being fetched") from exc
                    # Going on is worth it only where the stream broke off after some data: a request
                    # that failed outright has been retried by boto3 already.
                    if progress.bytes == written or attempt == RESUMES or exc.code != ErrorCode.STORAGE_UNAVAILABLE:
                        raise
                    written = progress.bytes
                    log.warning("download cut off after %s (%s); going on from there", human_bytes(written), exc)
        if written != source.size:
            raise RetryableError(ErrorCode.STORAGE_UNAVAILABLE,
                                 f"download of {self.url(source.key)} ended after {written} of {source.size} bytes")
        return written

    def _stream(self, source: StoredObject, args: dict, file, progress: "_Progress", max_bytes: int,
                should_stop: Callable[[], bool]) -> int:
        body = self._s3.get_object(Bucket=self.bucket, Key=source.key, **args)["Body"]
        try:
            for chunk in body.iter_chunks(CHUNK_BYTES):
                if should_stop():
                    raise JobCancelled()
                if max_bytes and progress.bytes + len(chunk) > max_bytes:
                    raise PermanentError(ErrorCode.INPUT_TOO_LARGE,
                                         f"source is larger than {max_bytes} bytes (MAX_DOWNLOAD_BYTES)")
                file.write(chunk)
                progress.bytes += len(chunk)
        finally:
            body.close()
        return progress.bytes

    def upload(self, path: Path, key: str, *, content_type: str, metadata: dict[str, str],
               should_stop: Callable[[], bool] = lambda: False, tags: dict[str, str] | None = None) -> None:
        """Put a file at `key` (in parts, in parallel, when it is large). S3 makes the object visible
        only once it is complete. JobCancelled when `should_stop()` turns true meanwhile."""
        extra = {"ContentType": content_type, "Metadata": metadata, **_tagging(tags)}
        with self._translated(f"upload {self.url(key)}"), create_transfer_manager(self._s3, TransferConfig()) as manager:
            future = manager.upload(str(path), self.bucket, key, extra_args=extra)
            while not future.done():
                if should_stop():
                    future.cancel()
                    break
                time.sleep(0.1)
            try:
                future.result()
            except CancelledError:
                raise JobCancelled() from None

    def read_json(self, key: str) -> tuple[dict, str] | None:
        """A small JSON object and its ETag, or None when there is none (or it is not JSON)."""
        try:
            with self._translated(f"read {self.url(key)}", not_found=ErrorCode.SOURCE_NOT_FOUND):
                response = self._s3.get_object(Bucket=self.bucket, Key=key)
                raw = response["Body"].read(CHUNK_BYTES)
        except PermanentError:
            return None
        try:
            data = json.loads(raw)
        except ValueError:
            data = None
        return (data if isinstance(data, dict) else {}), response["ETag"]

    def put_json(self, key: str, data: dict, *, if_match: str | None = None, if_absent: bool = False,
                 tags: dict[str, str] | None = None) -> str | None:
        """Write a small JSON object only if the object is still the version `if_match` (or, with
        `if_absent`, there is none). Returns the new ETag, or None when the condition did not hold."""
        condition = {"IfMatch": if_match} if if_match else {"IfNoneMatch": "*"} if if_absent else {}
        try:
            with self._translated(f"write {self.url(key)}"):
                response = self._s3.put_object(Bucket=self.bucket, Key=key, Body=json.dumps(data).encode(),
                                               ContentType="application/json", **condition, **_tagging(tags))
        except RetryableError as exc:
            if condition and aws.is_precondition_failure(exc.__cause__):
                return None
            raise
        return response["ETag"]

    def list_keys(self, prefix: str) -> dict[str, int]:
        """Every object under `prefix`, with its size."""
        found: dict[str, int] = {}
        with self._translated(f"list {self.url(prefix)}"):
            for page in self._s3.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=prefix):
                found.update((item["Key"], int(item["Size"])) for item in page.get("Contents", []))
        return found

    def delete_prefix(self, prefix: str) -> int:
        """Delete every object under `prefix`; returns how many there were."""
        keys = sorted(self.list_keys(prefix))
        for start in range(0, len(keys), 1000):  # DeleteObjects takes at most 1000 keys
            batch = [{"Key": key} for key in keys[start:start + 1000]]
            with self._translated(f"delete under {self.url(prefix)}"):
                response = self._s3.delete_objects(Bucket=self.bucket, Delete={"Objects": batch, "Quiet": True})
            if response.get("Errors"):
                error = response["Errors"][0]
                raise RetryableError(ErrorCode.STORAGE_UNAVAILABLE,
                                     f"could not delete {self.url(error['Key'])}: {error.get('Code')} {error.get('Message')}")
        return len(keys)


def _tagging(tags: dict[str, str] | None) -> dict[str, str]:
    return {"Tagging": urlencode(tags)} if tags else {}
