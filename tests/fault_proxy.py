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
        self._lock = threading.Lock()
        self.failed = 0
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def _forward(self):
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                status = proxy._fault_for(self.command, self.path, dict(self.headers))
                if status is not None and status < 0:
                    time.sleep(-status)
                    status = None
                if status:
                    payload = b"<Error><Code>ServiceUnavailable</Code><Message>injected</Message></Error>"
                    self.send_response(status)
                    self.send_header("Content-Length", str(len(payload)))
                    self.end_headers()
                    self.wfile.write(payload)
                    return
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
                self.send_header("Content-Length", length or str(len(content)))
                self.end_headers()
                self.wfile.write(content)

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


def s3_get(key_part: str) -> Match:
    """S3 GETs of an object whose path contains key_part (SQS calls are POSTs to '/')."""
    return lambda method, path, headers: method == "GET" and key_part in path


def sqs_call(action: str) -> Match:
    """SQS requests of one action (boto3 speaks SQS's JSON protocol: the action is in X-Amz-Target)."""
    return lambda method, path, headers: headers.get("X-Amz-Target", "").endswith(f".{action}")
