"""The worker against real processes on 127.0.0.1: an S3/SQS-compatible server and a Spring stand-in."""

import json
import signal
import subprocess
import sys

import jsonschema
import pytest

from conftest import REPO_ROOT
from echoshot_ai_server.cli import main as echoshot
from echoshot_ai_server.dev.local import create_queue_with_dlq
from echoshot_ai_server.job import job_message_body
from fault_proxy import FaultProxy, s3_get
from worker_harness import (
    SlowUpscaler,
    leftovers,
    messages_stolen_during_one_job,
    wait_until,
    BUCKET, REGION, enqueue, make_worker, queue_counts, run_jobs, send, statuses, upload_clip,
)

def test_happy_path_end_to_end(stack, make_clip, caplog):
    # Given a clip in S3 and a job enqueued the way Spring does it (through `echoshot enqueue`)
    key = upload_clip(stack, make_clip, size=(64, 48), frames=6, audio_s=0.6)
    assert echoshot(["enqueue", "--source", key, "--scale", "2", "--device", "cpu", "--job-id", "job-42",
                     "--user-id", "123", "--queue-url", stack.queue_url]) == 0
    worker = make_worker(stack, spring_callback_token="s3cret")

    # When the worker takes one round
    run_jobs(worker)

    # Then the result is in S3 under the contract's key, as video/mp4 with its metadata
    result_key = "processed/upscaled/job-42/clip_upscaled.mp4"
    head = stack.s3.head_object(Bucket=BUCKET, Key=result_key)
    assert head["ContentType"] == "video/mp4"
    assert head["Metadata"]["width"] == "128" and head["Metadata"]["frame_count"] == "6"
    # And Spring heard PROCESSING first and COMPLETED last, with the metadata, at the job's URL, with the token
    callbacks = [c for c in stack.receiver.received if c.body["jobId"] == "job-42"]
    assert callbacks[0].body["status"] == "PROCESSING" and callbacks[-1].body["status"] == "COMPLETED"
    assert all(c.path == "/api/jobs/job-42/callback" for c in callbacks)
    assert all(c.headers["Authorization"] == "Bearer s3cret" for c in callbacks)
    completed = callbacks[-1].body
    assert completed["outputS3Key"] == result_key
    assert completed["metadata"] == {"width": 128, "height": 96, "fps": 10.0, "frame_count": 6, "duration": pytest.approx(0.6, abs=0.05)}
    assert completed["errorCode"] is None
    callback_schema = json.loads((REPO_ROOT / "docs" / "schemas" / "callback.schema.json").read_text())
    for c in callbacks:
        jsonschema.validate(c.body, callback_schema)
    progress = [c.body for c in callbacks if c.body["status"] == "PROCESSING"]
    assert progress[-1]["progress"] == 100.0 and progress[1]["etaSeconds"] is not None
    # And the message is gone, nothing in flight, nothing in the DLQ, no temporary files left
    assert queue_counts(stack) == (0, 0) and queue_counts(stack, stack.dlq_url) == (0, 0)
    assert leftovers(stack.work_dir) == []
    # And every log line of the job carries its id; the guide's lines are among them
    job_lines = [r for r in caplog.records if getattr(r, "job_id", None) == "job-42"]
    assert any("업스케일 작업 시작" in r.getMessage() for r in job_lines)
    assert any("최종 비디오 생성 완료" in r.getMessage() for r in job_lines)
    assert "s3cret" not in caplog.text


INVALID_BODIES = [
    ("not json at all", None, None),
    ('{"jobId": "j-missing", "taskType": "UPSCALE", "parameters": {"device": "cpu", "scale_factor": 2}}', "j-missing", "INVALID_MESSAGE"),
    (job_message_body("j-task", "uploads/x.mp4", scale=2, device="cpu").replace("UPSCALE", "TRANSCODE"), "j-task", "UNSUPPORTED_TASK"),
    (job_message_body("j-scale", "uploads/x.mp4", scale=3, device="cpu"), "j-scale", "INVALID_PARAMETERS"),
    (job_message_body("j-device", "uploads/x.mp4", scale=2, device="tpu"), "j-device", "INVALID_PARAMETERS"),
    (job_message_body("j-nosource", "uploads/user123/missing.mp4", scale=2, device="cpu"), "j-nosource", "SOURCE_NOT_FOUND"),
]


@pytest.mark.parametrize("body, job_id, code", INVALID_BODIES, ids=[b[2] or "NOT_JSON" for b in INVALID_BODIES])
def test_permanent_failures_are_reported_once_and_never_retried(stack, body, job_id, code):
    send(stack, body)
    worker = make_worker(stack)

    run_jobs(worker, rounds=2)

    if job_id is None:
        assert stack.receiver.received == []
    else:
        [failed] = stack.receiver.bodies(job_id)
        assert failed["status"] == "FAILED" and failed["errorCode"] == code and failed["errorMessage"]
    assert queue_counts(stack) == (0, 0) and queue_counts(stack, stack.dlq_url) == (0, 0)


def test_a_file_that_is_not_a_video_fails_permanently(stack, tmp_path):
    path = tmp_path / "fake.mp4"
    path.write_bytes(b"\x00\x01 not a video")
    stack.s3.upload_file(str(path), BUCKET, "uploads/user123/fake.mp4")
    enqueue(stack, "uploads/user123/fake.mp4", "j-fake")

    run_jobs(make_worker(stack), rounds=2)

    failed = stack.receiver.wait_for("j-fake", timeout_s=1)
    assert failed["status"] == "FAILED" and failed["errorCode"] == "INVALID_VIDEO"
    assert queue_counts(stack) == (0, 0)
    assert leftovers(stack.work_dir) == []


def test_the_worker_keeps_going_after_a_failure(stack, make_clip):
    send(stack, "garbage")
    enqueue(stack, upload_clip(stack, make_clip), "j-after")
    worker = make_worker(stack)

    run_jobs(worker, rounds=3)

    assert stack.receiver.wait_for("j-after", timeout_s=1)["status"] == "COMPLETED"


def test_callback_that_fails_several_times_before_answering(stack, make_clip):
    enqueue(stack, upload_clip(stack, make_clip), "j-flaky")
    worker = make_worker(stack, progress_callback_interval_s=3600)
    stack.receiver.fail_next(2, 200)  # PROCESSING at 0 % and at 100 % go through
    stack.receiver.fail_next(2, 503)  # then COMPLETED meets two errors and a dropped connection
    stack.receiver.fail_next(1, 0)

    run_jobs(worker)

    assert statuses(stack, "j-flaky") == ["PROCESSING", "PROCESSING", "COMPLETED"]
    assert queue_counts(stack) == (0, 0)


def test_progress_callbacks_are_best_effort(stack, make_clip):
    enqueue(stack, upload_clip(stack, make_clip), "j-progress")
    stack.receiver.fail_next(1, 503)  # the first PROCESSING is lost, and not retried

    run_jobs(make_worker(stack, progress_callback_interval_s=3600))

    assert statuses(stack, "j-progress") == ["PROCESSING", "COMPLETED"]
    assert stack.receiver.bodies("j-progress")[0]["progress"] == 100.0


def test_callback_down_for_longer_keeps_the_result_and_completes_on_redelivery(stack, make_clip, caplog):
    enqueue(stack, upload_clip(stack, make_clip), "j-down")
    worker = make_worker(stack, callback_max_attempts=3)
    stack.receiver.down = 503

    run_jobs(worker)

    # The job's work is safe in S3 and its message is back in the queue
    stack.s3.head_object(Bucket=BUCKET, Key="processed/upscaled/j-down/clip_upscaled.mp4")
    assert statuses(stack, "j-down") == [] and queue_counts(stack) == (1, 0)

    # When Spring is back, the redelivered message is not recomputed: COMPLETED is repeated
    stack.receiver.down = None
    caplog.clear()
    run_jobs(worker)

    completed = stack.receiver.wait_for("j-down", timeout_s=1)
    assert completed["status"] == "COMPLETED" and completed["metadata"]["width"] == 128
    assert statuses(stack, "j-down") == ["COMPLETED"]  # no PROCESSING: nothing was recomputed
    assert "not recomputed" in caplog.text and "업스케일 작업 시작" not in caplog.text
    assert queue_counts(stack) == (0, 0)


def test_a_job_sent_again_after_it_completed_is_neither_recomputed_nor_reported_twice(stack, make_clip, caplog):
    key = upload_clip(stack, make_clip)
    enqueue(stack, key, "j-twice")
    worker = make_worker(stack)
    run_jobs(worker)
    assert statuses(stack, "j-twice")[-1] == "COMPLETED"

    enqueue(stack, key, "j-twice")  # Spring (or SQS) delivers the same job again
    run_jobs(worker)

    assert statuses(stack, "j-twice").count("COMPLETED") == 1
    assert "this one is dropped" in caplog.text
    assert queue_counts(stack) == (0, 0)


def test_s3_errors_are_retried_with_backoff(stack, make_clip):
    key = upload_clip(stack, make_clip)
    enqueue(stack, key, "j-s3")
    with FaultProxy(stack.moto.endpoint_url) as proxy:
        worker = make_worker(stack, aws_endpoint_url=proxy.url)
        proxy.fail(s3_get("clip.mp4"), times=8)  # more than boto3's own retries absorb

        run_jobs(worker)
        assert queue_counts(stack) == (1, 0)  # released for a retry, not lost
        assert statuses(stack, "j-s3") == []  # the first PROCESSING comes with the estimate, after the download

        run_jobs(worker)
    assert statuses(stack, "j-s3")[-1] == "COMPLETED"
    assert queue_counts(stack) == (0, 0) and proxy.failed == 8


def test_transient_failure_on_the_last_attempt_reports_failed_and_goes_to_the_dlq(stack, make_clip):
    enqueue(stack, upload_clip(stack, make_clip), "j-dlq")
    with FaultProxy(stack.moto.endpoint_url) as proxy:
        worker = make_worker(stack, aws_endpoint_url=proxy.url)
        proxy.fail(s3_get("clip.mp4"))  # S3 never recovers

        run_jobs(worker, rounds=3)  # the queue's maxReceiveCount is 3
        failed = stack.receiver.wait_for("j-dlq", timeout_s=1)
        assert failed["errorCode"] == "STORAGE_UNAVAILABLE"
        assert statuses(stack, "j-dlq").count("FAILED") == 1

        run_jobs(worker)  # the next receive hands the message to the dead-letter queue
    assert queue_counts(stack) == (0, 0)
    [dead] = stack.sqs.receive_message(QueueUrl=stack.dlq_url, WaitTimeSeconds=1)["Messages"]
    assert json.loads(dead["Body"])["jobId"] == "j-dlq"


def test_visibility_is_extended_while_a_long_job_runs(stack, make_clip):
    enqueue(stack, upload_clip(stack, make_clip, frames=10), "j-long")
    worker = make_worker(stack, [SlowUpscaler(0.5)], visibility_timeout_s=2, visibility_extend_every_s=0.5)
    stolen = messages_stolen_during_one_job(stack, worker)  # the job takes about 5 s, twice the visibility timeout

    assert stolen == [], "a second worker received the message of a running job"
    assert statuses(stack, "j-long")[-1] == "COMPLETED"
    assert queue_counts(stack) == (0, 0)


def test_enqueue_on_a_fifo_queue(stack):
    fifo_url, _ = create_queue_with_dlq(stack.sqs, "upscale-gpu-queue.fifo", max_receive_count=3)
    assert echoshot(["enqueue", "--source", "uploads/u/v.mp4", "--scale", "4", "--device", "gpu",
                     "--queue-url", fifo_url, "--job-id", "j-fifo", "--user-id", "7"]) == 0
    [message] = stack.sqs.receive_message(QueueUrl=fifo_url, AttributeNames=["All"])["Messages"]
    assert json.loads(message["Body"]) == {
        "jobId": "j-fifo", "userId": "7", "taskType": "UPSCALE", "sourceS3Key": "uploads/u/v.mp4",
        "parameters": {"device": "gpu", "scale_factor": 4},
    }
    assert message["Attributes"]["MessageGroupId"] == "j-fifo"  # one group per job: no job waits on another


def test_worker_refuses_to_start_without_its_settings(stack, capsys, monkeypatch):
    monkeypatch.delenv("SQS_QUEUE_URL", raising=False)
    monkeypatch.delenv("SPRING_CALLBACK_URL", raising=False)
    assert echoshot(["worker"]) == 1
    assert "SQS_QUEUE_URL" in capsys.readouterr().err


@pytest.mark.parametrize("grace_s, outcome", [(0, "released"), (120, "completed")])
def test_sigterm_during_a_job(stack, make_clip, shared_weights_dir, tmp_path, grace_s, outcome):
    # Given the worker daemon started as systemd does (python echoshot_ai_server/main.py), busy with a job
    enqueue(stack, upload_clip(stack, make_clip, size=(48, 32), frames=30), "j-term")
    env = {
        **stack.moto.env(REGION), "PATH": "/usr/bin:/bin", "SQS_QUEUE_URL": stack.queue_url,
        "S3_BUCKET_NAME": BUCKET, "SPRING_CALLBACK_URL": stack.receiver.url, "WEIGHTS_DIR": str(shared_weights_dir),
        "WORK_DIR": str(stack.work_dir), "WORKER_DEVICE": "cpu", "CPU_WORKER_COUNT": "1", "POLL_WAIT_S": "1", "METRICS_PORT": "0",
        "PROGRESS_CALLBACK_INTERVAL_S": "0", "SHUTDOWN_GRACE_S": str(grace_s), "VISIBILITY_TIMEOUT_S": "60",
    }
    worker = subprocess.Popen([sys.executable, "echoshot_ai_server/main.py"], cwd=REPO_ROOT, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_until(lambda: any((b.get("progress") or 0) > 0 for b in stack.receiver.bodies("j-term")), 120,
                   "the job never started")

        # When systemd stops the service
        worker.send_signal(signal.SIGTERM)
        logs, _ = worker.communicate(timeout=180)
    finally:
        if worker.poll() is None:
            worker.kill()

    # Then the worker exits 0, leaves no temporary files, and the job is either finished or back in the queue
    assert worker.returncode == 0, logs
    assert leftovers(stack.work_dir) == []
    if outcome == "released":
        assert statuses(stack, "j-term")[-1] == "PROCESSING"
        [message] = stack.sqs.receive_message(QueueUrl=stack.queue_url, WaitTimeSeconds=1)["Messages"]
        assert json.loads(message["Body"])["jobId"] == "j-term"
        assert "visible again" in logs
    else:
        assert statuses(stack, "j-term")[-1] == "COMPLETED"
        assert queue_counts(stack) == (0, 0)
    assert "[job=j-term]" in logs and "worker stopped" in logs


@pytest.mark.parametrize("body", [
    "[" * 100_000 + "]" * 100_000,  # 200 KB, 100,000 levels: too deep for any JSON parser's stack
    '{"jobId": "j-deep", "parameters": ' + "[" * 100_000 + "]" * 100_000 + "}",
], ids=["nested-array", "nested-inside-a-job"])
def test_a_poison_message_ends_in_one_outcome(stack, body):
    send(stack, body)
    run_jobs(make_worker(stack))
    assert queue_counts(stack) == (0, 0)  # settled at once, not left to come back forever
    assert stack.receiver.received == []  # no readable jobId: nobody to report to


def test_a_gpu_job_on_a_cpu_worker_says_so(stack, make_clip, caplog):
    enqueue(stack, upload_clip(stack, make_clip), "j-gpu-on-cpu", device="gpu")
    run_jobs(make_worker(stack))
    assert "GPU가 요청되었지만 사용 불가능합니다. CPU로 대체합니다." in caplog.text
    assert "업스케일러 초기화 완료 - Device: CPU" in caplog.text
    assert statuses(stack, "j-gpu-on-cpu")[-1] == "COMPLETED"
