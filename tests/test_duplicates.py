"""One job id, several messages: computed once, uploaded once, COMPLETED once; a job id reused for
other work is done again. Against the local S3/SQS server, whose conditional writes decide."""

import json
from concurrent.futures import wait

from conftest import BUCKET, tiny_upscaler
from echoshot_ai_server.cli import main as echoshot
from echoshot_ai_server.dev.local import create_queue_with_dlq
from echoshot_ai_server.job import job_message_body
from worker_harness import SlowUpscaler, enqueue, make_worker, queue_counts, run_jobs, statuses, upload_clip

RESULT = "processed/upscaled/{}/clip_upscaled.mp4"


def uploads(caplog) -> int:
    return caplog.text.count("result uploaded:")


def test_two_messages_of_one_job_at_once_are_computed_and_reported_once(stack, make_clip, caplog):
    # Given the same job twice in the queue (Spring sent it twice) and a worker with two slots
    key = upload_clip(stack, make_clip)
    enqueue(stack, key, "j-dup")
    enqueue(stack, key, "j-dup")
    worker = make_worker(stack, [SlowUpscaler(0.2), SlowUpscaler(0.2)], cpu_worker_count=2)

    # When both are received together
    futures = worker.run_once()
    while len(futures) < 2:
        futures += worker.run_once()
    wait(futures)

    # Then the job is computed once, uploaded once, reported COMPLETED once, and both messages are gone
    assert statuses(stack, "j-dup").count("COMPLETED") == 1
    assert uploads(caplog) == 1
    assert "this one is dropped" in caplog.text
    assert queue_counts(stack) == (0, 0)


def test_a_job_id_reused_with_another_scale_is_done_again(stack, make_clip):
    key = upload_clip(stack, make_clip, size=(64, 48))
    enqueue(stack, key, "j-reuse", scale=2)
    worker = make_worker(stack)
    run_jobs(worker)

    enqueue(stack, key, "j-reuse", scale=4)
    run_jobs(worker)

    completed = [b for b in stack.receiver.bodies("j-reuse") if b["status"] == "COMPLETED"]
    assert [c["metadata"]["width"] for c in completed] == [128, 256]
    head = stack.s3.head_object(Bucket=BUCKET, Key=RESULT.format("j-reuse"))
    assert head["Metadata"]["width"] == "256"


def test_other_work_under_a_job_id_in_progress_waits_for_it(stack, make_clip, caplog):
    key = upload_clip(stack, make_clip)
    enqueue(stack, key, "j-busy", scale=2)
    enqueue(stack, key, "j-busy", scale=4)
    worker = make_worker(stack, [SlowUpscaler(0.2), tiny_upscaler()], cpu_worker_count=2, retry_base_delay_s=0)

    futures = worker.run_once()
    while len(futures) < 2:
        futures += worker.run_once()
    wait(futures)
    assert "[JOB_ID_IN_USE]" in caplog.text and queue_counts(stack) == (1, 0)  # the second is retried, not dropped

    run_jobs(worker)
    widths = [b["metadata"]["width"] for b in stack.receiver.bodies("j-busy") if b["status"] == "COMPLETED"]
    assert sorted(widths) == [128, 256]


def test_whatever_sits_at_the_result_key_is_not_taken_for_a_result(stack, make_clip):
    # Given an object at the result's key with metadata that is not ours, and a record that is not JSON
    stack.s3.put_object(Bucket=BUCKET, Key=RESULT.format("j-junk"), Body=b"junk", Metadata={"width": "abc"})
    stack.s3.put_object(Bucket=BUCKET, Key="processed/jobs/j-junk.json", Body=b"{not json")
    enqueue(stack, upload_clip(stack, make_clip), "j-junk")

    run_jobs(make_worker(stack))

    completed = stack.receiver.wait_for("j-junk", timeout_s=1)
    assert completed["status"] == "COMPLETED" and completed["metadata"]["width"] == 128
    assert stack.s3.head_object(Bucket=BUCKET, Key=RESULT.format("j-junk"))["ContentLength"] > 100


def test_a_job_replayed_soon_after_it_gave_up_is_done(stack, make_clip):
    # Given a job that gave up (its source missing on every attempt) and a quick fix by the operator
    enqueue(stack, "uploads/user123/late.mp4", "j-late")
    run_jobs(make_worker(stack))
    assert statuses(stack, "j-late") == ["FAILED"]

    upload_clip(stack, make_clip, key="uploads/user123/late.mp4")
    enqueue(stack, "uploads/user123/late.mp4", "j-late")
    run_jobs(make_worker(stack))
    assert statuses(stack, "j-late")[-1] == "COMPLETED"


def test_two_copies_of_a_job_in_a_fifo_dead_letter_queue_are_both_replayed(stack, capsys):
    fifo_url, fifo_dlq = create_queue_with_dlq(stack.sqs, "upscale-gpu-queue.fifo", max_receive_count=3)
    body = job_message_body("j-copies", "uploads/a.mp4", scale=2, device="gpu")
    for copy in ("1", "2"):
        stack.sqs.send_message(QueueUrl=fifo_dlq, MessageBody=body, MessageGroupId="g", MessageDeduplicationId=copy)

    assert echoshot(["replay-dlq", "--queue-url", fifo_url]) == 0

    assert json.loads(capsys.readouterr().out)["replayed"] == ["j-copies", "j-copies"]
    assert queue_counts(stack, fifo_url)[0] == 2 and queue_counts(stack, fifo_dlq) == (0, 0)
