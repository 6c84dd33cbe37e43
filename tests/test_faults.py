"""Faults: nothing lost, nothing done twice. The worker against a local S3/SQS server, with faults injected."""

import os
import signal
import subprocess
import sys
import threading
import time

from conftest import BUCKET, REGION, REPO_ROOT, make_noise_clip
from fault_proxy import FaultProxy, s3_get, sqs_call
from worker_harness import (
    SlowUpscaler, enqueue, leftovers, make_worker, messages_stolen_during_one_job, queue_counts, run_jobs, statuses,
    upload_clip, wait_until,
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


def test_the_heartbeat_survives_an_unexpected_error(stack, make_clip):
    # Given a heartbeat whose first extension fails with something no one planned for
    enqueue(stack, upload_clip(stack, make_clip, frames=10), "j-beat")
    worker = make_worker(stack, [SlowUpscaler(0.4)], visibility_timeout_s=2, visibility_extend_every_s=0.4)
    extend = worker.queue.extend_visibility
    calls = []

    def flaky(message, timeout_s):
        calls.append(1)
        if len(calls) == 1:
            raise ValueError("something unexpected")
        return extend(message, timeout_s)

    worker.queue.extend_visibility = flaky
    stolen = messages_stolen_during_one_job(stack, worker)
    # Then it keeps beating: no second worker ever gets the running job's message
    assert stolen == [] and len(calls) > 3
    assert statuses(stack, "j-beat")[-1] == "COMPLETED"


class _Queue:
    """A queue whose visibility extension of one message hangs until released."""

    def __init__(self):
        self.release_a = threading.Event()

    def extend_visibility(self, message, timeout_s):
        if message.message_id == "a":
            self.release_a.wait(30)


def test_a_slow_extension_of_one_message_does_not_hold_up_another_jobs_end():
    from echoshot_ai_server.adapters.sqs import QueueMessage
    from echoshot_ai_server.app.heartbeat import VisibilityHeartbeat

    queue = _Queue()
    heartbeat = VisibilityHeartbeat(queue, timeout_s=30, every_s=0.05)
    a, b = (QueueMessage(name, "r", "{}", 1, None) for name in ("a", "b"))
    heartbeat.track(a)
    heartbeat.track(b)
    heartbeat.start()
    try:
        time.sleep(0.3)  # the beat is now stuck extending a
        started = time.monotonic()
        heartbeat.untrack(b)
        assert time.monotonic() - started < 1
    finally:
        queue.release_a.set()
        heartbeat.stop()


def test_the_message_is_kept_invisible_before_scale_in_protection_is_asked_for(stack, make_clip):
    from test_operations import autoscaling_group

    asg = autoscaling_group(stack, size=1)
    instance = asg.describe_auto_scaling_groups(AutoScalingGroupNames=["workers"])["AutoScalingGroups"][0]["Instances"][0]
    enqueue(stack, upload_clip(stack, make_clip), "j-protect")
    worker = make_worker(stack, protect_instance_while_busy=True, autoscaling_group_name="workers",
                         ec2_instance_id=instance["InstanceId"], visibility_timeout_s=2, visibility_extend_every_s=0.3)
    protect = worker.protection.autoscaling.protect
    worker.protection.autoscaling.protect = lambda *args: time.sleep(3) or protect(*args)  # a slow Auto Scaling API
    stolen = messages_stolen_during_one_job(stack, worker)
    assert stolen == []
    assert statuses(stack, "j-protect")[-1] == "COMPLETED"


def test_a_stop_is_seen_while_probing(stack, make_clip, tmp_path):
    marker = tmp_path / "probing"
    wrapper = tmp_path / "ffprobe"
    wrapper.write_text(f"#!/bin/sh\ntouch {marker}\nsleep 60\nexec ffprobe \"$@\"\n")
    wrapper.chmod(0o755)
    enqueue(stack, upload_clip(stack, make_clip), "j-probe")
    worker = make_worker(stack, ffprobe_bin=str(wrapper))
    [future] = worker.run_once()
    wait_until(marker.exists, 30, "probe never started")

    started = time.monotonic()
    worker.cancel.set()
    future.result(timeout=30)

    assert time.monotonic() - started < 10  # not the minute the probe would take
    assert queue_counts(stack) == (1, 0) and leftovers(stack.work_dir) == []


def test_a_stop_is_seen_while_downloading(stack, tmp_path):
    clip = make_noise_clip(tmp_path / "big.mp4", size="160x120", seconds=3, lossless=True)
    size = clip.stat().st_size
    stack.s3.upload_file(str(clip), BUCKET, "uploads/user123/big.mp4")
    enqueue(stack, "uploads/user123/big.mp4", "j-download")
    with FaultProxy(stack.moto.endpoint_url) as proxy:
        proxy.trickle(s3_get("big.mp4"), seconds_per_kb=0.01)  # 100 KB/s
        worker = make_worker(stack, aws_endpoint_url=proxy.url)
        [future] = worker.run_once()
        wait_until(lambda: proxy.bytes_sent("big.mp4") > 20_000, 30, "the download never started")

        worker.cancel.set()
        future.result(timeout=30)
        sent = proxy.bytes_sent("big.mp4")
    assert size > 500_000 and sent < size / 2  # it stopped long before the end
    assert queue_counts(stack) == (1, 0) and leftovers(stack.work_dir) == []


def test_a_job_stuck_in_a_call_that_ignores_the_stop_does_not_keep_the_worker_from_exiting(stack, make_clip):
    # Given a job whose upload hangs on S3 far longer than the grace period
    enqueue(stack, upload_clip(stack, make_clip), "j-stuck")
    with FaultProxy(stack.moto.endpoint_url) as proxy:
        proxy.slow(lambda method, path, headers: method == "PUT" and "processed/upscaled" in path, seconds=60)
        worker = make_worker(stack, aws_endpoint_url=proxy.url, aws_read_timeout_s=120, shutdown_grace_s=0.5)
        worker.stop_wait_s = 1
        runner = threading.Thread(target=worker.run)
        runner.start()
        wait_until(lambda: statuses(stack, "j-stuck").count("PROCESSING") >= 2, 60, "the job never reached its upload")
        time.sleep(0.5)

        # When the worker is asked to stop
        started = time.monotonic()
        worker.request_stop()
        runner.join(timeout=60)
        stopped_s = time.monotonic() - started
        # Then it exits within its grace period and stop wait, handing the message back
        assert not runner.is_alive() and stopped_s < 30
        assert queue_counts(stack) == (1, 0)
