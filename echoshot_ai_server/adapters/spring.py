"""The Spring callback: an HTTP POST of the job's outcome, retried with exponential backoff.

Each request has one deadline for all of it (connecting, sending, and the answer however slowly it
trickles in) and is abandoned at once when the job is stopped. Redirects are never followed: a
redirect would turn the POST into a GET that answers 200 (a login page) or send the signed body to
another host, so a 3xx is a failed delivery, as are 401/403 (a token Spring no longer accepts).
"""

import hashlib
import hmac
import http.client
import json
import logging
import socket
import ssl
import threading
import time
from urllib.parse import quote, urlsplit

from echoshot_ai_server.errors import ErrorCode, JobCancelled, PermanentError, RetryableError, backoff_s
from echoshot_ai_server.job import CallbackPayload, reportable_job_id

log = logging.getLogger(__name__)

RETRY_STATUSES = {408, 425, 429}
CREDENTIAL_STATUSES = {401, 403, 407}
TIMESTAMP_HEADER = "X-EchoShotX-Timestamp"
SIGNATURE_HEADER = "X-EchoShotX-Signature"
MAX_ANSWER_BYTES = 64 * 1024


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
        self._headers = {"Content-Type": "application/json", "Connection": "close"}
        if token:
            self._headers["Authorization"] = f"Bearer {token}"
        self.timeout_s = timeout_s
        self.max_attempts = max_attempts
        self.backoff_base_s = backoff_base_s
        self.backoff_max_s = backoff_max_s
        self._ssl = ssl.create_default_context()

    def url_for(self, job_id: str) -> str:
        """The callback URL of a job. The id fills one path segment and can never change the path."""
        if reportable_job_id(job_id) is None:
            raise ValueError(f"job id {job_id!r} cannot be reported")
        return self.url_template.replace("{job_id}", quote(job_id, safe=""))

    def notify(self, payload: CallbackPayload, *, attempts: int | None = None, stop: threading.Event | None = None) -> None:
        """POST the payload until Spring accepts it (2xx).

        Raises PermanentError(CALLBACK_REJECTED) on a 4xx that retrying cannot fix,
        RetryableError(CALLBACK_MISCONFIGURED) on a redirect or refused credentials,
        RetryableError(CALLBACK_FAILED) once the attempts are spent, JobCancelled if `stop` is set
        during a request or while waiting between attempts.
        """
        url = self.url_for(payload.job_id)
        attempts = attempts or self.max_attempts
        for attempt in range(1, attempts + 1):
            problem = self._post(url, payload, stop)
            if problem is None:
                return
            if attempt == attempts:
                raise RetryableError(ErrorCode.CALLBACK_FAILED, f"{payload.status.value} callback failed {attempts} times: {problem}")
            delay = backoff_s(attempt, self.backoff_base_s, self.backoff_max_s)
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

    def _post(self, url: str, payload: CallbackPayload, stop: threading.Event | None) -> str | None:
        """None when Spring accepted the callback, else why it did not (retryable)."""
        body = json.dumps(payload.to_json(), separators=(",", ":"), ensure_ascii=False).encode()
        what = f"the {payload.status.value} callback"
        try:
            status, location, answer = post(url, body, {**self._headers, **self.signed_headers(body)},
                                            deadline_s=self.timeout_s, stop=stop, ssl_context=self._ssl)
        except TimeoutError:
            return f"no complete answer within {self.timeout_s:g}s"
        except (OSError, http.client.HTTPException) as exc:
            return f"{type(exc).__name__}: {exc}"
        if 200 <= status < 300:
            return None
        if 300 <= status < 400:
            raise RetryableError(ErrorCode.CALLBACK_MISCONFIGURED, f"Spring answered {what} with HTTP {status}, a redirect "
                                 f"to {location!r} that is not followed: check SPRING_CALLBACK_URL")
        if status in CREDENTIAL_STATUSES:
            raise RetryableError(ErrorCode.CALLBACK_MISCONFIGURED, f"Spring refused the credentials of {what} "
                                 f"(HTTP {status}): check SPRING_CALLBACK_TOKEN and SPRING_CALLBACK_SECRET")
        if 400 <= status < 500 and status not in RETRY_STATUSES:
            text = answer[:200].decode(errors="replace")
            raise PermanentError(ErrorCode.CALLBACK_REJECTED, f"Spring rejected {what}: HTTP {status} {text}")
        return f"HTTP {status}"


def post(url: str, body: bytes, headers: dict[str, str], *, deadline_s: float, stop: threading.Event | None = None,
         ssl_context: ssl.SSLContext | None = None) -> tuple[int, str | None, bytes]:
    """POST `body`; returns (status, Location header, the first 64 KB of the answer).

    The whole exchange must end within `deadline_s`, else TimeoutError; JobCancelled when `stop` is
    set meanwhile. A watchdog shuts the socket down, which ends any read at once."""
    parts = urlsplit(url)
    if parts.scheme == "https":
        conn = http.client.HTTPSConnection(parts.hostname, parts.port, timeout=deadline_s, context=ssl_context)
    elif parts.scheme == "http":
        conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=deadline_s)
    else:
        raise ValueError(f"callback URL must be http or https: {url!r}")
    watchdog = _Watchdog(conn, deadline_s, stop)
    try:
        conn.request("POST", parts.path + (f"?{parts.query}" if parts.query else ""), body=body, headers=headers)
        response = conn.getresponse()
        return response.status, response.getheader("Location"), response.read(MAX_ANSWER_BYTES)
    except (OSError, http.client.HTTPException):
        watchdog.raise_if_fired()
        raise
    finally:
        watchdog.done()
        conn.close()


class _Watchdog:
    """Ends a connection's I/O when its deadline passes or `stop` is set."""

    def __init__(self, conn: http.client.HTTPConnection, deadline_s: float, stop: threading.Event | None):
        self._conn, self._stop = conn, stop
        self._deadline = time.monotonic() + deadline_s
        self._finished = threading.Event()
        self.fired: type[BaseException] | None = None
        threading.Thread(target=self._watch, name="callback-deadline", daemon=True).start()

    def _watch(self) -> None:
        while not self._finished.wait(0.05):
            if self.fired is None and self._stop is not None and self._stop.is_set():
                self.fired = JobCancelled
            elif self.fired is None and time.monotonic() >= self._deadline:
                self.fired = TimeoutError
            sock = self._conn.sock
            if self.fired is not None and sock is not None:  # while connecting, the socket's own timeout rules
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                return

    def done(self) -> None:
        self._finished.set()

    def raise_if_fired(self) -> None:
        if self.fired is not None:
            raise self.fired()
