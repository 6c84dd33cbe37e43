"""An HTTP proxy on 127.0.0.1 in front of the S3/SQS server that fails chosen requests on purpose."""

import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable

import requests

Match = Callable[[str, str, dict], bool]  # (method, path, headers) -> fail this one?


class FaultProxy:
    def __init__(self, upstream: str):
        self.upstream = upstream.rstrip("/")
        self._rules: list[list] = []  # [match, remaining (None = forever), status]
        self._hooks: list[tuple[Match, Callable[[], None]]] = []  # run before forwarding, once each
        self._lie_about_size: list[tuple[Match, int]] = []
        self._trickle: list[tuple[Match, float]] = []
        self._lock = threading.Lock()
        self._closed = threading.Event()
        self.failed = 0
        self._sent: dict[str, int] = {}  # bytes of successful GET answers handed to the client, by path
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def _forward(self):
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                status = proxy._fault_for(self.command, self.path, dict(self.headers))
                if status is not None and status < 0:
                    if proxy._closed.wait(-status):
                        return  # held past the proxy's end: dropped, never forwarded into a later test
                    status = None
                if status:
                    payload = b"<Error><Code>ServiceUnavailable</Code><Message>injected</Message></Error>"
                    self.send_response(status)
                    self.send_header("Content-Length", str(len(payload)))
                    self.end_headers()
                    self.wfile.write(payload)
                    return
                proxy._run_hooks(self.command, self.path, dict(self.headers))
                response = requests.request(
                    self.command, proxy.upstream + self.path, data=body,
                    headers={k: v for k, v in self.headers.items() if k.lower() != "host"}, stream=True, timeout=60,
                )
                content = response.raw.read(decode_content=False)
                self.send_response(response.status_code)
                for key, value in response.headers.items():
                    if key.lower() not in ("content-length", "transfer-encoding", "connection", "content-encoding"):
                        self.send_header(key, value)
                if response.headers.get("content-encoding"):
                    self.send_header("Content-Encoding", response.headers["content-encoding"])
                # A HEAD answer has no body but keeps the size of the object it describes.
                length = response.headers.get("content-length") if self.command == "HEAD" else None
                if self.command == "HEAD" and (lie := proxy._first(proxy._lie_about_size, self)) is not None:
                    length = str(lie)
                self.send_header("Content-Length", length or str(len(content)))
                self.end_headers()
                seconds_per_kb = proxy._first(proxy._trickle, self)
                piece = 1024 if seconds_per_kb else max(len(content), 1)
                for start in range(0, len(content), piece):
                    chunk = content[start:start + piece]
                    self.wfile.write(chunk)
                    if self.command == "GET" and response.ok:
                        with proxy._lock:
                            proxy._sent[self.path] = proxy._sent.get(self.path, 0) + len(chunk)
                    if seconds_per_kb:
                        self.wfile.flush()
                        time.sleep(seconds_per_kb)

            do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _forward

            def log_message(self, *args):
                pass

        class Server(ThreadingHTTPServer):
            def handle_error(self, request, client_address):
                pass  # a client that hangs up (a killed worker) is part of the test, not news

        self._server = Server(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"

    def __enter__(self) -> "FaultProxy":
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        self._closed.set()
        self._server.shutdown()
        self._server.server_close()

    def fail(self, match: Match, times: int | None = None, status: int = 503) -> None:
        """Answer matching requests with `status` (`times` of them; None: all)."""
        with self._lock:
            self._rules.append([match, times, status])

    def slow(self, match: Match, seconds: float, times: int | None = None) -> None:
        """Hold matching requests for `seconds` before forwarding them."""
        with self._lock:
            self._rules.append([match, times, -seconds])

    def bytes_sent(self, key_part: str) -> int:
        """Bytes of GET answers (2xx) sent for paths containing `key_part`."""
        with self._lock:
            return sum(count for path, count in self._sent.items() if key_part in path)

    def before(self, match: Match, action: Callable[[], None]) -> None:
        """Run `action` before forwarding the next matching request (once)."""
        with self._lock:
            self._hooks.append((match, action))

    def lie_about_size(self, match: Match, size: int) -> None:
        """HEAD answers of matching requests say the object has `size` bytes."""
        self._lie_about_size.append((match, size))

    def trickle(self, match: Match, seconds_per_kb: float) -> None:
        """Answer matching requests' bodies 1 KB at a time, waiting between pieces."""
        self._trickle.append((match, seconds_per_kb))

    def _run_hooks(self, method: str, path: str, headers: dict) -> None:
        with self._lock:
            due = [hook for hook in self._hooks if hook[0](method, path, headers)]
            for hook in due:
                self._hooks.remove(hook)
        for _, action in due:
            action()

    @staticmethod
    def _first(rules: list, handler):
        return next((value for match, value in rules if match(handler.command, handler.path, dict(handler.headers))), None)

    def clear(self) -> None:
        with self._lock:
            self._rules.clear()

    def _fault_for(self, method: str, path: str, headers: dict) -> int | None:
        with self._lock:
            for rule in self._rules:
                match, remaining, status = rule
                if (remaining is None or remaining > 0) and match(method, path, headers):
                    if remaining is not None:
                        rule[1] -= 1
                    self.failed += 1
                    return status
        return None


def s3_head(key_part: str) -> Match:
    return lambda method, path, headers: method == "HEAD" and key_part in path


def s3_get(key_part: str) -> Match:
    """S3 GETs of an object whose path contains key_part (SQS calls are POSTs to '/')."""
    return lambda method, path, headers: method == "GET" and key_part in path


def sqs_call(action: str) -> Match:
    """SQS requests of one action (boto3 speaks SQS's JSON protocol: the action is in X-Amz-Target)."""
    return lambda method, path, headers: headers.get("X-Amz-Target", "").endswith(f".{action}")
