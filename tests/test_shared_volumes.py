"""Workers sharing one work directory: replicas on one volume (each PID 1 in its own PID namespace),
hosts on a shared file system. Each owns only its own folder, and only dead workers' folders are swept."""

import os
import shutil
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from conftest import BUCKET, REGION, REPO_ROOT
from echoshot_ai_server.app.workspace import WorkerDirectory, remove_stale_worker_dirs
from worker_harness import enqueue, statuses, upload_clip, wait_until

HOLD_A_FOLDER = (
    "import sys, time; from pathlib import Path; from echoshot_ai_server.app.workspace import WorkerDirectory; "
    "d = WorkerDirectory(Path(sys.argv[1])).open(); (d.path / 'job-file').write_text('x'); "
    "print(d.name, flush=True); time.sleep(600)"
)


def hold_a_folder(work_dir, *, own_pid_namespace: bool) -> tuple[subprocess.Popen, str]:
    prefix = ["unshare", "--pid", "--fork"] if own_pid_namespace else []
    process = subprocess.Popen([*prefix, sys.executable, "-c", HOLD_A_FOLDER, str(work_dir)], cwd=REPO_ROOT,
                               stdout=subprocess.PIPE, text=True)
    return process, process.stdout.readline().strip()


def terminate(process: subprocess.Popen, sig: int = signal.SIGTERM) -> None:
    """`sig` to the worker itself: `unshare --fork` does not pass signals on to its child."""
    children = Path(f"/proc/{process.pid}/task/{process.pid}/children").read_text().split()
    for pid in children or [process.pid]:
        os.kill(int(pid), sig)


@pytest.fixture
def pid_namespaces():
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        pytest.skip("separate PID namespaces need root and unshare")


def test_the_sweep_removes_dead_workers_folders_and_only_those(tmp_path, pid_namespaces):
    # Given two workers in PID namespaces of their own (both are PID 1 there) and a third that died
    live = [hold_a_folder(tmp_path, own_pid_namespace=True) for _ in range(2)]
    dead, dead_name = hold_a_folder(tmp_path, own_pid_namespace=False)
    try:
        dead.kill()
        dead.wait()

        # When a new worker sweeps the shared directory
        mine = WorkerDirectory(tmp_path).open()
        removed = remove_stale_worker_dirs(tmp_path)

        # Then only the dead worker's folder is gone; the live ones and the sweeper's own are untouched
        assert [path.name for path in removed] == [dead_name]
        for _, name in live:
            assert (tmp_path / name / "job-file").is_file()
        assert mine.path.is_dir()
        mine.close()
        assert not mine.path.exists() and not (tmp_path / f"{mine.name}.lock").exists()
    finally:
        for process, _ in live:
            terminate(process, signal.SIGKILL)  # the worker, not only `unshare`, which would leave it behind
            process.wait()


def test_folder_names_are_unique_even_for_the_same_pid(tmp_path):
    first, second = WorkerDirectory(tmp_path).open(), WorkerDirectory(tmp_path).open()
    try:
        assert first.path != second.path and str(os.getpid()) in first.name
        assert remove_stale_worker_dirs(tmp_path) == []  # both are held
    finally:
        first.close()
        second.close()


def test_a_replica_stopping_leaves_the_other_replicas_job_alone(stack, make_clip, shared_weights_dir, pid_namespaces):
    # Given two worker daemons sharing one work directory, each PID 1 of its own PID namespace (as
    # two replicas of one compose service on one volume), the first busy with a job
    enqueue(stack, upload_clip(stack, make_clip, size=(48, 32), frames=60), "j-replica")
    env = {
        **stack.moto.env(REGION), "PATH": os.environ["PATH"], "SQS_QUEUE_URL": stack.queue_url,
        "S3_BUCKET_NAME": BUCKET, "SPRING_CALLBACK_URL": stack.receiver.url, "WEIGHTS_DIR": str(shared_weights_dir),
        "WORK_DIR": str(stack.work_dir), "WORKER_DEVICE": "cpu", "CPU_WORKER_COUNT": "1", "POLL_WAIT_S": "1",
        "METRICS_ENABLED": "false", "PROGRESS_CALLBACK_INTERVAL_S": "0", "SHUTDOWN_GRACE_S": "120",
        "VISIBILITY_TIMEOUT_S": "60",
    }

    def replica() -> tuple[subprocess.Popen, list[str]]:
        process = subprocess.Popen(["unshare", "--pid", "--fork", sys.executable, "echoshot_ai_server/main.py"],
                                   cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        lines: list[str] = []
        threading.Thread(target=lambda: lines.extend(process.stdout), daemon=True).start()
        return process, lines

    first, first_logs = replica()
    second = None
    try:
        wait_until(lambda: any((b.get("progress") or 0) > 0 for b in stack.receiver.bodies("j-replica")), 120,
                   "the job never started")

        # When the second replica starts (and sweeps), then is stopped (and drains) while the job runs
        second, second_logs = replica()
        wait_until(lambda: any("worker started" in line for line in second_logs), 120, "the second replica never started")
        terminate(second)
        assert second.wait(timeout=120) == 0, "".join(second_logs)
        assert "COMPLETED" not in statuses(stack, "j-replica"), "the job ended before the second replica stopped"

        # Then the first replica's job completes, from its own files
        wait_until(lambda: "COMPLETED" in statuses(stack, "j-replica") or "FAILED" in statuses(stack, "j-replica"),
                   240, "the job never ended")
        assert statuses(stack, "j-replica")[-1] == "COMPLETED", "".join(first_logs)
        assert not any("job failed" in line for line in first_logs), "".join(first_logs)  # on its first attempt
    finally:
        for process in (first, second):
            if process is not None and process.poll() is None:
                terminate(process)
                process.wait(timeout=120)
    assert [p.name for p in stack.work_dir.iterdir()] == []
