"""Spring cancels a job (the marker control/cancel/{jobId} in the bucket): a queued one never runs, a
running one stops within seconds, nothing is uploaded or left behind, and Spring hears CANCELLED once."""

import json
import time

import jsonschema

from conftest import BUCKET, REPO_ROOT
from echoshot_ai_server.cli import main as echoshot
from worker_harness import (
    SlowUpscaler, enqueue, leftovers, make_worker, queue_counts, run_jobs, statuses, upload_clip, wait_until,
)
from test_segments import CountingUpscaler, bucket_keys


def cancel(stack, job_id: str) -> None:
    assert echoshot(["cancel", "--job-id", job_id]) == 0


def record_of(stack, job_id: str) -> dict:
    return json.loads(stack.s3.get_object(Bucket=BUCKET, Key=f"processed/jobs/{job_id}.json")["Body"].read())


def test_a_queued_job_that_is_cancelled_is_never_processed(stack, make_clip, monkeypatch):
    monkeypatch.setenv("S3_BUCKET_NAME", BUCKET)
    key = upload_clip(stack, make_clip, frames=3)
    enqueue(stack, key, "j-queued")
    cancel(stack, "j-queued")
    counting = CountingUpscaler()
    worker = make_worker(stack, [counting])

    run_jobs(worker)

    assert statuses(stack, "j-queued") == ["CANCELLED"] and counting.frames == 0
    assert queue_counts(stack) == (0, 0) and leftovers(stack.work_dir) == []
    assert record_of(stack, "j-queued")["state"] == "cancelled" and record_of(stack, "j-queued")["reported"]
    schema = json.loads((REPO_ROOT / "docs" / "schemas" / "callback.schema.json").read_text())
    jsonschema.validate(stack.receiver.bodies("j-queued")[0], schema)

    enqueue(stack, key, "j-queued")  # sent again: still cancelled, said once
    run_jobs(worker)
    assert statuses(stack, "j-queued") == ["CANCELLED"] and counting.frames == 0 and queue_counts(stack) == (0, 0)


def test_a_running_job_stops_within_seconds_and_leaves_nothing(stack, make_clip, monkeypatch):
    monkeypatch.setenv("S3_BUCKET_NAME", BUCKET)
    key = upload_clip(stack, make_clip, frames=40)
    enqueue(stack, key, "j-running")
    worker = make_worker(stack, [SlowUpscaler(0.3)], cancel_check_s=0.5)
    [future] = worker.run_once()
    wait_until(lambda: any((b.get("progress") or 0) > 0 for b in stack.receiver.bodies("j-running")), 60,
               "the job never started its frames")

    asked = time.monotonic()
    cancel(stack, "j-running")
    wait_until(lambda: "CANCELLED" in statuses(stack, "j-running"), 30, "no CANCELLED")
    stopped_s = time.monotonic() - asked
    future.result(timeout=30)

    assert stopped_s < 5, f"stopped {stopped_s:.1f}s after the request"
    said = statuses(stack, "j-running")
    assert said.count("CANCELLED") == 1 and said[-1] == "CANCELLED" and "COMPLETED" not in said
    assert [k for k in bucket_keys(stack) if k.startswith("processed/upscaled/")] == []
    assert queue_counts(stack) == (0, 0) and leftovers(stack.work_dir) == []


def test_a_job_in_segments_is_cancelled_once_and_its_pieces_removed(stack, make_clip, monkeypatch):
    monkeypatch.setenv("S3_BUCKET_NAME", BUCKET)
    key = upload_clip(stack, make_clip, key="uploads/user123/long.mp4", name="long.mp4", frames=48, fps="24",
                      audio_s=2.0)
    enqueue(stack, key, "j-segments")
    worker = make_worker(stack, [CountingUpscaler()], segment_seconds=0.5)
    run_jobs(worker)  # cut into 4 segments
    run_jobs(worker)  # one segment stored
    assert any("/parts/" in k for k in bucket_keys(stack))

    cancel(stack, "j-segments")
    for _ in range(8):
        run_jobs(worker)

    assert statuses(stack, "j-segments").count("CANCELLED") == 1 and "COMPLETED" not in statuses(stack, "j-segments")
    assert [k for k in bucket_keys(stack) if k.startswith("processed/upscaled/")] == []
    assert queue_counts(stack) == (0, 0) and leftovers(stack.work_dir) == []


def test_cancel_refuses_what_is_not_a_job_id(stack, monkeypatch, capsys):
    monkeypatch.setenv("S3_BUCKET_NAME", BUCKET)
    assert echoshot(["cancel", "--job-id", "../x"]) == 1
    assert "not a job id" in capsys.readouterr().err
