"""The system on one machine, without AWS or Spring: an S3/SQS-compatible server and a callback receiver.

Used by `make demo` and the tests; also runnable on its own:
    python -m echoshot_ai_server.dev.local receiver --port 8080
"""

import argparse
import json
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import boto3
import requests

LOCALHOST = "127.0.0.1"
FAKE_CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing"}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((LOCALHOST, 0))
        return sock.getsockname()[1]


class MotoServer:
    """A `moto_server` process on 127.0.0.1: S3 and SQS behind one endpoint URL."""

    def __init__(self, port: int | None = None):
        self.port = port or free_port()
        self.endpoint_url = f"http://{LOCALHOST}:{self.port}"
        self._process: subprocess.Popen | None = None

    def __enter__(self) -> "MotoServer":
        executable = shutil.which("moto_server", path=str(Path(sys.executable).parent)) or shutil.which("moto_server")
        if executable is None:
            raise RuntimeError("moto_server not found: pip install 'moto[server]'")
        self._process = subprocess.Popen(
            [executable, "-H", LOCALHOST, "-p", str(self.port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                requests.get(f"{self.endpoint_url}/moto-api/", timeout=1)
                return self
            except requests.ConnectionError:
                if self._process.poll() is not None:
                    raise RuntimeError(f"moto_server exited with {self._process.returncode}")
                time.sleep(0.1)
        self.__exit__()
        raise RuntimeError("moto_server did not start within 30 s")

    def __exit__(self, *exc) -> None:
        if self._process and self._process.poll() is None:
            self._process.terminate()
            try:
                self._process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()

    def reset(self) -> None:
        requests.post(f"{self.endpoint_url}/moto-api/reset", timeout=10).raise_for_status()

    def env(self, region: str) -> dict[str, str]:
        """Environment for a process that should talk to this server through boto3."""
        return {"AWS_ENDPOINT_URL": self.endpoint_url, "AWS_REGION": region, "AWS_DEFAULT_REGION": region, **FAKE_CREDENTIALS}

    def client(self, service: str, region: str):
        return boto3.client(
            service, region_name=region, endpoint_url=self.endpoint_url,
            aws_access_key_id="testing", aws_secret_access_key="testing",
        )


def create_bucket(s3, bucket: str, region: str) -> None:
    s3.create_bucket(Bucket=bucket, CreateBucketConfiguration={"LocationConstraint": region})


def create_queue_with_dlq(sqs, name: str, *, max_receive_count: int, visibility_timeout_s: int = 300) -> tuple[str, str]:
    """A job queue whose redrive policy moves a message to `<name>-dlq` after max_receive_count receives."""
    suffix = ".fifo" if name.endswith(".fifo") else ""
    base = name.removesuffix(".fifo")
    fifo = {"FifoQueue": "true"} if suffix else {}
    dlq_url = sqs.create_queue(QueueName=f"{base}-dlq{suffix}", Attributes=fifo)["QueueUrl"]
    dlq_arn = sqs.get_queue_attributes(QueueUrl=dlq_url, AttributeNames=["QueueArn"])["Attributes"]["QueueArn"]
    redrive = json.dumps({"deadLetterTargetArn": dlq_arn, "maxReceiveCount": str(max_receive_count)})
    attributes = {"VisibilityTimeout": str(visibility_timeout_s), "RedrivePolicy": redrive, **fifo}
    return sqs.create_queue(QueueName=name, Attributes=attributes)["QueueUrl"], dlq_url


@dataclass
class ReceivedCallback:
    path: str
    headers: dict[str, str]
    body: dict
    raw: bytes


@dataclass
class CallbackReceiver:
    """An HTTP server standing in for Spring: records every JSON POST; can fail on purpose.

    `fail_next(n, status)` answers the next n requests with `status` (0 = drop the connection);
    `down = status` answers every request so until `down = None`.
    """

    port: int = 0
    host: str = LOCALHOST
    received: list[ReceivedCallback] = field(default_factory=list)
    down: int | None = None
    _failures: list[int] = field(default_factory=list)
    _lock: threading.Condition = field(default_factory=threading.Condition)

    def __post_init__(self):
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length)
                with receiver._lock:
                    status = receiver._failures.pop(0) if receiver._failures else (receiver.down or 200)
                    if status == 200:
                        receiver.received.append(
                            ReceivedCallback(self.path, dict(self.headers), json.loads(raw or b"{}"), raw)
                        )
                        receiver._lock.notify_all()
                if status == 0:
                    self.close_connection = True
                    self.connection.shutdown(socket.SHUT_RDWR)
                    return
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args):
                pass

        self._server = ThreadingHTTPServer((self.host, self.port), Handler)
        self.port = self._server.server_address[1]
        self.url = f"http://{self.host}:{self.port}/api/jobs/{{job_id}}/callback"

    def __enter__(self) -> "CallbackReceiver":
        threading.Thread(target=self._server.serve_forever, name="callback-receiver", daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()

    def fail_next(self, count: int, status: int = 503) -> None:
        with self._lock:
            self._failures.extend([status] * count)

    def bodies(self, job_id: str | None = None) -> list[dict]:
        with self._lock:
            return [c.body for c in self.received if job_id is None or c.body.get("jobId") == job_id]

    def wait_for(self, job_id: str, statuses: tuple[str, ...] = ("COMPLETED", "FAILED"), timeout_s: float = 60) -> dict:
        """The first callback of `job_id` with one of `statuses`, waiting for it if need be."""
        deadline = time.monotonic() + timeout_s
        with self._lock:
            while True:
                for body in (c.body for c in self.received):
                    if body.get("jobId") == job_id and body.get("status") in statuses:
                        return body
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError(f"no {'/'.join(statuses)} callback for {job_id} within {timeout_s}s")
                self._lock.wait(remaining)


def make_sample_clip(path: Path) -> Path:
    """Two seconds of moving test pattern with a tone, 128x72 at 12 fps: small enough for 2 CPU cores."""
    subprocess.run(
        ["ffmpeg", "-nostdin", "-loglevel", "error", "-y",
         "-f", "lavfi", "-i", "testsrc2=size=128x72:rate=12:duration=2",
         "-f", "lavfi", "-i", "sine=frequency=440:duration=2",
         "-c:v", "libx264", "-pix_fmt", "yuv420p", "-c:a", "aac", str(path)],
        check=True,
    )
    return path


def _serve_receiver(host: str, port: int) -> None:
    with CallbackReceiver(host=host, port=port) as receiver:
        print(f"callback receiver on {receiver.url}", flush=True)
        last = 0
        try:
            while True:
                time.sleep(0.5)
                for callback in receiver.received[last:]:
                    print(json.dumps(callback.body, ensure_ascii=False), flush=True)
                last = len(receiver.received)
        except KeyboardInterrupt:
            pass


def _local_setup(bucket: str, queue: str, sample_job: bool, region: str, endpoint_url: str | None) -> None:
    """Create the bucket and the queue (with its dead-letter queue) on the S3/SQS server at
    `endpoint_url` (None: where boto3's AWS_ENDPOINT_URL points); optionally upload a generated clip
    and enqueue a job for it."""
    from echoshot_ai_server.job import job_message_body

    s3 = boto3.client("s3", region_name=region, endpoint_url=endpoint_url)
    sqs = boto3.client("sqs", region_name=region, endpoint_url=endpoint_url)
    for _ in range(60):  # the server may still be starting
        try:
            s3.list_buckets()
            break
        except Exception:  # noqa: BLE001
            time.sleep(1)
    if bucket not in [b["Name"] for b in s3.list_buckets()["Buckets"]]:
        create_bucket(s3, bucket, region)
    queue_url, dlq_url = create_queue_with_dlq(sqs, queue, max_receive_count=5)
    print(f"bucket {bucket}, queue {queue_url}, dead letters {dlq_url}", flush=True)
    if sample_job:
        with tempfile.TemporaryDirectory() as tmp:
            sample = make_sample_clip(Path(tmp) / "sample.mp4")
            s3.upload_file(str(sample), bucket, "uploads/demo-user/sample.mp4")
        body = job_message_body("local-sample", "uploads/demo-user/sample.mp4", scale=2, device="cpu", user_id="demo-user")
        sqs.send_message(QueueUrl=queue_url, MessageBody=body)
        print("enqueued job local-sample for s3://%s/uploads/demo-user/sample.mp4" % bucket, flush=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="local stand-ins for the worker's neighbours")
    sub = parser.add_subparsers(dest="command", required=True)
    rec = sub.add_parser("receiver", help="print the callbacks Spring would receive")
    rec.add_argument("--host", default=LOCALHOST)
    rec.add_argument("--port", type=int, default=8080)
    setup = sub.add_parser("local-setup", help="create the bucket and queues on AWS_ENDPOINT_URL")
    setup.add_argument("--bucket", required=True)
    setup.add_argument("--queue", required=True)
    setup.add_argument("--sample-job", action="store_true", help="also upload a sample clip and enqueue a job")
    setup.add_argument("--region", default="ap-northeast-2")
    setup.add_argument("--endpoint-url", default=None, help="the S3/SQS server (default: boto3's AWS_ENDPOINT_URL)")
    args = parser.parse_args()
    if args.command == "receiver":
        _serve_receiver(args.host, args.port)
    else:
        _local_setup(args.bucket, args.queue, args.sample_job, args.region, args.endpoint_url)
