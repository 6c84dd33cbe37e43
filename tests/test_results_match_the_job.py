"""What a user gets is what the job asked for: the scale, every frame, a retry that waits.

Each test here is aimed at one quiet bug that leaves every other test green: a scale ignored, the
encoded file's check skipped, a retry that comes back at once, the missing-frame tolerance off by one.
"""

import sys
import time

import pytest

from conftest import BUCKET, ffprobe_json
from echoshot_ai_server.app.pipeline import MISSING_FRAMES_TOLERATED, MISSING_SHARE_TOLERATED, _check_every_frame_decoded
from echoshot_ai_server.errors import ErrorCode, PermanentError
from worker_harness import OutOfMemoryUpscaler, enqueue, leftovers, make_worker, queue_counts, run_jobs, statuses, upload_clip


def result_keys(stack) -> list[str]:
    listing = stack.s3.list_objects_v2(Bucket=BUCKET, Prefix="processed/upscaled/")
    return [o["Key"] for o in listing.get("Contents", [])]


@pytest.mark.parametrize("scale", [4, 2])
def test_the_result_has_the_scale_the_job_asked_for(stack, make_clip, tmp_path, scale):
    key = upload_clip(stack, make_clip, size=(50, 38), frames=3, audio_s=0.3)
    enqueue(stack, key, f"job-x{scale}", scale=scale)

    run_jobs(make_worker(stack))

    result_key = f"processed/upscaled/job-x{scale}/clip_upscaled.mp4"
    result = tmp_path / "result.mp4"
    stack.s3.download_file(BUCKET, result_key, str(result))
    video = [s for s in ffprobe_json(result)["streams"] if s["codec_type"] == "video"][0]
    assert (video["width"], video["height"]) == (50 * scale, 38 * scale)  # what a player shows
    head = stack.s3.head_object(Bucket=BUCKET, Key=result_key)["Metadata"]
    assert (head["width"], head["height"]) == (str(50 * scale), str(38 * scale))
    completed = stack.receiver.bodies(f"job-x{scale}")[-1]
    assert completed["status"] == "COMPLETED"
    assert (completed["metadata"]["width"], completed["metadata"]["height"]) == (50 * scale, 38 * scale)


def faulty_ffmpeg(tmp_path, extra_output_args: list[str]) -> str:
    """An ffmpeg that adds `extra_output_args` to the encoder's command (the one reading frames from a
    pipe), just before its output file, as a broken build or a bad wrapper might."""
    stand_in = tmp_path / "ffmpeg"
    stand_in.write_text(
        f"#!{sys.executable}\n"
        "import os, sys\n"
        "args = sys.argv[1:]\n"
        f"if 'pipe:0' in args:\n    args = args[:-1] + {extra_output_args!r} + args[-1:]\n"
        "os.execvp('ffmpeg', ['ffmpeg'] + args)\n"
    )
    stand_in.chmod(0o755)
    return str(stand_in)


@pytest.mark.parametrize("extra, expected", [
    (["-frames:v", "4"], "128x96 with 4 frames"),
    (["-s", "64x48"], "64x48 with 6 frames"),
], ids=["frames-dropped", "wrong-size"])
def test_an_encoder_that_writes_something_else_fails_the_job_and_uploads_nothing(stack, make_clip, tmp_path, extra, expected):
    key = upload_clip(stack, make_clip, frames=6)
    enqueue(stack, key, "job-bad-encoder")
    worker = make_worker(stack, ffmpeg_bin=faulty_ffmpeg(tmp_path, extra))

    run_jobs(worker)

    assert statuses(stack, "job-bad-encoder")[-1] == "FAILED"
    failed = stack.receiver.bodies("job-bad-encoder")[-1]
    assert failed["errorCode"] == ErrorCode.OUTPUT_MISMATCH.value
    assert expected in failed["errorMessage"] and "expected 128x96 with 6 frames" in failed["errorMessage"]
    assert result_keys(stack) == []
    assert queue_counts(stack) == (0, 0) and leftovers(stack.work_dir) == []


def test_a_failed_attempt_comes_back_only_after_its_backoff(stack, make_clip):
    key = upload_clip(stack, make_clip, frames=3)
    enqueue(stack, key, "job-backoff")
    # The first retry waits between half and all of 4 s (jitter), whole seconds: 2 to 4 s.
    worker = make_worker(stack, [OutOfMemoryUpscaler()], retry_base_delay_s=4, retry_max_delay_s=60)

    run_jobs(worker)
    failed_at = time.monotonic()

    assert "FAILED" not in statuses(stack, "job-backoff")  # a transient error: retried, not reported
    assert queue_counts(stack) == (0, 1)  # kept, out of sight
    seen_after = None
    while time.monotonic() - failed_at < 10:
        received = stack.sqs.receive_message(QueueUrl=stack.queue_url, WaitTimeSeconds=0, VisibilityTimeout=30)
        if received.get("Messages"):
            seen_after = time.monotonic() - failed_at
            break
        time.sleep(0.25)
    assert seen_after is not None, "the message never came back for its next attempt"
    assert 1.5 <= seen_after <= 5.5, f"back after {seen_after:.1f} s; the backoff asked for 2 to 4 s"


# Containers' frame counts can be a little off, so a few frames short of the declared count pass; a
# file that decodes clearly fewer is truncated. The edge, on both sides, for short and long videos.
@pytest.mark.parametrize("declared", [10, 3000])
def test_the_missing_frame_tolerance_at_its_edge(declared):
    tolerated = int(max(MISSING_FRAMES_TOLERATED, declared * MISSING_SHARE_TOLERATED))
    _check_every_frame_decoded(declared, declared)
    _check_every_frame_decoded(declared - tolerated, declared)  # exactly the tolerated number missing
    with pytest.raises(PermanentError) as err:
        _check_every_frame_decoded(declared - tolerated - 1, declared)
    assert err.value.code == ErrorCode.DECODE_FAILED
    assert f"only {declared - tolerated - 1} of {declared} frames" in err.value.message
