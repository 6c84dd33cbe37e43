"""`make demo`: the whole system on one machine.

Starts an S3/SQS-compatible server and a stand-in for Spring's callback endpoint on 127.0.0.1,
uploads a generated sample clip, enqueues a job the way Spring does, runs the worker daemon until
the job completes, prints what Spring received and where the result is, and stops everything.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from echoshot_ai_server.dev.local import (
    CallbackReceiver, MotoServer, create_bucket, create_queue_with_dlq, make_sample_clip,
)

REPO = Path(__file__).resolve().parents[1]
OUT_DIR = REPO / "demo-output"
REGION = "ap-northeast-2"
BUCKET = "echoshotx-videos"
SOURCE_KEY = "uploads/demo-user/sample.mp4"


def step(text: str) -> None:
    print(f"\n=== {text}", flush=True)


def main() -> int:
    started = time.monotonic()
    OUT_DIR.mkdir(exist_ok=True)
    sample = make_sample_clip(OUT_DIR / "sample.mp4")
    with MotoServer() as moto, CallbackReceiver() as receiver:
        step(f"S3/SQS-compatible server on {moto.endpoint_url}, Spring stand-in on {receiver.url}")
        s3, sqs = moto.client("s3", REGION), moto.client("sqs", REGION)
        create_bucket(s3, BUCKET, REGION)
        queue_url, dlq_url = create_queue_with_dlq(sqs, "upscale-cpu-queue", max_receive_count=5)
        s3.upload_file(str(sample), BUCKET, SOURCE_KEY)
        print(f"bucket {BUCKET}, queue {queue_url} (dead letters: {dlq_url}), source s3://{BUCKET}/{SOURCE_KEY}")

        env = {
            **os.environ, **moto.env(REGION),
            "SQS_QUEUE_URL": queue_url, "S3_BUCKET_NAME": BUCKET, "SPRING_CALLBACK_URL": receiver.url,
            "POLL_WAIT_S": "2", "PROGRESS_CALLBACK_INTERVAL_S": "5", "METRICS_PORT": "0",
        }
        step("enqueue a job the way Spring does: echoshot enqueue")
        enqueued = subprocess.run(
            [sys.executable, "-m", "echoshot_ai_server.cli", "enqueue", "--source", SOURCE_KEY,
             "--scale", "2", "--device", "cpu", "--user-id", "demo-user"],
            env=env, check=True, capture_output=True, text=True,
        )
        job_id = json.loads(enqueued.stdout)["jobId"]
        print(enqueued.stdout.strip())

        step("run the worker daemon: python echoshot_ai_server/main.py")
        worker = subprocess.Popen([sys.executable, "echoshot_ai_server/main.py"], cwd=REPO, env=env)
        try:
            outcome = receiver.wait_for(job_id, timeout_s=900)
        finally:
            worker.send_signal(signal.SIGTERM)
            worker.wait(timeout=120)

        step("callbacks Spring received")
        for body in receiver.bodies(job_id):
            print(json.dumps({k: v for k, v in body.items() if v is not None}, ensure_ascii=False))
        if outcome["status"] != "COMPLETED":
            print(f"job failed: {outcome['errorCode']}: {outcome['errorMessage']}")
            return 1

        key = outcome["outputS3Key"]
        local = OUT_DIR / Path(key).name
        s3.download_file(BUCKET, key, str(local))
        head = s3.head_object(Bucket=BUCKET, Key=key)
        step("result")
        print(f"s3://{BUCKET}/{key} ({head['ContentType']}, {head['ContentLength']} bytes)")
        print(f"metadata: {json.dumps(outcome['metadata'])}")
        print(f"worker exit status after SIGTERM: {worker.returncode}")
        print(f"downloaded to {local}")
        print(f"\nDemo finished in {time.monotonic() - started:.0f}s.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
