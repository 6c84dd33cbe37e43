"""What the MessageGroupId of a FIFO queue does to a fleet: 3 workers, 9 jobs, on the local S3/SQS server.

    .venv/bin/python bench/fifo_groups.py --json PATH [--workers 3] [--jobs 9] [--job-seconds 2]

Three ways of choosing the group: one group for every job, one per user (3 users), one per job.
Each job sleeps `--job-seconds` in its model (so that the figure is the queue's, not the CPU's),
through the real worker: local moto server, a Spring stand-in, one slot per worker. Reports the
wall time from sending the 9 jobs to the last COMPLETED, and how many jobs ran at once at most.
"""

import argparse
import json
import sys
import tempfile
import threading
import time
from concurrent.futures import wait
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from echoshot_ai_server.app.wiring import build_worker  # noqa: E402
from echoshot_ai_server.config import Settings  # noqa: E402
from echoshot_ai_server.dev.local import CallbackReceiver, MotoServer, create_bucket, create_queue_with_dlq  # noqa: E402
from echoshot_ai_server.job import job_message_body  # noqa: E402
from bench.run import run  # noqa: E402

REGION, BUCKET = "ap-northeast-2", "echoshotx-videos"


class SleepyUpscaler:
    """Stands in for a model that takes `seconds` per job: sleeps, then repeats pixels (nearest)."""

    device, batch_frames, engine = "cpu", 8, "eager"

    def __init__(self, seconds: float, running: list):
        self.seconds = seconds
        self.running = running

    def describe(self) -> str:
        return "sleepy stand-in"

    yuv_on_device = False

    def warm_up(self, **_) -> float:
        return 0.0

    def compile_tail(self, sizes=None) -> None:
        return None

    def measure_speed(self, size=None) -> float:
        return 1e9

    def work_pixels(self, height: int, width: int) -> int:
        return height * width

    def upscale(self, frames: np.ndarray, outscale: int) -> np.ndarray:
        self.running.append(+1)
        try:
            time.sleep(self.seconds)
        finally:
            self.running.append(-1)
        return frames.repeat(outscale, axis=1).repeat(outscale, axis=2)


def one_mode(moto, receiver, clip: Path, mode: str, args) -> dict:
    moto.reset()
    s3, sqs = moto.client("s3", REGION), moto.client("sqs", REGION)
    create_bucket(s3, BUCKET, REGION)
    queue_url, _ = create_queue_with_dlq(sqs, "upscale-gpu-queue.fifo", max_receive_count=3, visibility_timeout_s=60)
    s3.upload_file(str(clip), BUCKET, "uploads/bench/clip.mp4")
    running: list[int] = []
    settings = Settings(aws_region=REGION, aws_endpoint_url=moto.endpoint_url, sqs_queue_url=queue_url,
                        s3_bucket_name=BUCKET, spring_callback_url=receiver.url, worker_device="cpu",
                        cpu_worker_count=1, poll_wait_s=1, progress_callback_interval_s=60, metrics_enabled=False,
                        work_dir=Path(tempfile.mkdtemp()), segment_seconds=0)
    workers = [build_worker(settings, [SleepyUpscaler(args.job_seconds, running)]) for _ in range(args.workers)]
    for worker in workers:
        worker.monitoring.model_loaded = True
    jobs = [f"{mode.replace(' ', '-')}-{i}" for i in range(args.jobs)]
    group = {"one group": lambda i: "all", "per user": lambda i: f"user-{i % 3}", "per job": lambda i: jobs[i]}[mode]
    started = time.monotonic()
    for i, job in enumerate(jobs):
        sqs.send_message(QueueUrl=queue_url, MessageGroupId=group(i), MessageDeduplicationId=job,
                         MessageBody=job_message_body(job, "uploads/bench/clip.mp4", scale=2, device="cpu",
                                                      user_id=str(i % 3)))

    def loop(worker):
        while not all(any(b["status"] == "COMPLETED" for b in receiver.bodies(j)) for j in jobs):
            wait(worker.run_once())
            if time.monotonic() - started > 600:
                return

    threads = [threading.Thread(target=loop, args=(w,)) for w in workers]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.monotonic() - started
    at_once, peak = 0, 0
    for step in list(running):
        at_once += step
        peak = max(peak, at_once)
    return {"mode": mode, "wall_s": round(wall, 1), "most_jobs_at_once": peak,
            "completed": sum(any(b["status"] == "COMPLETED" for b in receiver.bodies(j)) for j in jobs)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", type=Path, required=True)
    parser.add_argument("--workers", type=int, default=3)
    parser.add_argument("--jobs", type=int, default=9)
    parser.add_argument("--job-seconds", type=float, default=2.0)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp, MotoServer() as moto, CallbackReceiver() as receiver:
        clip = Path(tmp) / "clip.mp4"
        run(["ffmpeg", "-nostdin", "-y", "-loglevel", "error", "-f", "lavfi", "-i", "testsrc2=size=32x24:rate=10",
             "-frames:v", "2", "-c:v", "libx264", "-pix_fmt", "yuv420p", str(clip)])
        import os
        os.environ.update(moto.env(REGION))
        results = [one_mode(moto, receiver, clip, mode, args) for mode in ("one group", "per user", "per job")]
    print(f"| MessageGroupId | wall s ({args.jobs} jobs of about {args.job_seconds:g} s, {args.workers} workers) "
          "| most jobs at once |")
    print("|---|---|---|")
    for r in results:
        print(f"| {r['mode']} | {r['wall_s']} | {r['most_jobs_at_once']} |")
    args.json.write_text(json.dumps({"workers": args.workers, "jobs": args.jobs, "job_seconds": args.job_seconds,
                                     "results": results}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
