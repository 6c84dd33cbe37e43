"""Health and metrics over HTTP: `/healthz` for load balancers and Docker, `/metrics` for Prometheus."""

import json
import logging
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from echoshot_ai_server.errors import ErrorCode, PermanentError

log = logging.getLogger(__name__)

DURATION_BUCKETS_S = (1, 5, 15, 30, 60, 120, 300, 600, 1200, 1800, 3600, 7200)
WAIT_BUCKETS_S = (0.1, 1, 5, 15, 30, 60, 300, 900, 1800, 3600, 14400)


class Monitoring:
    """The worker's figures, and the HTTP server that shows them."""

    def __init__(self, *, queue_stale_after_s: float = 60, gpu_memory: Callable[[], dict] | None = None):
        self.registry = CollectorRegistry()
        self.jobs = Counter("echoshot_jobs", "Jobs settled, by outcome and queue", ["outcome", "queue"],
                            registry=self.registry)
        self.job_duration = Histogram("echoshot_job_duration_seconds", "Wall time of a job, from receipt to settling",
                                      buckets=DURATION_BUCKETS_S, registry=self.registry)
        self.queue_wait = Histogram("echoshot_queue_wait_seconds", "Time from Spring sending a job to a worker receiving it",
                                    buckets=WAIT_BUCKETS_S, registry=self.registry)
        self.frames = Counter("echoshot_frames_upscaled", "Frames upscaled", registry=self.registry)
        self.billed = Counter("echoshot_billed_source_seconds", "Source seconds of completed jobs (what they are "
                              "billed), by queue", ["queue"], registry=self.registry)
        self.compute = Counter("echoshot_compute_seconds", "Worker seconds spent on jobs that completed or on their "
                               "segments, by queue", ["queue"], registry=self.registry)
        self.last_fps = Gauge("echoshot_last_job_frames_per_second", "Frames per second of the last completed job",
                              registry=self.registry)
        self.in_flight = Gauge("echoshot_jobs_in_flight", "Jobs running now", registry=self.registry)
        self.ready = Gauge("echoshot_ready", "1 when the model is loaded, the queue answered lately and nothing is wrong",
                           registry=self.registry)
        self.startup = Gauge("echoshot_startup_seconds", "From the process's start to ready: the model loaded, its "
                             "kernels tuned and compiled", registry=self.registry)
        self.model_speed = Gauge("echoshot_model_speed_pixels_per_second", "Pixels a model takes in per second on this "
                                 "worker's device, measured at start-up (job estimates come from it)", ["model"],
                                 registry=self.registry)
        self.ready.set_function(lambda: 1.0 if self.is_ready()[0] else 0.0)
        if gpu_memory is not None:
            gauge = Gauge("echoshot_gpu_memory_bytes", "GPU memory held by PyTorch", ["kind"], registry=self.registry)
            for kind in ("allocated", "reserved"):
                gauge.labels(kind).set_function(lambda kind=kind: gpu_memory()[kind])
        self.queue_stale_after_s = queue_stale_after_s
        self.problems: dict[str, str] = {}  # what is wrong with the worker's surroundings, by kind
        self.model_loaded = False
        self._queue_ok_at: float | None = None
        self._queue_error: str | None = None
        self._server: ThreadingHTTPServer | None = None
        self.port: int | None = None

    # -- what the worker reports ------------------------------------------------------------
    def queue_answered(self) -> None:
        self._queue_ok_at, self._queue_error = time.monotonic(), None

    def queue_failed(self, error: str) -> None:
        self._queue_error = error

    def problem(self, kind: str, description: str) -> None:
        """Not ready until `clear(kind)`: a bucket that is gone, a work directory that cannot be
        written, credentials that Spring refuses."""
        self.problems[kind] = description

    def clear(self, kind: str) -> None:
        self.problems.pop(kind, None)

    def job_received(self, sent_at_ms: int | None) -> None:
        self.in_flight.inc()
        if sent_at_ms:
            self.queue_wait.observe(max(0.0, time.time() - sent_at_ms / 1000))

    def job_settled(self, outcome: str, duration_s: float, frames: int = 0, queue: str = "", billed_s: float = 0,
                    compute_s: float = 0) -> None:
        self.in_flight.dec()
        self.jobs.labels(outcome, queue).inc()
        if billed_s or compute_s:
            self.billed.labels(queue).inc(billed_s)
            self.compute.labels(queue).inc(compute_s)
        self.job_duration.observe(duration_s)
        if frames:
            self.frames.inc(frames)
            self.last_fps.set(frames / max(duration_s, 1e-9))

    def is_ready(self) -> tuple[bool, dict]:
        fresh = self._queue_ok_at is not None and time.monotonic() - self._queue_ok_at < self.queue_stale_after_s
        queue_ok = fresh and self._queue_error is None
        details = {"model_loaded": self.model_loaded, "queue_reachable": queue_ok}
        if self._queue_error:
            details["queue_error"] = self._queue_error
        problems = dict(self.problems)
        if problems:
            details["problems"] = problems
        return self.model_loaded and queue_ok and not problems, details

    # -- the HTTP side ----------------------------------------------------------------------
    def serve(self, host: str, port: int) -> int:
        """Start serving in a thread; returns the port (useful with port 0)."""
        monitoring = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                if self.path == "/metrics":
                    self._send(200, generate_latest(monitoring.registry), CONTENT_TYPE_LATEST)
                elif self.path == "/healthz":
                    ready, details = monitoring.is_ready()
                    self._send(200 if ready else 503, json.dumps({"ready": ready, **details}).encode(), "application/json")
                else:
                    self._send(404, b"not found\n", "text/plain")

            def _send(self, status: int, body: bytes, content_type: str) -> None:
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        try:
            self._server = ThreadingHTTPServer((host, port), Handler)
        except OSError as exc:
            raise PermanentError(
                ErrorCode.INVALID_PARAMETERS, f"cannot serve health and metrics on {host}:{port} ({exc.strerror}): "
                "set METRICS_PORT to a free port, or METRICS_ENABLED=false",
            ) from exc
        threading.Thread(target=self._server.serve_forever, name="monitoring", daemon=True).start()
        self.port = self._server.server_address[1]
        log.info("health and metrics on http://%s:%d/healthz and /metrics", host, self.port)
        return self.port

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
