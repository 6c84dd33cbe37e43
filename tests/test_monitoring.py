"""/healthz and /metrics of a running worker, on 127.0.0.1."""

import os
import signal
import subprocess
import sys
import threading

import pytest
import requests

from conftest import BUCKET, REGION, REPO_ROOT
from echoshot_ai_server.dev.local import free_port
from echoshot_ai_server.errors import PermanentError
from echoshot_ai_server.app.monitoring import Monitoring
from fault_proxy import FaultProxy, sqs_call
from worker_harness import enqueue, make_worker, statuses, upload_clip, wait_until


def metric(text: str, name: str) -> float | None:
    for line in text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{") and line.split(" ")[0] == name:
            return float(line.rsplit(" ", 1)[1])
    return None


def test_not_ready_until_the_model_is_loaded_and_the_queue_answers():
    monitoring = Monitoring(queue_stale_after_s=60)
    assert monitoring.is_ready()[0] is False
    monitoring.model_loaded = True
    assert monitoring.is_ready()[0] is False
    monitoring.queue_answered()
    assert monitoring.is_ready() == (True, {"model_loaded": True, "queue_reachable": True})
    monitoring.queue_failed("SQS receive_message: connection refused")
    ready, details = monitoring.is_ready()
    assert ready is False and details["queue_error"].startswith("SQS receive_message")


def test_health_and_metrics_of_a_working_worker(stack, make_clip):
    with FaultProxy(stack.moto.endpoint_url) as proxy:
        worker = make_worker(stack, aws_endpoint_url=proxy.url, metrics_port=0)
        worker.monitoring.model_loaded = True
        runner = threading.Thread(target=worker.run)
        runner.start()
        try:
            wait_until(lambda: worker.monitoring.port, 10, "metrics server never started")
            base = f"http://127.0.0.1:{worker.monitoring.port}"
            wait_until(lambda: requests.get(f"{base}/healthz", timeout=5).status_code == 200, 10, "never ready")
            assert requests.get(f"{base}/healthz", timeout=5).json() == {
                "ready": True, "model_loaded": True, "queue_reachable": True}

            # Given two jobs, one good and one bad
            enqueue(stack, upload_clip(stack, make_clip, frames=6), "j-metrics")
            enqueue(stack, "uploads/user123/missing.mp4", "j-missing")
            wait_until(lambda: "COMPLETED" in statuses(stack, "j-metrics") and "FAILED" in statuses(stack, "j-missing"),
                       60, "jobs never finished")

            # Then Prometheus sees them
            wait_until(lambda: metric(requests.get(f"{base}/metrics", timeout=5).text, "echoshot_jobs_in_flight") == 0,
                       10, "jobs still in flight")
            text = requests.get(f"{base}/metrics", timeout=5).text
            assert 'echoshot_jobs_total{outcome="completed",queue="upscale-cpu-queue"} 1.0' in text
            assert 'echoshot_jobs_total{outcome="failed",queue="upscale-cpu-queue"} 1.0' in text
            assert metric(text, "echoshot_job_duration_seconds_count") == 2
            assert metric(text, "echoshot_queue_wait_seconds_count") == 2
            assert metric(text, "echoshot_frames_upscaled_total") == 6
            assert metric(text, "echoshot_last_job_frames_per_second") > 0
            assert metric(text, "echoshot_ready") == 1

            # When SQS stops answering, the worker says it is not ready
            proxy.fail(sqs_call("ReceiveMessage"))
            wait_until(lambda: requests.get(f"{base}/healthz", timeout=5).status_code == 503, 30, "still ready")
            assert "queue_error" in requests.get(f"{base}/healthz", timeout=5).json()
        finally:
            worker.request_stop()
            runner.join(timeout=60)
    assert not runner.is_alive()


def test_the_worker_daemon_serves_health_on_its_port(stack, shared_weights_dir):
    port = free_port()
    env = {
        **stack.moto.env(REGION), "PATH": os.environ["PATH"], "SQS_QUEUE_URL": stack.queue_url, "S3_BUCKET_NAME": BUCKET,
        "SPRING_CALLBACK_URL": stack.receiver.url, "WEIGHTS_DIR": str(shared_weights_dir), "WORK_DIR": str(stack.work_dir),
        "WORKER_DEVICE": "cpu", "POLL_WAIT_S": "1", "METRICS_PORT": str(port),
    }
    worker = subprocess.Popen([sys.executable, "-m", "echoshot_ai_server.cli", "worker"], cwd=REPO_ROOT, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        def ready():
            try:
                return requests.get(f"http://127.0.0.1:{port}/healthz", timeout=2).status_code == 200
            except requests.ConnectionError:
                return False

        wait_until(ready, 120, "the worker never became ready")
        text = requests.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
        assert metric(text, "echoshot_ready") == 1 and metric(text, "echoshot_jobs_in_flight") == 0
    finally:
        worker.send_signal(signal.SIGTERM)
        output, _ = worker.communicate(timeout=120)
    assert worker.returncode == 0, output
    assert f"http://127.0.0.1:{port}/healthz" in output


def test_a_busy_metrics_port_is_one_clear_error():
    first = Monitoring()
    port = first.serve("127.0.0.1", 0)
    try:
        with pytest.raises(PermanentError, match=f"cannot serve health and metrics on 127.0.0.1:{port}"):
            Monitoring().serve("127.0.0.1", port)
    finally:
        first.close()


def test_not_ready_until_the_engine_is_warmed_up(stack):
    # Given a worker whose engine takes a while to tune and compile its kernels
    worker = make_worker(stack, metrics_port=0)
    warming, release = threading.Event(), threading.Event()
    worker.warm_up = lambda: (warming.set(), release.wait(30))
    runner = threading.Thread(target=worker.run)
    runner.start()
    try:
        wait_until(warming.is_set, 10, "the warm-up never started")
        base = f"http://127.0.0.1:{worker.monitoring.port}"

        # Then it answers, but not ready, and takes no job meanwhile
        answer = requests.get(f"{base}/healthz", timeout=5)
        assert answer.status_code == 503 and answer.json()["model_loaded"] is False

        # And once the engine is ready, so is the worker, and the metrics say how long it took
        release.set()
        wait_until(lambda: requests.get(f"{base}/healthz", timeout=5).status_code == 200, 10, "never ready")
        assert metric(requests.get(f"{base}/metrics", timeout=5).text, "echoshot_startup_seconds") > 0
    finally:
        release.set()
        worker.request_stop()
        runner.join(timeout=60)
    assert not runner.is_alive()


def test_start_up_time_counts_from_the_process_start_not_from_our_first_import():
    # whatever runs before the package is imported (the interpreter, torch's import) is start-up time too
    code = ("import time; time.sleep(0.8); from echoshot_ai_server.uptime import process_started; "
            "print(time.monotonic() - process_started())")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, check=True)
    assert 0.8 <= float(out.stdout) < 30, out.stdout
