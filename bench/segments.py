"""One long job over several GPUs: wall time from enqueue to COMPLETED with 1 worker, then N.

Everything real on 127.0.0.1: the local S3/SQS server, a Spring stand-in, worker daemons started
as in production (`echoshot_ai_server/main.py`, one per GPU with GPU_DEVICE_INDEX). A clip is made
with ffmpeg and uploaded; for each worker count (ascending) the missing workers are started and
left to become ready (their start-up is reported apart), one job is enqueued and timed until its
COMPLETED callback. Each segment's time comes from the workers' logs.

    python bench/segments.py --workers 1,2 --seconds 60 --size 1280x720 --scale 2 --json PATH
    python bench/segments.py --device cpu --workers 1,2 --seconds 2 --size 64x48 --segment-seconds 0.5 --json PATH
"""

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from echoshot_ai_server.dev.local import (  # noqa: E402
    CallbackReceiver, MotoServer, create_bucket, create_queue_with_dlq,
)
from echoshot_ai_server.job import job_message_body  # noqa: E402

REGION, BUCKET, SOURCE = "ap-northeast-2", "echoshotx-videos", "uploads/bench/long.mp4"


class WorkerProcess:
    def __init__(self, index: int, env: dict[str, str]):
        self.index = index
        self.started = time.monotonic()
        self.process = subprocess.Popen([sys.executable, "echoshot_ai_server/main.py"], cwd=ROOT, env=env,
                                        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.lines: list[str] = []
        threading.Thread(target=lambda: self.lines.extend(self.process.stdout), daemon=True).start()

    def ready_s(self, timeout_s: float) -> float:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            for line in list(self.lines):
                if match := re.search(r"ready ([\d.]+)s after the process started", line):
                    return float(match.group(1))
            if self.process.poll() is not None:
                raise RuntimeError(f"worker {self.index} exited:\n" + "".join(self.lines[-40:]))
            time.sleep(0.2)
        raise TimeoutError(f"worker {self.index} not ready:\n" + "".join(self.lines[-40:]))

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        self.process.wait(timeout=120)


def make_clip(path: Path, seconds: float, size: str, fps: int) -> None:
    subprocess.run(["ffmpeg", "-nostdin", "-loglevel", "error", "-y",
                    "-f", "lavfi", "-i", f"testsrc2=size={size}:rate={fps}:duration={seconds}",
                    "-f", "lavfi", "-i", f"sine=frequency=440:duration={seconds}",
                    "-c:v", "libx264", "-preset", "veryfast", "-pix_fmt", "yuv420p", "-c:a", "aac", str(path)],
                   check=True)


def segment_times(workers: list[WorkerProcess], job_id: str) -> list[dict]:
    found = []
    for worker in workers:
        for line in worker.lines:
            if f"[job={job_id}]" in line and (m := re.search(r"segment (\d+) stored: .* \((\d+) frames, ([\d.]+)s\)", line)):
                found.append({"segment": int(m.group(1)), "worker": worker.index, "frames": int(m.group(2)),
                              "seconds": float(m.group(3))})
    return sorted(found, key=lambda s: s["segment"])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workers", default="1,2", help="worker counts to time, ascending")
    parser.add_argument("--seconds", type=float, default=60)
    parser.add_argument("--size", default="1280x720")
    parser.add_argument("--fps", type=int, default=24)
    parser.add_argument("--scale", type=int, default=2)
    parser.add_argument("--segment-seconds", type=float, default=None, help="default: the setting's")
    parser.add_argument("--device", choices=["gpu", "cpu"], default="gpu")
    parser.add_argument("--json", type=Path, required=True)
    args = parser.parse_args()
    counts = [int(n) for n in args.workers.split(",")]
    report = {"clip": {"seconds": args.seconds, "size": args.size, "fps": args.fps, "scale": args.scale},
              "device": args.device, "runs": []}
    if args.device == "gpu":
        import torch

        report["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]

    with tempfile.TemporaryDirectory() as scratch, MotoServer() as moto, CallbackReceiver() as receiver:
        clip = Path(scratch) / "long.mp4"
        make_clip(clip, args.seconds, args.size, args.fps)
        s3, sqs = moto.client("s3", REGION), moto.client("sqs", REGION)
        create_bucket(s3, BUCKET, REGION)
        queue_url, _ = create_queue_with_dlq(sqs, "upscale-queue", max_receive_count=3)
        s3.upload_file(str(clip), BUCKET, SOURCE)
        env = {**os.environ, **moto.env(REGION), "SQS_QUEUE_URL": queue_url, "S3_BUCKET_NAME": BUCKET,
               "SPRING_CALLBACK_URL": receiver.url, "WORKER_DEVICE": args.device, "METRICS_ENABLED": "false",
               "POLL_WAIT_S": "2", "WORK_DIR": str(Path(scratch) / "work")}
        if args.segment_seconds is not None:
            env["SEGMENT_SECONDS"] = str(args.segment_seconds)
        workers: list[WorkerProcess] = []
        try:
            for count in counts:
                while len(workers) < count:
                    gpu = {"GPU_DEVICE_INDEX": str(len(workers))} if args.device == "gpu" else {}
                    workers.append(WorkerProcess(len(workers), {**env, **gpu}))
                ready = [worker.ready_s(900) for worker in workers]
                job_id = f"bench-{count}-workers"
                started = time.monotonic()
                sqs.send_message(QueueUrl=queue_url, MessageBody=job_message_body(
                    job_id, SOURCE, scale=args.scale, device=args.device))
                completed = receiver.wait_for(job_id, timeout_s=3600)
                wall = time.monotonic() - started
                run = {"workers": count, "wall_s": round(wall, 1), "status": completed["status"],
                       "frames": (completed.get("metadata") or {}).get("frame_count"), "ready_s": ready,
                       "segments": segment_times(workers, job_id)}
                report["runs"].append(run)
                args.json.write_text(json.dumps(report, indent=2))  # what is done survives a cut-off
                print(f"{count} worker(s): {wall:.1f} s from enqueue to {completed['status']} "
                      f"({run['frames']} frames, {len(run['segments'])} segments)", flush=True)
        finally:
            for worker in workers:
                worker.stop()
            report["logs_tail"] = {w.index: "".join(w.lines[-15:]) for w in workers}
            args.json.write_text(json.dumps(report, indent=2))

    first = report["runs"][0]["wall_s"] if report["runs"] else None
    print("| workers | wall s enqueue → COMPLETED | speed-up | segments (worker: s) |")
    print("|---|---|---|---|")
    for run in report["runs"]:
        per = ", ".join(f"{s['segment']}@{s['worker']}: {s['seconds']}" for s in run["segments"])
        print(f"| {run['workers']} | {run['wall_s']} | {first / run['wall_s']:.2f}x | {per} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
