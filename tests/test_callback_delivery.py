"""The Spring callback when Spring misbehaves: redirects, refused credentials, trickling answers,
slow progress endpoints, and job ids that try to change the URL. Real HTTP servers on 127.0.0.1."""

import json
import threading
import time
from concurrent.futures import wait

import pytest

from conftest import BUCKET
from echoshot_ai_server.adapters.spring import SpringCallback
from echoshot_ai_server.errors import ErrorCode, JobCancelled, RetryableError
from echoshot_ai_server.job import CallbackPayload, JobStatus
from http_stands import Stand, ok, redirect_to, reply, status, trickle
from worker_harness import (
    SlowUpscaler, enqueue, make_worker, queue_counts, run_jobs, send, statuses, upload_clip, wait_until,
)

COMPLETED = CallbackPayload(job_id="j-1", status=JobStatus.COMPLETED, output_s3_key="processed/x.mp4")


@pytest.mark.parametrize("code", [301, 302, 303, 307, 308])
def test_a_redirect_is_a_failed_delivery_and_is_never_followed(code):
    with Stand(ok) as elsewhere, Stand(redirect_to(f"{elsewhere.base}/login", code)) as spring:
        with pytest.raises(RetryableError) as err:
            SpringCallback(spring.url, token="t", secret="s").notify(COMPLETED, attempts=3)
    assert err.value.code == ErrorCode.CALLBACK_MISCONFIGURED and "redirect" in err.value.message
    assert len(spring.posts()) == 1  # not retried: a redirect does not go away in a few seconds
    assert elsewhere.requests == []  # neither the GET of a 302 nor the signed body of a 307


@pytest.mark.parametrize("code", [401, 403])
def test_refused_credentials_are_a_configuration_problem_not_a_rejection(code):
    with Stand(status(code)) as spring:
        with pytest.raises(RetryableError) as err:
            SpringCallback(spring.url).notify(COMPLETED)
    assert err.value.code == ErrorCode.CALLBACK_MISCONFIGURED and err.value.is_environment
    assert "SPRING_CALLBACK_TOKEN" in err.value.message


def test_a_trickling_answer_cannot_hold_a_callback_past_its_deadline():
    with Stand(trickle(every_s=0.2)) as spring:
        started = time.monotonic()
        with pytest.raises(RetryableError) as err:
            SpringCallback(spring.url, timeout_s=1).notify(COMPLETED, attempts=1)
        elapsed = time.monotonic() - started
    assert "no complete answer within 1s" in err.value.message
    assert elapsed < 10  # the server would go on for two minutes; every single read is quick


def test_a_stop_ends_a_callback_in_flight():
    stop = threading.Event()
    with Stand(trickle(every_s=0.2)) as spring:
        threading.Timer(0.5, stop.set).start()
        started = time.monotonic()
        with pytest.raises(JobCancelled):
            SpringCallback(spring.url, timeout_s=60).notify(COMPLETED, stop=stop)
    assert time.monotonic() - started < 10


@pytest.mark.parametrize("job_id", [".", "..", "a/../b", "x\ny"])
def test_no_job_id_can_change_the_callback_path(job_id):
    with pytest.raises(ValueError):
        SpringCallback("http://127.0.0.1:1/api/jobs/{job_id}/callback").url_for(job_id)


def test_ids_are_one_path_segment():
    callback = SpringCallback("http://spring/api/jobs/{job_id}/callback")
    assert callback.url_for("a:b%2e") == "http://spring/api/jobs/a%3Ab%252e/callback"


def test_messages_whose_job_id_is_a_dot_segment_are_dropped_unreported(stack):
    for job_id in (".", ".."):
        send(stack, json.dumps({"jobId": job_id, "taskType": "UPSCALE", "sourceS3Key": "uploads/x.mp4",
                                "parameters": {"device": "cpu", "scale_factor": 2}}))
    run_jobs(make_worker(stack), rounds=2)
    assert stack.receiver.received == []  # at no path at all
    assert queue_counts(stack) == (0, 0)


def test_a_redirect_on_completed_keeps_the_job_until_spring_answers(stack, make_clip):
    # Given Spring redirecting its callbacks (a login page after a token expired)
    with Stand(ok) as login, Stand(redirect_to(f"{login.base}/login")) as spring:
        enqueue(stack, upload_clip(stack, make_clip), "j-redirect")
        worker = make_worker(stack, spring_callback_url=spring.url)

        run_jobs(worker)

        # Then the job is not taken as reported: its message waits, the worker says what is wrong
        assert queue_counts(stack) == (1, 0) and login.requests == []
        assert "callback" in worker.monitoring.problems
        assert worker.monitoring.is_ready()[0] is False

    # When Spring is fixed, the next delivery reports COMPLETED without computing again
    worker.callback.url_template = stack.receiver.url
    run_jobs(worker)
    assert statuses(stack, "j-redirect") == ["COMPLETED"]
    assert queue_counts(stack) == (0, 0) and worker.monitoring.problems == {}


def test_refused_credentials_on_completed_never_turn_into_failed(stack, make_clip):
    # Given a job whose result is uploaded while Spring refuses the worker's token (401) on every attempt
    enqueue(stack, upload_clip(stack, make_clip), "j-401")
    worker = make_worker(stack)
    stack.receiver.down = 401
    run_jobs(worker, rounds=4)  # the queue's maxReceiveCount is 3; the 4th receive dead-letters it

    # Then FAILED is never sent for a job whose result exists, the result stays, the message is dead-lettered
    stack.s3.head_object(Bucket=BUCKET, Key="processed/upscaled/j-401/clip_upscaled.mp4")
    assert stack.receiver.received == []
    assert queue_counts(stack) == (0, 0) and queue_counts(stack, stack.dlq_url)[0] == 1

    # And once the token is fixed, a replay reports COMPLETED (without computing again)
    stack.receiver.down = None
    [dead] = stack.sqs.receive_message(QueueUrl=stack.dlq_url, WaitTimeSeconds=1)["Messages"]
    send(stack, dead["Body"])
    run_jobs(worker)
    assert statuses(stack, "j-401") == ["COMPLETED"]


def test_progress_callbacks_never_hold_up_the_frames(stack, make_clip):
    # Given a Spring that sits on PROCESSING callbacks until told to answer
    gate = threading.Event()

    def answer(handler, body):
        if b'"PROCESSING"' in body:
            gate.wait(60)
        reply(handler, 200)

    with Stand(answer) as spring:
        enqueue(stack, upload_clip(stack, make_clip, frames=6), "j-slow-spring")
        upscaler = SlowUpscaler(0)
        batches = []
        original = upscaler.upscale
        upscaler.upscale = lambda frames, scale: batches.append(len(frames)) or original(frames, scale)
        worker = make_worker(stack, [upscaler], spring_callback_url=spring.url, callback_timeout_s=60)
        [future] = worker.run_once()
        try:
            # Then every frame is upscaled while the first PROCESSING callback is still unanswered
            wait_until(lambda: sum(batches) == 6, 30, "the frames waited for the progress callback")
            assert len(spring.posts()) == 1 and not gate.is_set()
        finally:
            gate.set()
        wait([future])
        sent = [json.loads(body)["status"] for _, _, body in spring.posts()]
    assert sent[0] == "PROCESSING" and sent[-1] == "COMPLETED"
    assert queue_counts(stack) == (0, 0)


def test_sigterm_is_honoured_while_spring_trickles(stack, make_clip):
    # Given a job whose callbacks trickle in a byte at a time, with a callback deadline of a minute
    with Stand(trickle(every_s=0.2)) as spring:
        enqueue(stack, upload_clip(stack, make_clip), "j-trickle")
        worker = make_worker(stack, spring_callback_url=spring.url, callback_timeout_s=60, shutdown_grace_s=1)
        runner = threading.Thread(target=worker.run)
        runner.start()
        wait_until(lambda: len(spring.posts()) >= 2, 60, "the job never reached its COMPLETED callback")

        # When the worker is asked to stop
        started = time.monotonic()
        worker.request_stop()
        runner.join(timeout=60)

    # Then it stops within the grace period and a little more, and the job's message is back in the queue
    assert not runner.is_alive() and time.monotonic() - started < 20
    assert queue_counts(stack) == (1, 0)
