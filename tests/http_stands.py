"""Misbehaving HTTP servers on 127.0.0.1 standing in for a Spring that redirects, refuses or trickles."""

import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class Stand:
    """An HTTP server whose answer to each POST is `answer(handler, body)`; records what it got.

    `requests` holds (method, path, body) for every request, whatever the answer."""

    def __init__(self, answer):
        self.requests: list[tuple[str, str, bytes]] = []
        stand = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def _any(self):
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                stand.requests.append((self.command, self.path, body))
                answer(self, body)

            do_GET = do_POST = do_PUT = _any

            def log_message(self, *args):
                pass

        class Server(ThreadingHTTPServer):
            daemon_threads = True

            def handle_error(self, request, client_address):
                pass  # a client that gives up (a deadline) is part of the test

        self._server = Server(("127.0.0.1", 0), Handler)
        self.base = f"http://127.0.0.1:{self._server.server_address[1]}"
        self.url = f"{self.base}/api/jobs/{{job_id}}/callback"

    def __enter__(self) -> "Stand":
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()

    def posts(self) -> list[tuple[str, str, bytes]]:
        return [r for r in self.requests if r[0] == "POST"]


def reply(handler: BaseHTTPRequestHandler, status: int, headers: dict | None = None, body: bytes = b"") -> None:
    handler.send_response(status)
    for name, value in (headers or {}).items():
        handler.send_header(name, value)
    handler.send_header("Content-Length", str(len(body)))
    handler.end_headers()
    handler.wfile.write(body)


def ok(handler, _body) -> None:
    reply(handler, 200, body=b"ok")


def redirect_to(location: str, status: int = 302):
    """POSTs are redirected to `location`; anything else (the GET a client makes of a 302) answers 200."""
    def answer(handler, _body):
        if handler.command == "POST":
            reply(handler, status, {"Location": location})
        else:
            reply(handler, 200, body=b"<html>login</html>")
    return answer


def status(code: int):
    return lambda handler, _body: reply(handler, code, body=b"no")


def trickle(every_s: float = 0.5, for_s: float = 120):
    """Answers one byte of a status line at a time, so that no single read ever times out."""
    def answer(handler, _body):
        deadline = time.monotonic() + for_s
        try:
            for char in b"HTTP/1.1 200 OK\r\nX-Slow: " + b"a" * 100000:
                if time.monotonic() > deadline:
                    return
                handler.wfile.write(bytes([char]))
                handler.wfile.flush()
                time.sleep(every_s)
        except OSError:
            pass  # the client hung up
    return answer
