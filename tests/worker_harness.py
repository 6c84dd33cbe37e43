"""Helpers for tests that run the worker against the local S3/SQS server (fixtures in conftest)."""

import time
from concurrent.futures import wait

from conftest import BUCKET, REGION, tiny_upscaler
from echoshot_ai_server.config import Settings
from echoshot_ai_server.engine.device import DeviceOutOfMemory
from echoshot_ai_server.job import job_message_body
from echoshot_ai_server.app.wiring import build_worker


def settings_for(stack, **overrides) -> Settings:
    values = dict(
        aws_region=REGION, aws_endpoint_url=stack.moto.endpoint_url, sqs_queue_url=stack.queue_url,
        s3_bucket_name=BUCKET, spring_callback_url=stack.receiver.url, work_dir=stack.work_dir,
        worker_device="cpu", cpu_worker_count=1, poll_wait_s=1, visibility_timeout_s=30,
        retry_base_delay_s=0, callback_backoff_base_s=0.05, callback_backoff_max_s=0.2, progress_callback_interval_s=0,
    )
    values.update(overrides)
    return Settings(**values)


def make_worker(stack, upscalers=None, **overrides):
    worker = build_worker(settings_for(stack, **overrides), upscalers or [tiny_upscaler()])
    worker.monitoring.model_loaded = True  # as run() marks it after the warm-up; tests call run_once()
    return worker


def upload_clip(stack, make_clip, key="uploads/user123/clip.mp4", **clip_args) -> str:
    stack.s3.upload_file(str(make_clip(**clip_args)), BUCKET, key)
    return key


def send(stack, body: str) -> None:
    stack.sqs.send_message(QueueUrl=stack.queue_url, MessageBody=body)


def enqueue(stack, key: str, job_id: str, scale: int = 2, device: str = "cpu", **optional) -> None:
    send(stack, job_message_body(job_id, key, scale=scale, device=device, user_id="123", **optional))


def run_jobs(worker, rounds: int = 1) -> None:
    for _ in range(rounds):
        wait(worker.run_once())


def queue_counts(stack, url=None) -> tuple[int, int]:
    attributes = stack.sqs.get_queue_attributes(
        QueueUrl=url or stack.queue_url,
        AttributeNames=["ApproximateNumberOfMessages", "ApproximateNumberOfMessagesNotVisible"],
    )["Attributes"]
    return int(attributes["ApproximateNumberOfMessages"]), int(attributes["ApproximateNumberOfMessagesNotVisible"])


def statuses(stack, job_id):
    return [b["status"] for b in stack.receiver.bodies(job_id)]


def leftovers(work_dir) -> list:
    """Job directories and files left under the work directory (the workers' own folders and locks aside)."""
    if not work_dir.exists():
        return []
    return sorted(p for p in work_dir.rglob("*") if not p.name.startswith("worker-"))


class OutOfMemoryUpscaler:
    """The tiny upscaler's shape, but every batch runs out of memory (a transient failure)."""

    def __init__(self):
        self.inner = tiny_upscaler()

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def upscale(self, frames, outscale):
        raise DeviceOutOfMemory("out of memory (planted)")


class SlowUpscaler:
    """A real (tiny) upscaler that takes its time, to make a job outlast the visibility timeout."""

    def __init__(self, seconds_per_batch: float):
        self.inner = tiny_upscaler(batch_frames=1)
        self.seconds_per_batch = seconds_per_batch

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def upscale(self, frames, outscale):
        time.sleep(self.seconds_per_batch)
        return self.inner.upscale(frames, outscale)


def wait_until(predicate, timeout_s: float, what: str):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.2)
    raise TimeoutError(what)


def messages_stolen_during_one_job(stack, worker, queue_url: str | None = None) -> list:
    """Run one job with the worker's heartbeat on, while a second consumer polls the queue (the stack's,
    or `queue_url`) all along. Returns what that second consumer received (nothing, when the heartbeat
    does its work)."""
    worker.heartbeat.start()
    try:
        [future] = worker.run_once()
        stolen = []
        while not future.done():
            stolen += stack.sqs.receive_message(QueueUrl=queue_url or stack.queue_url, WaitTimeSeconds=1).get("Messages", [])
        future.result()
    finally:
        worker.heartbeat.stop()
    return stolen
