"""Limits checked before heavy work, keys confined to their prefixes, signed callbacks, no secrets in logs."""

import hashlib
import hmac
import io
import json
import logging
import os
import stat
import time
from fractions import Fraction

import pytest

from conftest import BUCKET, make_noise_clip, tiny_upscaler
from echoshot_ai_server.app.pipeline import InputLimits
from echoshot_ai_server.app.wiring import input_limits
from echoshot_ai_server.config import Settings
from echoshot_ai_server.errors import ErrorCode, PermanentError
from echoshot_ai_server.app.pipeline import check_limits, upscale_video
from echoshot_ai_server.job import output_key
from echoshot_ai_server.media.writer import EncoderSettings
from echoshot_ai_server.media.probe import VideoInfo
from echoshot_ai_server.app.workspace import job_workspace
from echoshot_ai_server.logs import LOG_FORMAT, job_context
from fault_proxy import FaultProxy, s3_get, s3_head
from worker_harness import enqueue, leftovers, make_worker, queue_counts, run_jobs, send, statuses, upload_clip

DEFAULTS = input_limits(Settings())


def info(width, height, frames=300, fps=30, duration=None):
    return VideoInfo(width, height, Fraction(fps), frames, duration or frames / fps, "h264", None)


@pytest.mark.parametrize("video, scale, code, words", [
    (info(3840, 2160), 4, ErrorCode.OUTPUT_TOO_LARGE, "15360x8640"),  # 4x of 4K is refused, not attempted
    (info(5000, 1000), 2, ErrorCode.INPUT_TOO_LARGE, "width 5000 > 4096"),
    (info(4096, 4096), 2, ErrorCode.INPUT_TOO_LARGE, "more than 8294400 pixels"),
    (info(640, 480, frames=30 * 660), 2, ErrorCode.INPUT_TOO_LARGE, "duration 660.0s > 600s"),
    (info(640, 480, frames=40000, fps=120), 2, ErrorCode.INPUT_TOO_LARGE, "40000 frames > 36000"),
])
def test_limits_refuse_what_the_tiers_do_not_allow(video, scale, code, words):
    with pytest.raises(PermanentError) as err:
        check_limits(video, scale, DEFAULTS)
    assert err.value.code == code and words in err.value.message


@pytest.mark.parametrize("video, scale", [(info(3840, 2160), 2), (info(1920, 1080), 4), (info(1080, 1920), 4)])
def test_limits_allow_the_tiers(video, scale):
    check_limits(video, scale, DEFAULTS)


def test_limits_are_checked_before_the_model_is_touched(make_clip, tmp_path):
    asked = []

    def get_upscaler():
        asked.append(1)
        return tiny_upscaler()

    with pytest.raises(PermanentError) as err:
        upscale_video(make_clip(size=(64, 48)), tmp_path / "o.mp4", scale=4, device="cpu", get_upscaler=get_upscaler,
                      encoder=EncoderSettings(), limits=InputLimits(max_output_pixels=200 * 200))
    assert err.value.code == ErrorCode.OUTPUT_TOO_LARGE and asked == []


def test_download_size_is_checked_from_s3_before_downloading(stack, make_clip):
    enqueue(stack, upload_clip(stack, make_clip), "j-big")
    with FaultProxy(stack.moto.endpoint_url) as proxy:
        proxy.fail(s3_get("clip.mp4"))  # a download attempt would fail differently
        run_jobs(make_worker(stack, aws_endpoint_url=proxy.url, max_download_bytes=100))
    failed = stack.receiver.wait_for("j-big", timeout_s=1)
    assert failed["errorCode"] == "INPUT_TOO_LARGE" and proxy.failed == 0
    assert queue_counts(stack) == (0, 0)


@pytest.mark.parametrize("key", [
    "uploads/../private/secret.mp4", "private/secret.mp4", "/uploads/clip.mp4", "s3://other-bucket/uploads/clip.mp4",
    "uploads//clip.mp4", "uploads/a\\..\\..\\clip.mp4",
])
def test_source_keys_are_confined_to_the_allowed_prefixes(stack, make_clip, key):
    upload_clip(stack, make_clip, key="private/secret.mp4")  # it exists: refused, not missing
    enqueue(stack, key, "j-escape")

    run_jobs(make_worker(stack))

    failed = stack.receiver.wait_for("j-escape", timeout_s=1)
    assert failed["errorCode"] == "FORBIDDEN_SOURCE"
    assert statuses(stack, "j-escape") == ["FAILED"]


def test_other_prefixes_can_be_allowed(stack, make_clip):
    enqueue(stack, upload_clip(stack, make_clip, key="imports/partner/clip.mp4"), "j-import")
    run_jobs(make_worker(stack, allowed_source_prefixes=["uploads/", "imports/"]))
    assert stack.receiver.wait_for("j-import", timeout_s=1)["status"] == "COMPLETED"


def test_job_ids_that_could_be_paths_are_refused(stack):
    for job_id in ("../../etc", "a/b", ".hidden", "x" * 129):
        enqueue(stack, "uploads/user123/clip.mp4", job_id)
    run_jobs(make_worker(stack), rounds=4)
    assert queue_counts(stack) == (0, 0)
    assert all(body["errorCode"] == "INVALID_MESSAGE" for body in stack.receiver.bodies())
    keys = stack.s3.list_objects_v2(Bucket=BUCKET).get("Contents", [])
    assert keys == []


@pytest.mark.parametrize("source, expected", [
    ("uploads/u/my video.mp4", "processed/upscaled/j/my video_upscaled.mp4"),
    ("uploads/u/영상 (1).mov", "processed/upscaled/j/영상 _1__upscaled.mp4"),
    ("uploads/u/-rf 'x' \"y\".mp4", "processed/upscaled/j/-rf _x_ _y__upscaled.mp4"),
    ("uploads/u/..mp4", "processed/upscaled/j/video_upscaled.mp4"),
    ("uploads/u/a\\..\\..\\b.mp4", "processed/upscaled/j/a_.._.._b_upscaled.mp4"),
])
def test_a_hostile_file_name_cannot_move_the_result(source, expected):
    assert output_key("j", source) == expected


def test_file_names_with_spaces_quotes_unicode_and_a_leading_dash(stack, make_clip):
    key = "uploads/user123/-i 'quoted' \"double\" 영상 $(rm -rf).mp4"
    enqueue(stack, upload_clip(stack, make_clip, key=key, audio_s=0.6), "j-names")

    run_jobs(make_worker(stack))

    completed = stack.receiver.wait_for("j-names", timeout_s=1)
    assert completed["status"] == "COMPLETED"
    assert completed["outputS3Key"] == "processed/upscaled/j-names/-i _quoted_ _double_ 영상 __rm -rf__upscaled.mp4"


def test_the_local_cli_takes_a_file_whose_name_starts_with_a_dash(echoshot_cli, make_clip, tmp_path, shared_weights_dir):
    source = make_clip("-weird name.mp4", size=(32, 24), frames=2)
    run = echoshot_cli("upscale", "--input", f"./{source.name}", "--no-validation", "--output", "out",
                       env={"WEIGHTS_DIR": str(shared_weights_dir)}, cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    assert len(list((tmp_path / "out").glob("*-weird name_upscaled.mp4"))) == 1


def test_job_directories_are_private(tmp_path):
    with job_workspace(tmp_path / "work", "job/../1") as workspace:
        assert stat.S_IMODE(os.stat(workspace).st_mode) == 0o700
        assert workspace.parent == tmp_path / "work"
    assert not workspace.exists()


def test_not_enough_disk_fails_cleanly_and_is_retried(stack, make_clip):
    enqueue(stack, upload_clip(stack, make_clip), "j-disk")
    run_jobs(make_worker(stack, disk_headroom_bytes=10**18))
    assert statuses(stack, "j-disk") == []  # retryable: nothing reported before the last attempt
    assert queue_counts(stack) == (1, 0)
    assert leftovers(stack.work_dir) == []


def test_callbacks_are_signed_and_secrets_never_appear(stack, make_clip, caplog, monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "aws-secret-value-123")
    secret, token = "hmac-shared-secret-456", "bearer-token-789"
    enqueue(stack, upload_clip(stack, make_clip), "j-signed")
    send_bad = stack.sqs.send_message(QueueUrl=stack.queue_url, MessageBody='{"jobId": "j-bad", "taskType": "UPSCALE"}')
    assert send_bad["MessageId"]

    run_jobs(make_worker(stack, spring_callback_secret=secret, spring_callback_token=token), rounds=2)

    assert stack.receiver.received
    for callback in stack.receiver.received:
        timestamp = callback.headers["X-EchoShotX-Timestamp"]
        assert abs(int(timestamp) - time.time()) < 120
        expected = hmac.new(secret.encode(), f"{timestamp}.".encode() + callback.raw, hashlib.sha256).hexdigest()
        assert callback.headers["X-EchoShotX-Signature"] == f"sha256={expected}"
    everything = caplog.text + "".join(c.raw.decode() for c in stack.receiver.received)
    for value in (secret, token, "aws-secret-value-123", "testing"):
        assert value not in everything


def test_a_source_replaced_after_its_size_was_checked_is_never_downloaded(stack, make_clip, tmp_path, caplog):
    # Given a small source that is swapped for a large one between the size check and the download
    key = upload_clip(stack, make_clip)
    big = make_noise_clip(tmp_path / "big.mp4", size="160x120", seconds=3, lossless=True)
    limit = 100_000
    assert stack.s3.head_object(Bucket=BUCKET, Key=key)["ContentLength"] < limit < big.stat().st_size
    enqueue(stack, key, "j-swap")
    with FaultProxy(stack.moto.endpoint_url) as proxy:
        proxy.before(s3_get("clip.mp4"), lambda: stack.s3.upload_file(str(big), BUCKET, key))
        worker = make_worker(stack, aws_endpoint_url=proxy.url, max_download_bytes=limit)

        # When the worker downloads it, it gets the version it checked or nothing
        run_jobs(worker)
        assert "[SOURCE_CHANGED]" in caplog.text and proxy.bytes_sent("clip.mp4") == 0
        assert queue_counts(stack) == (1, 0)

        # And the next attempt checks the new version's size
        run_jobs(worker)
        assert proxy.bytes_sent("clip.mp4") == 0
    assert stack.receiver.wait_for("j-swap", timeout_s=1)["errorCode"] == "INPUT_TOO_LARGE"


def test_the_download_limit_holds_while_downloading(stack, make_clip):
    # Given an S3 whose HEAD answer understates the object's size
    enqueue(stack, upload_clip(stack, make_clip), "j-lie")
    with FaultProxy(stack.moto.endpoint_url) as proxy:
        proxy.lie_about_size(s3_head("clip.mp4"), 100)
        run_jobs(make_worker(stack, aws_endpoint_url=proxy.url, max_download_bytes=1000))
    failed = stack.receiver.wait_for("j-lie", timeout_s=1)
    assert failed["errorCode"] == "INPUT_TOO_LARGE" and "larger than 1000 bytes" in failed["errorMessage"]
    assert leftovers(stack.work_dir) == []


def production_log(target: io.StringIO) -> logging.Handler:
    handler = logging.StreamHandler(target)
    handler.setFormatter(logging.Formatter(LOG_FORMAT))
    return handler


def test_a_job_id_cannot_forge_a_log_line(stack):
    forged = "2026-11-27 12:00:00 [INFO] echoshot_ai_server.worker [job=x]: job done, message deleted"
    send(stack, json.dumps({"jobId": f"x\n{forged}", "taskType": "UPSCALE", "sourceS3Key": "uploads/a.mp4",
                            "parameters": {"device": "cpu", "scale_factor": 2}}))
    output = io.StringIO()
    handler = production_log(output)
    logging.getLogger().addHandler(handler)
    try:
        run_jobs(make_worker(stack))
        with job_context(f"y\n{forged}"):
            logging.getLogger("echoshot_ai_server.test").info("a line of a job")
    finally:
        logging.getLogger().removeHandler(handler)
    lines = output.getvalue().splitlines()
    assert lines and not any(line.startswith(forged[:19]) for line in lines)
    assert any("[job=y\\n2026-11-27" in line for line in lines)


def test_failures_are_reported_without_the_workers_paths(stack, make_clip, tmp_path):
    wrapper = tmp_path / "ffmpeg"
    wrapper.write_text('#!/bin/sh\ncase "$*" in *pipe:0*) for last; do :; done\n'
                       '  echo "Could not open $last: Permission denied" >&2; exit 1;; esac\nexec ffmpeg "$@"\n')
    wrapper.chmod(0o755)
    enqueue(stack, upload_clip(stack, make_clip), "j-paths")
    run_jobs(make_worker(stack, ffmpeg_bin=str(wrapper)), rounds=3)
    failed = stack.receiver.wait_for("j-paths", timeout_s=1)
    assert failed["errorCode"] == "ENCODE_FAILED"
    assert "Could not open output.mp4: Permission denied" in failed["errorMessage"]
    assert str(tmp_path) not in failed["errorMessage"] and "/tmp" not in failed["errorMessage"]
