"""The Spring callback: an HTTP POST of the job's outcome, retried with exponential backoff."""

import hashlib
import hmac
import json
import logging
import random
import threading
import time

import requests

from echoshot_ai_server.errors import ErrorCode, JobCancelled, PermanentError, RetryableError
from echoshot_ai_server.job import CallbackPayload

log = logging.getLogger(__name__)

RETRY_STATUSES = {408, 425, 429}
TIMESTAMP_HEADER = "X-EchoShotX-Timestamp"
SIGNATURE_HEADER = "X-EchoShotX-Signature"


class SpringCallback:
    def __init__(
        self,
        url_template: str,
        *,
        token: str | None = None,
        secret: str | None = None,
        timeout_s: float = 10,
        max_attempts: int = 6,
        backoff_base_s: float = 1,
        backoff_max_s: float = 30,
    ):
        self.url_template = url_template
        self._secret = secret.encode() if secret else None
        self.timeout_s = timeout_s
        self.max_attempts = max_attempts
        self.backoff_base_s = backoff_base_s
        self.backoff_max_s = backoff_max_s
        self._session = requests.Session()
        self._session.headers["Content-Type"] = "application/json"
        if token:
            self._session.headers["Authorization"] = f"Bearer {token}"

    def notify(self, payload: CallbackPayload, *, attempts: int | None = None, stop: threading.Event | None = None) -> None:
        """POST the payload until Spring accepts it (2xx).

        Raises PermanentError(CALLBACK_REJECTED) on a 4xx that retrying cannot fix,
        RetryableError(CALLBACK_FAILED) once the attempts are spent, JobCancelled if `stop` is set
        while waiting between attempts.
        """
        url = self.url_template.replace("{job_id}", requests.utils.quote(payload.job_id, safe=""))
        attempts = attempts or self.max_attempts
        for attempt in range(1, attempts + 1):
            problem = self._post(url, payload)
            if problem is None:
                return
            if attempt == attempts:
                raise RetryableError(ErrorCode.CALLBACK_FAILED, f"{payload.status.value} callback failed {attempts} times: {problem}")
            delay = min(self.backoff_max_s, self.backoff_base_s * 2 ** (attempt - 1)) * random.uniform(0.8, 1.0)
            log.warning("callback %s failed (%s); attempt %d/%d, next in %.1fs", payload.status.value, problem, attempt, attempts, delay)
            if (stop or threading.Event()).wait(delay):
                raise JobCancelled()

    def signed_headers(self, body: bytes, timestamp: int | None = None) -> dict[str, str]:
        """With a shared secret: the timestamp and HMAC-SHA256 of "<timestamp>.<body>" (docs/job-contract.md)."""
        if self._secret is None:
            return {}
        timestamp = int(time.time()) if timestamp is None else timestamp
        digest = hmac.new(self._secret, f"{timestamp}.".encode() + body, hashlib.sha256).hexdigest()
        return {TIMESTAMP_HEADER: str(timestamp), SIGNATURE_HEADER: f"sha256={digest}"}

    def _post(self, url: str, payload: CallbackPayload) -> str | None:
        """None when Spring accepted the callback, else why it did not (retryable)."""
        body = json.dumps(payload.to_json(), separators=(",", ":"), ensure_ascii=False).encode()
        try:
            response = self._session.post(url, data=body, headers=self.signed_headers(body), timeout=self.timeout_s)
        except requests.RequestException as exc:
            return f"{type(exc).__name__}: {exc}"
        if response.ok:
            return None
        if 400 <= response.status_code < 500 and response.status_code not in RETRY_STATUSES:
            raise PermanentError(
                ErrorCode.CALLBACK_REJECTED, f"Spring rejected the {payload.status.value} callback: HTTP {response.status_code} {response.text[:200]}"
            )
        return f"HTTP {response.status_code}"
