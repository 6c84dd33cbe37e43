"""`make load-test`: many small jobs through several worker processes, with faults, on 127.0.0.1.

Sends JOBS messages (a share of them malformed), runs WORKERS worker daemons against a local
S3/SQS server and a Spring stand-in, kills one worker with SIGKILL halfway (and starts a new one),
takes the callback endpoint down for a while and makes S3 fail now and then. When every message is
settled it stops the workers with SIGTERM and reports: jobs sent, completed, failed as expected,
lost (must be 0), computed twice (must be 0, though some jobs are sent twice), leftover temporary
files (must be 0), and each worker's memory at start and end.

    .venv/bin/python scripts/load_test.py [--jobs 200] [--workers 3] [--json load.json]
"""

import argparse
import json
import os
import random
import re
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests")]

from echoshot_ai_server.dev.local import CallbackReceiver, MotoServer, create_bucket, create_queue_with_dlq  # noqa: E402
from echoshot_ai_server.job import job_message_body  # noqa: E402
from fault_proxy import FaultProxy  # noqa: E402

REGION, BUCKET = "ap-northeast-2", "echoshotx-videos"
CLIPS = {  # name: (size, frames, audio seconds)
    "uploads/load/tiny-audio.mp4": ((32, 24), 3, 0.3),
    "uploads/load/tiny-silent.mp4": ((40, 30), 2, None),
    "uploads/load/odd size.mov": ((34, 26), 3, 0.3),
}
MALFORMED = [  # (body maker, expected errorCode or None when no jobId can be read)
    (lambda job: "{not json", None),
    (lambda job: job_message_body(job, "uploads/load/tiny-audio.mp4", scale=3, device="cpu"), "INVALID_PARAMETERS"),
    (lambda job: job_message_body(job, "uploads/load/missing.mp4", scale=2, device="cpu"), "SOURCE_NOT_FOUND"),
    (lambda job: job_message_body(job, "private/secret.mp4", scale=2, device="cpu"), "FORBIDDEN_SOURCE"),
    (lambda job: json.dumps({"jobId": job, "taskType": "TRANSCODE"}), "UNSUPPORTED_TASK"),
]


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def rss_mb(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        return None
    return None


def make_clip(path: Path, size, frames, audio_s) -> None:
    args = ["ffmpeg", "-nostdin", "-loglevel", "error", "-y", "-f", "lavfi",
            "-i", f"testsrc=size={size[0]}x{size[1]}:rate=10:duration={(frames - 0.5) / 10}"]
    if audio_s:
        args += ["-f", "lavfi", "-i", f"sine=duration={audio_s}"]
    args += ["-c:v", "libx264", "-pix_fmt", "yuv444p"] + (["-c:a", "aac"] if audio_s else []) + [str(path)]
    subprocess.run(args, check=True)


class Workers:
    def __init__(self, env: dict, logs: Path):
        self.env, self.logs = env, logs
        self.processes: list[subprocess.Popen] = []
        self.memory: dict[int, dict] = {}

    def start(self) -> subprocess.Popen:
        log_file = open(self.logs / f"worker-{len(self.processes)}.log", "w")
        process = subprocess.Popen([sys.executable, "echoshot_ai_server/main.py"], cwd=REPO, env=self.env,
                                   stdout=log_file, stderr=subprocess.STDOUT)
        self.processes.append(process)
        self.memory[process.pid] = {"start_mb": None, "end_mb": None}
        return process

    def sample_start(self) -> None:
        for index, process in enumerate(self.processes):
            record = self.memory[process.pid]
            if record["start_mb"] is None and "worker started" in (self.logs / f"worker-{index}.log").read_text():
                record["start_mb"] = rss_mb(process.pid)

    def stop_all(self) -> list[int | None]:
        for process in self.processes:
            if process.poll() is None:
                self.memory[process.pid]["end_mb"] = rss_mb(process.pid)
                process.send_signal(signal.SIGTERM)
        return [process.wait(timeout=300) for process in self.processes]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=200)
    parser.add_argument("--workers", type=int, default=3)
    parser.add_argument("--malformed-share", type=float, default=0.1)
    parser.add_argument("--duplicate-share", type=float, default=0.05)
    parser.add_argument("--timeout-s", type=float, default=1800)
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--weights-dir", default=os.environ.get("WEIGHTS_DIR", "weights"))
    args = parser.parse_args()
    rng = random.Random(7)
    started = time.monotonic()

    with tempfile.TemporaryDirectory(prefix="echoshot-load-") as tmp, MotoServer() as moto, \
            CallbackReceiver() as receiver, FaultProxy(moto.endpoint_url) as proxy:
        tmp = Path(tmp)
        s3, sqs = moto.client("s3", REGION), moto.client("sqs", REGION)
        create_bucket(s3, BUCKET, REGION)
        queue_url, dlq_url = create_queue_with_dlq(sqs, "upscale-cpu-queue", max_receive_count=5, visibility_timeout_s=20)
        for key, (size, frames, audio_s) in CLIPS.items():
            path = tmp / Path(key).name
            make_clip(path, size, frames, audio_s)
            s3.upload_file(str(path), BUCKET, key)
        s3.upload_file(str(tmp / "tiny-audio.mp4"), BUCKET, "private/secret.mp4")

        expected: dict[str, str | None] = {}  # jobId -> "COMPLETED" or the expected errorCode
        unreadable = duplicates = 0
        for i in range(args.jobs):
            job_id = f"load-{i:04d}"
            if rng.random() < args.malformed_share:
                make_body, code = MALFORMED[i % len(MALFORMED)]
                body = make_body(job_id)
                if code is None:
                    unreadable += 1
                else:
                    expected[job_id] = code
            else:
                body = job_message_body(job_id, rng.choice(list(CLIPS)), scale=rng.choice([2, 4]), device="cpu")
                expected[job_id] = "COMPLETED"
                if rng.random() < args.duplicate_share:  # Spring sends it twice: still one computation
                    sqs.send_message(QueueUrl=queue_url, MessageBody=body)
                    duplicates += 1
            sqs.send_message(QueueUrl=queue_url, MessageBody=body)
        log(f"sent {args.jobs + duplicates} messages: {sum(v == 'COMPLETED' for v in expected.values())} valid jobs "
            f"({duplicates} of them twice), {args.jobs - sum(v == 'COMPLETED' for v in expected.values())} malformed")

        # S3 answers 2 % of object downloads with a 503
        proxy.fail(lambda method, path, headers: method == "GET" and "/uploads/" in path and rng.random() < 0.02)
        work_dir = tmp / "work"
        env = {
            **os.environ, **moto.env(REGION), "AWS_ENDPOINT_URL": proxy.url, "SQS_QUEUE_URL": queue_url,
            "S3_BUCKET_NAME": BUCKET, "SPRING_CALLBACK_URL": receiver.url, "WEIGHTS_DIR": str(args.weights_dir),
            "WORK_DIR": str(work_dir), "WORKER_DEVICE": "cpu", "CPU_WORKER_COUNT": "1", "POLL_WAIT_S": "2", "METRICS_PORT": "0",
            "VISIBILITY_TIMEOUT_S": "20", "VISIBILITY_EXTEND_EVERY_S": "5", "RETRY_BASE_DELAY_S": "2",
            "RETRY_MAX_DELAY_S": "20", "PROGRESS_CALLBACK_INTERVAL_S": "30", "OMP_NUM_THREADS": "1",
        }
        workers = Workers(env, tmp)
        for _ in range(args.workers):
            workers.start()

        def final_outcomes() -> dict[str, list[dict]]:
            finals: dict[str, list[dict]] = {}
            for body in receiver.bodies():
                if body["status"] in ("COMPLETED", "FAILED"):
                    finals.setdefault(body["jobId"], []).append(body)
            return finals

        killed = down_since = None
        while time.monotonic() - started < args.timeout_s:
            time.sleep(1)
            workers.sample_start()
            done = len(final_outcomes())
            if killed is None and done >= len(expected) * 0.25:
                victim = workers.processes[0]
                victim.send_signal(signal.SIGKILL)
                victim.wait()
                killed = victim.pid
                log(f"{done} jobs settled: SIGKILL to worker {victim.pid}, a new one starts")
                workers.start()
            if down_since is None and done >= len(expected) * 0.5:
                receiver.down = 503
                down_since = time.monotonic()
                log(f"{done} jobs settled: callback endpoint down")
            if down_since is not None and receiver.down and time.monotonic() - down_since > 45:
                receiver.down = None
                log("callback endpoint back")
            counts = sqs.get_queue_attributes(QueueUrl=queue_url, AttributeNames=["All"])["Attributes"]
            in_queue = int(counts["ApproximateNumberOfMessages"]) + int(counts["ApproximateNumberOfMessagesNotVisible"])
            if done >= len(expected) and in_queue == 0 and not receiver.down:
                break
        exit_codes = workers.stop_all()
        elapsed = time.monotonic() - started

        finals = final_outcomes()
        completed = failed_as_expected = lost = unexpected = 0
        for job_id, want in expected.items():
            outcomes = finals.get(job_id, [])
            if not outcomes:
                lost += 1
            elif want == "COMPLETED" and all(o["status"] == "COMPLETED" for o in outcomes):
                key = outcomes[-1]["outputS3Key"]
                s3.head_object(Bucket=BUCKET, Key=key)
                completed += 1
            elif want != "COMPLETED" and all(o.get("errorCode") == want for o in outcomes):
                failed_as_expected += 1
            else:
                unexpected += 1
        uploads = Counter()
        for log_path in tmp.glob("worker-*.log"):
            for match in re.finditer(r"result uploaded: s3://[^/]+/processed/upscaled/([^/]+)/", log_path.read_text()):
                uploads[match.group(1)] += 1
        dead_letters = int(sqs.get_queue_attributes(QueueUrl=dlq_url, AttributeNames=["ApproximateNumberOfMessages"])
                           ["Attributes"]["ApproximateNumberOfMessages"])
        leftover = [str(p) for p in work_dir.rglob("*") if p.is_file()] if work_dir.exists() else []
        report = {
            "jobs_sent": args.jobs,
            "jobs_sent_twice": duplicates,
            "valid_jobs": sum(v == "COMPLETED" for v in expected.values()),
            "malformed_jobs": args.jobs - sum(v == "COMPLETED" for v in expected.values()),
            "completed": completed,
            "failed_as_expected": failed_as_expected,
            "unreadable_messages_dropped": unreadable,
            "lost": lost,
            "unexpected_outcome": unexpected,
            "computed_twice": sum(1 for n in uploads.values() if n > 1),
            "completed_callbacks_repeated": sum(max(0, len([o for o in v if o["status"] == "COMPLETED"]) - 1)
                                                for v in finals.values()),
            "dead_letters": dead_letters,
            "leftover_temporary_files": len(leftover),
            "s3_errors_injected": proxy.failed,
            "worker_killed": killed,
            "worker_exit_codes_after_sigterm": [c for p, c in zip(workers.processes, exit_codes) if p.pid != killed],
            "worker_memory_mb": list(workers.memory.values()),
            "elapsed_s": round(elapsed, 1),
        }
    print(json.dumps(report, indent=2))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    ok = (report["lost"] == 0 and report["computed_twice"] == 0 and report["unexpected_outcome"] == 0
          and report["leftover_temporary_files"] == 0 and report["completed"] == report["valid_jobs"])
    log("PASS" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
