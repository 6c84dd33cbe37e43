"""A worker that cannot work must not eat the queue: a missing bucket or an unusable work directory
stops it at start, and if they go wrong later it stops taking jobs and says so until they are fixed."""

import os
import time
from concurrent.futures import wait

import pytest

from conftest import BUCKET
from echoshot_ai_server.cli import main as echoshot
from echoshot_ai_server.dev.local import create_bucket
from worker_harness import SlowUpscaler, enqueue, make_worker, queue_counts, run_jobs, statuses, upload_clip

REGION = "ap-northeast-2"


@pytest.fixture
def worker_env(stack, monkeypatch, tmp_path):
    for name, value in {"SQS_QUEUE_URL": stack.queue_url, "S3_BUCKET_NAME": BUCKET, "WORK_DIR": str(tmp_path / "work"),
                        "SPRING_CALLBACK_URL": stack.receiver.url, "WORKER_DEVICE": "cpu", "WEIGHTS_DIR": str(tmp_path)}.items():
        monkeypatch.setenv(name, value)
    return monkeypatch


def test_a_misspelt_bucket_stops_the_worker_at_start(worker_env, capsys):
    worker_env.setenv("S3_BUCKET_NAME", "echoshotx-vidoes")
    assert echoshot(["worker"]) == 1
    assert "[STORAGE_MISCONFIGURED] bucket echoshotx-vidoes" in capsys.readouterr().err


def test_an_unusable_work_directory_stops_the_worker_at_start(worker_env, tmp_path, capsys):
    (tmp_path / "a-file").write_text("")
    worker_env.setenv("WORK_DIR", str(tmp_path / "a-file" / "work"))
    assert echoshot(["worker"]) == 1
    assert "[WORK_DIR_UNUSABLE]" in capsys.readouterr().err


def test_a_missing_queue_stops_the_worker_at_start(worker_env, capsys):
    worker_env.setenv("SQS_QUEUE_URL", "http://127.0.0.1:1/123456789012/nope")
    worker_env.setenv("AWS_CONNECT_TIMEOUT_S", "0.5")
    assert echoshot(["worker"]) == 1
    assert "[QUEUE_UNAVAILABLE]" in capsys.readouterr().err


def test_a_gpu_index_the_host_does_not_have_stops_a_gpu_worker_at_start(worker_env, capsys):
    # One worker per GPU: GPU_DEVICE_INDEX names its GPU; a worker asked for the GPU never works on the CPU instead
    worker_env.setenv("CUDA_VISIBLE_DEVICES", "")  # restored after the test: the worker sets it for its process
    worker_env.setenv("WORKER_DEVICE", "gpu")
    worker_env.setenv("GPU_DEVICE_INDEX", "1")
    assert echoshot(["worker"]) == 1
    assert "[INVALID_PARAMETERS] GPU_DEVICE_INDEX=1: this host has no such GPU" in capsys.readouterr().err
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "1"  # the only GPU the process would see, as its first


def wait_ready(worker, timeout_s=10):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        run_jobs(worker)
        if worker.monitoring.is_ready()[0]:
            return
    raise TimeoutError("the worker never became ready again")


def test_a_bucket_that_disappears_pauses_the_worker_until_it_is_back(stack, make_clip):
    # Given a running worker whose bucket is then deleted (or its permissions taken away)
    worker = make_worker(stack)
    worker.recheck_every_s = 0.2
    stack.s3.delete_bucket(Bucket=BUCKET)
    enqueue(stack, "uploads/user123/clip.mp4", "j-nobucket")

    run_jobs(worker)

    # Then the job is not failed but retried, and the worker says why it is not ready
    assert statuses(stack, "j-nobucket") == [] and queue_counts(stack) == (1, 0)
    ready, details = worker.monitoring.is_ready()
    assert not ready and "STORAGE_MISCONFIGURED" in details["problems"]["setup"]

    # And it takes no more messages while the bucket is missing
    for _ in range(3):
        assert worker.run_once() == []
    assert queue_counts(stack) == (1, 0)

    # When the bucket is back, it is ready again and the job completes
    create_bucket(stack.s3, BUCKET, REGION)
    upload_clip(stack, make_clip)
    wait_ready(worker)
    run_jobs(worker)
    assert statuses(stack, "j-nobucket")[-1] == "COMPLETED"


def test_a_work_directory_that_breaks_pauses_the_worker_until_it_is_fixed(stack, make_clip):
    worker = make_worker(stack)
    worker.recheck_every_s = 0.2
    folder = worker.directory.path
    folder.rmdir()
    folder.write_text("")  # something else took the worker's folder's place
    enqueue(stack, upload_clip(stack, make_clip), "j-nodir")

    run_jobs(worker)
    assert statuses(stack, "j-nodir") == ["PROCESSING"] * len(statuses(stack, "j-nodir"))
    assert "WORK_DIR_UNUSABLE" in worker.monitoring.is_ready()[1]["problems"]["setup"]
    assert worker.run_once() == [] and queue_counts(stack) == (1, 0)

    folder.unlink()
    wait_ready(worker)
    run_jobs(worker)
    assert statuses(stack, "j-nodir")[-1] == "COMPLETED"


def test_the_worker_stays_ready_while_every_slot_is_busy(stack, make_clip):
    # Given a worker whose only slot is busy far longer than SQS answers count as fresh
    enqueue(stack, upload_clip(stack, make_clip, frames=10), "j-busy")
    worker = make_worker(stack, [SlowUpscaler(0.4)], visibility_timeout_s=3, visibility_extend_every_s=0.3)
    worker.monitoring.queue_stale_after_s = 1.5
    worker.heartbeat.start()
    try:
        [future] = worker.run_once()
        samples = []
        while not future.done():
            samples.append(worker.monitoring.is_ready()[0])
            time.sleep(0.2)
        wait([future])
    finally:
        worker.heartbeat.stop()

    # Then the heartbeat's calls to SQS keep it ready all along (no new poll happens while busy)
    assert len(samples) > 15 and all(samples)
    assert statuses(stack, "j-busy")[-1] == "COMPLETED"
