"""Faults: nothing lost, nothing done twice. The worker against a local S3/SQS server, with faults injected."""

import os
import signal
import subprocess
import sys
import threading

from conftest import BUCKET, REGION, REPO_ROOT
from fault_proxy import FaultProxy, s3_get, sqs_call
from worker_harness import (
    SlowUpscaler, enqueue, leftovers, make_worker, queue_counts, run_jobs, statuses, upload_clip, wait_until,
)


def uploads_of(stack, job_id: str) -> int:
    return sum(1 for c in stack.receiver.received if c.body["jobId"] == job_id and c.body["status"] == "COMPLETED")

def test_ffmpeg_dying_mid_encode_is_retried_and_completes_once(stack, make_clip, tmp_path):
    marker = tmp_path / "killed-once"
    wrapper = tmp_path / "ffmpeg"
    wrapper.write_text(f"""#!/bin/sh
# The encoder (the ffmpeg reading frames on stdin) is killed the first time it runs.
case "$*" in *pipe:0*)
  if [ ! -e "{marker}" ]; then touch "{marker}"; ffmpeg "$@" & pid=$!; sleep 0.5; kill -9 $pid; wait $pid; exit 137; fi;;
esac
exec ffmpeg "$@"
""")
    wrapper.chmod(0o755)
    enqueue(stack, upload_clip(stack, make_clip, frames=12), "j-ffmpeg")
    worker = make_worker(stack, [SlowUpscaler(0.15)], ffmpeg_bin=str(wrapper))

    run_jobs(worker)
    assert marker.exists() and statuses(stack, "j-ffmpeg")[-1] == "PROCESSING"  # failed, released, not reported
    assert queue_counts(stack) == (1, 0) and leftovers(stack.work_dir) == []

    run_jobs(worker)
    assert statuses(stack, "j-ffmpeg")[-1] == "COMPLETED" and uploads_of(stack, "j-ffmpeg") == 1
    assert queue_counts(stack) == (0, 0)

def test_slow_s3_and_timeouts(stack, make_clip):
    enqueue(stack, upload_clip(stack, make_clip), "j-slow")
    with FaultProxy(stack.moto.endpoint_url) as proxy:
        proxy.slow(s3_get("clip.mp4"), seconds=0.5, times=2)  # slow, but within the timeout
        proxy.slow(s3_get("clip.mp4"), seconds=3, times=6)  # longer than the read timeout, six times
        worker = make_worker(stack, aws_endpoint_url=proxy.url, aws_read_timeout_s=1)
        run_jobs(worker, rounds=3)
    assert statuses(stack, "j-slow")[-1] == "COMPLETED"
    assert queue_counts(stack) == (0, 0)

def test_sqs_errors_while_polling_and_settling(stack, make_clip):
    enqueue(stack, upload_clip(stack, make_clip), "j-sqs")
    with FaultProxy(stack.moto.endpoint_url) as proxy:
        proxy.fail(sqs_call("ReceiveMessage"), times=6)  # polling fails for a while
        proxy.fail(sqs_call("DeleteMessage"), times=8)  # and the first delete after the job fails
        worker = make_worker(stack, aws_endpoint_url=proxy.url)
        runner = threading.Thread(target=worker.run)
        runner.start()
        try:
            wait_until(lambda: queue_counts(stack) == (0, 0) and "COMPLETED" in statuses(stack, "j-sqs"), 60,
                       "job never settled")
        finally:
            worker.request_stop()
            runner.join(timeout=60)
    assert not runner.is_alive()
    # The delete that failed left the message; its redelivery found the result and repeated COMPLETED
    assert statuses(stack, "j-sqs").count("PROCESSING") >= 1
    assert leftovers(stack.work_dir) == []

def test_a_worker_killed_mid_job_is_replaced_and_the_job_completes_once(stack, make_clip, shared_weights_dir):
    enqueue(stack, upload_clip(stack, make_clip, size=(48, 32), frames=30), "j-killed")
    env = {
        **stack.moto.env(REGION), "PATH": os.environ["PATH"], "SQS_QUEUE_URL": stack.queue_url,
        "S3_BUCKET_NAME": BUCKET, "SPRING_CALLBACK_URL": stack.receiver.url, "WEIGHTS_DIR": str(shared_weights_dir),
        "WORK_DIR": str(stack.work_dir), "WORKER_DEVICE": "cpu", "CPU_WORKER_COUNT": "1", "POLL_WAIT_S": "1", "METRICS_PORT": "0",
        "PROGRESS_CALLBACK_INTERVAL_S": "0", "VISIBILITY_TIMEOUT_S": "4", "VISIBILITY_EXTEND_EVERY_S": "1",
        "SHUTDOWN_GRACE_S": "120",
    }

    def start():
        return subprocess.Popen([sys.executable, "echoshot_ai_server/main.py"], cwd=REPO_ROOT, env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    first = start()
    try:
        wait_until(lambda: any((b.get("progress") or 0) > 0 for b in stack.receiver.bodies("j-killed")), 120,
                   "the job never started")
        first.send_signal(signal.SIGKILL)  # no cleanup, no release: the heartbeat simply stops
        first.wait(timeout=30)
        assert leftovers(stack.work_dir) != []  # the dead worker's files are still there

        second = start()
        try:
            wait_until(lambda: "COMPLETED" in statuses(stack, "j-killed"), 240, "the job was never completed")
            wait_until(lambda: queue_counts(stack) == (0, 0), 30, "message not deleted")
        finally:
            second.send_signal(signal.SIGTERM)
            assert second.wait(timeout=120) == 0
    finally:
        if first.poll() is None:
            first.kill()
    assert uploads_of(stack, "j-killed") == 1
    assert leftovers(stack.work_dir) == [] and list(stack.work_dir.iterdir()) == []  # the stale files were swept
