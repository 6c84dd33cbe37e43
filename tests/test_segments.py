"""Long jobs cut into segments: each a message of its own, joined frame-exact, one COMPLETED, nothing left."""

import json
import os
import re
import subprocess
import sys
import threading
from fractions import Fraction

import numpy as np
import pytest

from conftest import BUCKET, REGION, REPO_ROOT, decode_frames, streams_of, tiny_upscaler
from echoshot_ai_server.app.segments import Segment, cut
from echoshot_ai_server.engine.device import DeviceOutOfMemory
from echoshot_ai_server.job import job_message_body
from echoshot_ai_server.media.probe import VideoInfo, probe
from echoshot_ai_server.media.reader import FrameReader
from worker_harness import (
    enqueue, leftovers, make_worker, queue_counts, run_jobs, send, statuses, upload_clip, wait_until,
)

SOURCE = "uploads/user123/long.mp4"


def info_with(times: list[float], end_s: float) -> VideoInfo:
    return VideoInfo(64, 48, Fraction(24), len(times), end_s, "h264", None, video_start_s=times[0],
                     video_duration_s=end_s - times[0], frame_times=tuple(times))


# -- the cut ----------------------------------------------------------------------------------
def test_a_constant_rate_video_is_cut_into_equal_frame_ranges_that_cover_every_frame():
    times = [i / 24 for i in range(48)]
    segments = cut(info_with(times, 2.0), 0.5)
    assert [(s.first_frame, s.frames) for s in segments] == [(0, 12), (12, 12), (24, 12), (36, 12)]
    assert [s.start_s for s in segments] == [0.0, 0.5, 1.0, 1.5]
    assert sum(s.span_s for s in segments) == pytest.approx(2.0)  # each lasts until the next one's first frame


def test_a_variable_rate_video_is_cut_at_frames_by_time_and_keeps_its_offset():
    times = [0.3 + t for t in (0, 0.1, 0.15, 0.2, 0.9, 1.05, 1.1, 1.15, 1.7, 1.8)]
    segments = cut(info_with(times, 2.3), 1.0)  # 2 s from the first frame: cut at the first frame from 1.3 s on
    assert [(s.first_frame, s.frames) for s in segments] == [(0, 5), (5, 5)]
    assert segments[1].start_s == pytest.approx(1.35) and segments[0].span_s == pytest.approx(1.05)
    assert segments[1].span_s == pytest.approx(0.95)  # until the video's end


@pytest.mark.parametrize("times, end_s, segment_s", [
    ([i / 24 for i in range(48)], 2.0, 2.0),  # not longer than one segment
    ([i / 24 for i in range(48)], 2.0, 0),  # segments off
    ([0.0, 0.1, 0.1, 0.2], 2.0, 0.5),  # two frames at one time: no exact cut
])
def test_no_cut_where_one_piece_is_right(times, end_s, segment_s):
    assert cut(info_with(times, end_s), segment_s) is None


def test_no_cut_when_the_frame_times_are_not_known_for_every_frame():
    info = info_with([i / 24 for i in range(48)], 2.0)
    assert cut(VideoInfo(**{**info.__dict__, "frame_count": 50}), 0.5) is None


def test_never_more_segments_than_frames():
    segments = cut(info_with([0.0, 1.0, 2.0], 3.0), 0.1)
    assert [(s.first_frame, s.frames) for s in segments] == [(0, 1), (1, 1), (2, 1)]


# -- through the queue ------------------------------------------------------------------------
class CountingUpscaler:
    """The tiny upscaler, counting the frames it is given; fails (out of memory) on `poison` frames."""

    def __init__(self, poison: np.ndarray | None = None):
        self.inner = tiny_upscaler(batch_frames=1)
        self.poison = poison
        self.frames = 0

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def upscale(self, frames, outscale):
        if self.poison is not None and any(np.array_equal(frame, self.poison) for frame in frames):
            raise DeviceOutOfMemory("out of memory (planted)")
        self.frames += len(frames)
        return self.inner.upscale(frames, outscale)


def run_until_ended(stack, worker, job_id: str, rounds: int = 40) -> None:
    for _ in range(rounds):
        if {"COMPLETED", "FAILED"} & set(statuses(stack, job_id)) and queue_counts(stack) == (0, 0):
            return
        run_jobs(worker)
    raise AssertionError(f"job {job_id} did not end: {statuses(stack, job_id)}")


def bucket_keys(stack) -> list[str]:
    return sorted(o["Key"] for o in stack.s3.list_objects_v2(Bucket=BUCKET).get("Contents", []))


@pytest.fixture
def long_clip(stack, make_clip):
    """2 s at 24 fps (48 frames) with audio: 4 segments of 0.5 s."""
    return upload_clip(stack, make_clip, key=SOURCE, name="long.mp4", frames=48, fps="24", audio_s=2.0)


def test_a_long_job_runs_as_segments_and_comes_back_frame_exact_with_one_completed(stack, long_clip, tmp_path, caplog):
    # Given the same job done in one piece, for reference (lossless encoding, so that frames compare exactly)
    whole = make_worker(stack, [CountingUpscaler()], segment_seconds=0, x264_crf=0)
    enqueue(stack, long_clip, "j-whole")
    run_until_ended(stack, whole, "j-whole")

    # When a job of that source runs with 0.5 s segments
    upscaler = CountingUpscaler()
    worker = make_worker(stack, [upscaler], segment_seconds=0.5, x264_crf=0)
    enqueue(stack, long_clip, "j-long")
    run_until_ended(stack, worker, "j-long")

    # Then it ran as 4 segments and an assembly, every frame computed once
    assert "2.0s of video cut into 4 segments" in caplog.text
    assert caplog.text.count("segment done, message deleted") == 4 and "4 segments joined: 48 frames" in caplog.text
    assert upscaler.frames == 48
    # And Spring heard COMPLETED once, after rising progress
    sent = statuses(stack, "j-long")
    assert sent.count("COMPLETED") == 1 and sent[-1] == "COMPLETED" and "FAILED" not in sent
    figures = [b["progress"] for b in stack.receiver.bodies("j-long") if b["status"] == "PROCESSING"]
    assert figures == sorted(figures) and figures[-1] == 100.0
    completed = stack.receiver.bodies("j-long")[-1]
    assert completed["outputS3Key"] == "processed/upscaled/j-long/long_upscaled.mp4"
    assert completed["metadata"]["frame_count"] == 48

    # And the result equals the one-piece result frame by frame, with the same timing and audio
    paths = {}
    for job in ("j-whole", "j-long"):
        paths[job] = tmp_path / f"{job}.mp4"
        stack.s3.download_file(BUCKET, f"processed/upscaled/{job}/long_upscaled.mp4", str(paths[job]))
    whole_info, joined_info = probe(paths["j-whole"]), probe(paths["j-long"])
    assert joined_info.frame_times == whole_info.frame_times
    assert (joined_info.fps, joined_info.video_duration_s) == (whole_info.fps, whole_info.video_duration_s)
    assert np.array_equal(decode_frames(paths["j-long"]), decode_frames(paths["j-whole"]))
    [audio] = streams_of(paths["j-long"], "audio")
    assert abs(float(audio["duration"]) - joined_info.video_duration_s) < 1 / 24

    # And nothing of the segments is left: in S3 only the source, the results and the jobs' records
    assert bucket_keys(stack) == sorted([
        SOURCE, "processed/jobs/j-long.json", "processed/jobs/j-whole.json",
        "processed/upscaled/j-long/long_upscaled.mp4", "processed/upscaled/j-whole/long_upscaled.mp4",
    ])
    assert leftovers(stack.work_dir) == []


def test_a_failing_segment_fails_the_job_once_with_its_error_and_the_rest_is_dropped(stack, long_clip, tmp_path):
    # Given a job of 4 segments whose third segment cannot be upscaled (frame 30 runs out of memory)
    stack.s3.download_file(BUCKET, long_clip, str(tmp_path / "source.mp4"))
    info = probe(tmp_path / "source.mp4")
    with FrameReader(tmp_path / "source.mp4", info) as reader:
        frame_30 = np.concatenate([batch.frames for batch in reader.batches(8)])[30]
    worker = make_worker(stack, [CountingUpscaler(poison=frame_30)], segment_seconds=0.5)
    enqueue(stack, long_clip, "j-fails")

    # When the worker runs until the job has ended
    run_until_ended(stack, worker, "j-fails")

    # Then Spring heard FAILED once, with the segment's error, and never COMPLETED
    sent = statuses(stack, "j-fails")
    assert sent.count("FAILED") == 1 and "COMPLETED" not in sent
    assert stack.receiver.bodies("j-fails")[-1]["errorCode"] == "OUT_OF_MEMORY"
    # And no piece of the segments is left; the job's record says it failed
    assert bucket_keys(stack) == sorted([SOURCE, "processed/jobs/j-fails.json"])
    record = json.loads(stack.s3.get_object(Bucket=BUCKET, Key="processed/jobs/j-fails.json")["Body"].read())
    assert record["state"] == "failed"
    assert leftovers(stack.work_dir) == []


def test_a_stored_segment_is_not_computed_again_and_steps_sent_twice_change_nothing(stack, long_clip, caplog):
    upscaler = CountingUpscaler()
    worker = make_worker(stack, [upscaler], segment_seconds=0.5)
    enqueue(stack, long_clip, "j-again")
    run_jobs(worker)  # the job's message: cut into 4 segments
    run_jobs(worker)  # one segment, stored
    assert upscaler.frames == 12
    # (the pieces carry the tag that the lifecycle rule of deploy/s3-lifecycle.json expires)
    pieces = [k for k in bucket_keys(stack) if "/parts/" in k or k.startswith("processed/jobs/j-again/")]
    assert len(pieces) == 3  # the segment's video, its record, the progress ledger
    for key in pieces:
        assert stack.s3.get_object_tagging(Bucket=BUCKET, Key=key)["TagSet"] == [{"Key": "echoshotx", "Value": "segment"}]

    # Given a worker that died after storing its segment and before its record said so
    [record_key] = [k for k in bucket_keys(stack)
                    if k.startswith("processed/jobs/j-again/") and not k.endswith("progress.json")]
    record = json.loads(stack.s3.get_object(Bucket=BUCKET, Key=record_key)["Body"].read())
    stack.s3.put_object(Bucket=BUCKET, Key=record_key, Body=json.dumps(
        {**record, "state": "running", "owner": "a-worker-that-died", "expires_at": 0, "reported": False}).encode())
    body = json.dumps({**json.loads(job_message_body("j-again", long_clip, scale=2, device="cpu", user_id="123")),
                       "segment": {"run": record_key.split("/")[3], "index": int(record_key[-9:-5])}})

    # When its message comes again, and the rest of the job runs
    send(stack, body)
    run_until_ended(stack, worker, "j-again")

    # Then that segment was not computed again: every frame once, one COMPLETED
    assert upscaler.frames == 48
    assert "is stored already: not computed again" in caplog.text
    assert statuses(stack, "j-again").count("COMPLETED") == 1

    # And once the job is done, its job message, a segment's and the assembly's sent again are dropped
    run = record_key.split("/")[3]
    for step in ({"run": run, "index": 1}, {"run": run, "assemble": True}, None):
        message = json.loads(job_message_body("j-again", long_clip, scale=2, device="cpu", user_id="123"))
        send(stack, json.dumps({**message, **({"segment": step} if step else {})}))
    run_jobs(worker, rounds=3)
    assert upscaler.frames == 48 and statuses(stack, "j-again").count("COMPLETED") == 1
    assert queue_counts(stack) == (0, 0)
    assert not [k for k in bucket_keys(stack) if "/parts/" in k or k.startswith("processed/jobs/j-again/")]


def test_segment_names_sort_in_order():
    assert [Segment(i, 0, 1, 0, 1).name for i in (0, 9, 10, 123)] == ["0000", "0009", "0010", "0123"]


# -- across worker processes ------------------------------------------------------------------
def test_segments_spread_over_worker_processes_and_survive_one_killed_mid_segment(stack, make_clip, shared_weights_dir,
                                                                                  tmp_path):
    """48 frames in 4 segments over 3 worker daemons (the official weights, CPU): one is SIGKILLed in
    the middle of a segment and replaced. The result is frame-exact, no segment is stored twice, and
    nothing is left in S3, the queue or the work directory."""
    from echoshot_ai_server.app.pipeline import upscale_video
    from echoshot_ai_server.app.wiring import load_engine
    from echoshot_ai_server.config import Settings
    from echoshot_ai_server.media.writer import EncoderSettings

    key = upload_clip(stack, make_clip, key=SOURCE, name="long.mp4", size=(32, 24), frames=48, fps="24", audio_s=2.0)
    env = {
        **stack.moto.env(REGION), "PATH": os.environ["PATH"], "SQS_QUEUE_URL": stack.queue_url,
        "S3_BUCKET_NAME": BUCKET, "SPRING_CALLBACK_URL": stack.receiver.url, "WEIGHTS_DIR": str(shared_weights_dir),
        "WORK_DIR": str(stack.work_dir), "WORKER_DEVICE": "cpu", "CPU_WORKER_COUNT": "1", "POLL_WAIT_S": "1",
        "METRICS_ENABLED": "false", "PROGRESS_CALLBACK_INTERVAL_S": "1", "VISIBILITY_TIMEOUT_S": "6",
        "SEGMENT_SECONDS": "0.5", "X264_CRF": "0", "RETRY_BASE_DELAY_S": "0",
    }
    workers: list[tuple[subprocess.Popen, list[str]]] = []

    def start_worker() -> tuple[subprocess.Popen, list[str]]:
        process = subprocess.Popen([sys.executable, "echoshot_ai_server/main.py"], cwd=REPO_ROOT, env=env,
                                   stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        lines: list[str] = []
        threading.Thread(target=lambda: lines.extend(process.stdout), daemon=True).start()
        workers.append((process, lines))
        return process, lines

    try:
        for _ in range(3):
            start_worker()
        for _, lines in workers:
            wait_until(lambda: any("worker started" in line for line in lines), 120, "a worker never started")

        # When the job runs, and a worker is killed once it is busy with a segment's frames
        enqueue(stack, key, "j-spread")

        def busy_with_a_segment():
            for process, lines in workers:
                text = "".join(lines)
                started = re.findall(r"segment (\d+): frames", text)
                if started and "업스케일 진행률" in text.split(f"segment {started[-1]}: frames")[-1]:
                    return process, int(started[-1])
            return None

        victim, killed_segment = wait_until(busy_with_a_segment, 120, "no worker got to a segment's frames")
        victim.kill()
        victim.wait()
        start_worker()
        stack.receiver.wait_for("j-spread", timeout_s=300)
        wait_until(lambda: queue_counts(stack) == (0, 0), 60, "messages left on the queue")
    finally:
        for process, _ in workers:
            if process.poll() is None:
                process.terminate()
        for process, _ in workers:
            process.wait(timeout=120)
    logs = ["".join(lines) for _, lines in workers]

    # Then Spring heard COMPLETED once; each segment was stored once, the killed one by another worker
    assert statuses(stack, "j-spread").count("COMPLETED") == 1, "\n".join(logs)
    assert "FAILED" not in statuses(stack, "j-spread")
    stored = re.findall(r"segment (\d+) stored: ", "".join(logs))
    assert sorted(stored) == ["0", "1", "2", "3"], "\n".join(logs)
    killed_log = logs[[p for p, _ in workers].index(victim)]
    assert f"segment {killed_segment} stored" not in killed_log
    assert sum("segments joined" in log for log in logs) == 1

    # And the result is frame-exact: the same frames as the job done in one piece by one process
    result = tmp_path / "result.mp4"
    stack.s3.download_file(BUCKET, "processed/upscaled/j-spread/long_upscaled.mp4", str(result))
    stack.s3.download_file(BUCKET, key, str(tmp_path / "source.mp4"))
    settings = Settings(weights_dir=shared_weights_dir)
    [upscaler] = load_engine(settings, "cpu")
    upscale_video(tmp_path / "source.mp4", tmp_path / "whole.mp4", scale=2, device="cpu",
                  get_upscaler=lambda: upscaler, encoder=EncoderSettings(crf=0))
    assert probe(result).frame_times == probe(tmp_path / "whole.mp4").frame_times
    assert np.array_equal(decode_frames(result), decode_frames(tmp_path / "whole.mp4"))

    # And nothing is left over: not in S3, not on the queues, not in the shared work directory
    assert bucket_keys(stack) == sorted([SOURCE, "processed/jobs/j-spread.json",
                                         "processed/upscaled/j-spread/long_upscaled.mp4"])
    assert queue_counts(stack, stack.dlq_url) == (0, 0)
    assert list(stack.work_dir.iterdir()) == []
