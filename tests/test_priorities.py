"""The guide's priorities on one worker: several queues, highest first, none starved; each message
settled, retried and dead-lettered on the queue it came from."""

import sys
import time

import pytest

from conftest import BUCKET
from echoshot_ai_server.adapters.sqs import JobQueue, PriorityQueues
from echoshot_ai_server.dev.local import create_queue_with_dlq
from echoshot_ai_server.engine.device import DeviceOutOfMemory
from echoshot_ai_server.job import job_message_body
from worker_harness import (
    OutOfMemoryUpscaler, SlowUpscaler, make_worker, messages_stolen_during_one_job, queue_counts, run_jobs, statuses,
    tiny_upscaler,
)


def two_queues(stack, basic_receives: int = 3) -> tuple[str, str, str]:
    """A standard queue (the stack's) and a basic one with its own dead-letter queue."""
    basic, basic_dlq = create_queue_with_dlq(stack.sqs, "upscale-cpu-basic-queue", max_receive_count=basic_receives,
                                             visibility_timeout_s=30)
    return stack.queue_url, basic, basic_dlq


def send_to(stack, url: str, job_id: str, key: str) -> None:
    stack.sqs.send_message(QueueUrl=url, MessageBody=job_message_body(job_id, key, scale=2, device="cpu"))


def completed_order(stack) -> list[str]:
    return [c.body["jobId"] for c in stack.receiver.received if c.body["status"] == "COMPLETED"]


def test_the_higher_queue_is_served_first(stack, make_clip):
    standard, basic, _ = two_queues(stack)
    stack.s3.upload_file(str(make_clip(frames=2)), BUCKET, "uploads/u/clip.mp4")
    for i in range(2):
        send_to(stack, basic, f"basic-{i}", "uploads/u/clip.mp4")
    for i in range(2):
        send_to(stack, standard, f"standard-{i}", "uploads/u/clip.mp4")
    worker = make_worker(stack, sqs_queue_urls=[standard, basic], poll_wait_s=0)

    run_jobs(worker, rounds=4)

    order = completed_order(stack)
    assert set(order[:2]) == {"standard-0", "standard-1"} and set(order[2:]) == {"basic-0", "basic-1"}
    assert queue_counts(stack, standard) == (0, 0) and queue_counts(stack, basic) == (0, 0)
    metrics = {(s.labels["outcome"], s.labels["queue"]): s.value
               for m in worker.monitoring.registry.collect() if m.name == "echoshot_jobs" for s in m.samples
               if s.name == "echoshot_jobs_total"}
    assert metrics == {("completed", "upscale-cpu-queue"): 2, ("completed", "upscale-cpu-basic-queue"): 2}


def test_a_lower_queue_is_never_starved_for_longer_than_the_guard(stack, make_clip):
    standard, basic, _ = two_queues(stack)
    stack.s3.upload_file(str(make_clip(frames=2)), BUCKET, "uploads/u/clip.mp4")
    send_to(stack, basic, "basic-0", "uploads/u/clip.mp4")
    for i in range(6):
        send_to(stack, standard, f"standard-{i}", "uploads/u/clip.mp4")
    worker = make_worker(stack, sqs_queue_urls=[standard, basic], poll_wait_s=0, queue_starvation_s=1)

    started = time.monotonic()
    while "basic-0" not in completed_order(stack):
        run_jobs(worker)
        assert time.monotonic() - started < 120
    order = completed_order(stack)
    # the standard queue never ran dry, yet the basic job was served within about the guard
    assert order.index("basic-0") < 6 and queue_counts(stack, standard)[0] > 0


def test_each_message_is_retried_and_dead_lettered_on_its_own_queue(stack, make_clip):
    standard, basic, basic_dlq = two_queues(stack, basic_receives=2)
    stack.s3.upload_file(str(make_clip(frames=2)), BUCKET, "uploads/u/clip.mp4")
    send_to(stack, basic, "basic-oom", "uploads/u/clip.mp4")
    worker = make_worker(stack, [OutOfMemoryUpscaler()], sqs_queue_urls=[standard, basic], poll_wait_s=0)
    assert worker.redrive == {standard: 3, basic: 2}

    run_jobs(worker)  # attempt 1 of 2: released on the basic queue for a retry
    assert queue_counts(stack, basic) == (1, 0) and queue_counts(stack, standard) == (0, 0)
    run_jobs(worker)  # attempt 2 of 2 (the basic queue's redrive): FAILED, handed to its dead-letter queue
    assert statuses(stack, "basic-oom")[-1] == "FAILED"
    run_jobs(worker)  # the next receive moves it
    assert queue_counts(stack, basic_dlq)[0] == 1 and queue_counts(stack, stack.dlq_url) == (0, 0)


def test_priority_queues_settle_each_message_where_it_came_from(stack):
    standard, basic, _ = two_queues(stack)
    queues = PriorityQueues([JobQueue(u, region="ap-northeast-2", endpoint_url=stack.moto.endpoint_url)
                             for u in (standard, basic)], starvation_s=300)
    stack.sqs.send_message(QueueUrl=basic, MessageBody="{}")
    [message] = queues.receive(1, wait_s=0, visibility_timeout_s=30)
    assert message.queue_url == basic and queues.of(message).name == "upscale-cpu-basic-queue"
    queues.release(message)
    assert queue_counts(stack, basic) == (1, 0)
    [message] = queues.receive(1, wait_s=0, visibility_timeout_s=30)
    queues.delete(message)
    assert queue_counts(stack, basic) == (0, 0)


def test_enqueue_sends_to_the_tiers_queue(stack, monkeypatch):
    from echoshot_ai_server.cli import main as echoshot

    standard, basic, _ = two_queues(stack)
    monkeypatch.setenv("TIER_QUEUE_URLS", f"standard={standard}, basic={basic}")
    assert echoshot(["enqueue", "--source", "uploads/a.mp4", "--scale", "2", "--tier", "basic", "--job-id", "b"]) == 0
    [message] = stack.sqs.receive_message(QueueUrl=basic)["Messages"]
    assert '"device": "cpu"' in message["Body"] and queue_counts(stack, standard) == (0, 0)
    assert echoshot(["enqueue", "--source", "uploads/a.mp4", "--scale", "4", "--tier", "premium"]) == 1  # no queue set


class FailsFirstTimeOn:
    """The tiny upscaler, out of memory the first time it meets a frame of a given colour."""

    def __init__(self):
        self.inner = tiny_upscaler()
        self.failed = False

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def upscale(self, frames, outscale):
        if not self.failed and frames.mean() < 20:  # the black clip
            self.failed = True
            raise DeviceOutOfMemory("out of memory (planted)")
        return self.inner.upscale(frames, outscale)


def test_fifo_retries_wait_their_backoff_without_holding_up_other_groups(stack, make_clip):
    """FIFO queues take no per-message delay: a retry is the message kept out of sight for its backoff
    (its visibility timeout), which holds back only its own group."""
    fifo, _ = create_queue_with_dlq(stack.sqs, "upscale-gpu-queue.fifo", max_receive_count=3, visibility_timeout_s=30)
    black = make_clip(name="black.mp4", frames=2, pattern="color")  # black
    stack.s3.upload_file(str(black), BUCKET, "uploads/u/black.mp4")
    stack.s3.upload_file(str(make_clip(frames=2)), BUCKET, "uploads/u/clip.mp4")
    for job, key in (("j-retried", "uploads/u/black.mp4"), ("j-other", "uploads/u/clip.mp4")):
        stack.sqs.send_message(QueueUrl=fifo, MessageBody=job_message_body(job, key, scale=2, device="cpu"),
                               MessageGroupId=job, MessageDeduplicationId=job)
    worker = make_worker(stack, [FailsFirstTimeOn()], sqs_queue_url=fifo, poll_wait_s=0, retry_base_delay_s=4)

    run_jobs(worker)  # j-retried fails once: out of sight for its backoff (2-4 s)
    failed_at = time.monotonic()
    run_jobs(worker)  # meanwhile the other group's job runs
    assert statuses(stack, "j-other")[-1] == "COMPLETED" and "COMPLETED" not in statuses(stack, "j-retried")
    while "COMPLETED" not in statuses(stack, "j-retried"):
        run_jobs(worker)
        assert time.monotonic() - failed_at < 30
    assert time.monotonic() - failed_at >= 1.5  # it waited its backoff
    assert queue_counts(stack, fifo) == (0, 0)


def counter(worker, name: str) -> dict:
    return {s.labels["queue"]: s.value for m in worker.monitoring.registry.collect() if m.name == name
            for s in m.samples if s.name == f"{name}_total"}


def test_completed_states_the_usage_and_metrics_count_it_per_queue(stack, make_clip):
    standard, basic, _ = two_queues(stack)
    stack.s3.upload_file(str(make_clip(frames=6, fps="10")), BUCKET, "uploads/u/clip.mp4")
    long_key = "uploads/u/long.mp4"
    stack.s3.upload_file(str(make_clip(name="long.mp4", frames=48, fps="24")), BUCKET, long_key)
    send_to(stack, standard, "j-usage", "uploads/u/clip.mp4")
    send_to(stack, basic, "j-usage-segments", long_key)
    worker = make_worker(stack, sqs_queue_urls=[standard, basic], poll_wait_s=0, segment_seconds=0.5)

    started = time.monotonic()
    for _ in range(10):
        run_jobs(worker)
    wall_s = time.monotonic() - started

    whole = stack.receiver.bodies("j-usage")[-1]
    assert whole["status"] == "COMPLETED" and whole["usage"]["billedSeconds"] == whole["metadata"]["duration"]
    assert 0 < whole["usage"]["computeSeconds"] <= wall_s
    cut = stack.receiver.bodies("j-usage-segments")[-1]
    assert cut["status"] == "COMPLETED" and cut["usage"]["billedSeconds"] == cut["metadata"]["duration"] == 2.0
    assert 0 < cut["usage"]["computeSeconds"] <= wall_s  # its 4 segments and the assembly
    billed = counter(worker, "echoshot_billed_source_seconds")
    assert billed == {"upscale-cpu-queue": whole["metadata"]["duration"], "upscale-cpu-basic-queue": 2.0}
    compute = counter(worker, "echoshot_compute_seconds")
    assert compute["upscale-cpu-basic-queue"] == pytest.approx(cut["usage"]["computeSeconds"], abs=0.6)


def test_the_heartbeat_keeps_a_lower_queues_message_out_of_sight(stack, make_clip):
    standard, basic, _ = two_queues(stack)
    stack.s3.upload_file(str(make_clip(frames=10)), BUCKET, "uploads/u/clip.mp4")
    send_to(stack, basic, "j-long-basic", "uploads/u/clip.mp4")
    worker = make_worker(stack, [SlowUpscaler(0.5)], sqs_queue_urls=[standard, basic], poll_wait_s=0,
                         visibility_timeout_s=2, visibility_extend_every_s=0.5)

    stolen = messages_stolen_during_one_job(stack, worker, basic)  # about 5 s: twice the visibility timeout

    assert stolen == [] and statuses(stack, "j-long-basic")[-1] == "COMPLETED"
    assert queue_counts(stack, basic) == (0, 0)


def test_a_job_hands_the_model_on_once_its_frames_are_done(stack, make_clip, tmp_path):
    """overlap_finish (on for GPU workers): the next job's frames run while the first job's encoder
    finishes, on a worker with one slot."""
    slow_finish = tmp_path / "ffmpeg"  # an encoder whose finish (after the last frame) takes 3 s
    slow_finish.write_text(
        f"#!{sys.executable}\n"
        "import subprocess, sys, time\n"
        "code = subprocess.call(['ffmpeg'] + sys.argv[1:])\n"
        "if 'pipe:0' in sys.argv:\n    time.sleep(3)\n"
        "sys.exit(code)\n")
    slow_finish.chmod(0o755)
    stack.s3.upload_file(str(make_clip(frames=2)), BUCKET, "uploads/u/clip.mp4")
    for job in ("j-first", "j-second"):
        send_to(stack, stack.queue_url, job, "uploads/u/clip.mp4")
    worker = make_worker(stack, overlap_finish=True, ffmpeg_bin=str(slow_finish), poll_wait_s=0)

    futures = worker.run_once()  # the first job
    deadline = time.monotonic() + 60
    while len(futures) < 2 and time.monotonic() < deadline:  # its frames done, the slot is free again
        futures += worker.run_once()
        time.sleep(0.1)
    for future in futures:
        future.result(timeout=60)

    received = [(c.body["jobId"], c.body["status"]) for c in stack.receiver.received]
    # the second job started its frames before the first had finished
    assert received.index(("j-second", "PROCESSING")) < received.index(("j-first", "COMPLETED"))
    assert statuses(stack, "j-second")[-1] == "COMPLETED" and queue_counts(stack) == (0, 0)
    assert len(futures) == 2 and worker._slots.qsize() == 1  # the slot came back once, not twice
