"""S3: where sources come from and results go."""

import logging
from pathlib import Path

from botocore.exceptions import BotoCoreError, ClientError

from echoshot_ai_server import aws
from echoshot_ai_server.errors import ErrorCode, PermanentError

log = logging.getLogger(__name__)
AWS_ERRORS = (ClientError, BotoCoreError)


class Storage:
    def __init__(self, bucket: str, *, region: str, endpoint_url: str | None = None, **timeouts: float):
        self.bucket = bucket
        self._s3 = aws.client("s3", region=region, endpoint_url=endpoint_url, **timeouts)

    def url(self, key: str) -> str:
        return f"s3://{self.bucket}/{key}"

    def download(self, key: str, path: Path) -> int:
        """Fetch an object into `path`; returns its size in bytes."""
        try:
            self._s3.download_file(self.bucket, key, str(path))
        except AWS_ERRORS as exc:
            raise aws.translate(exc, f"download {self.url(key)}", ErrorCode.STORAGE_UNAVAILABLE, ErrorCode.SOURCE_NOT_FOUND)
        return path.stat().st_size

    def upload(self, path: Path, key: str, *, content_type: str, metadata: dict[str, str]) -> None:
        """Put a file at `key`. S3 makes the object visible only once it is complete."""
        try:
            self._s3.upload_file(
                str(path), self.bucket, key, ExtraArgs={"ContentType": content_type, "Metadata": metadata}
            )
        except AWS_ERRORS as exc:
            raise aws.translate(exc, f"upload {self.url(key)}", ErrorCode.STORAGE_UNAVAILABLE)

    def size(self, key: str) -> int:
        """The size of an object in bytes; SOURCE_NOT_FOUND when there is none."""
        head = self._head(key)
        if head is None:
            raise PermanentError(ErrorCode.SOURCE_NOT_FOUND, f"{self.url(key)}: not found")
        return int(head["ContentLength"])

    def metadata(self, key: str) -> dict[str, str] | None:
        """The user metadata of an object, or None when there is no such object."""
        head = self._head(key)
        return None if head is None else head.get("Metadata", {})

    def _head(self, key: str) -> dict | None:
        try:
            return self._s3.head_object(Bucket=self.bucket, Key=key)
        except AWS_ERRORS as exc:
            error = aws.translate(exc, f"head {self.url(key)}", ErrorCode.STORAGE_UNAVAILABLE, ErrorCode.SOURCE_NOT_FOUND)
            if error.code == ErrorCode.SOURCE_NOT_FOUND:
                return None
            raise error
