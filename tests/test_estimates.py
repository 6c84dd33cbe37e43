"""A job's compute is estimated before its frames: the estimate goes to Spring first, a job over the
limit is refused before any heavy work, and a pre-resize makes it fit."""

import json
from fractions import Fraction

import jsonschema
import numpy as np
import pytest
from prometheus_client import generate_latest

from conftest import BUCKET, REPO_ROOT, ffprobe_json, tiny_upscaler
from echoshot_ai_server.app.estimate import ComputeEstimator, human_duration
from echoshot_ai_server.app.pipeline import input_size
from echoshot_ai_server.engine.specs import DEFAULT_MODEL
from echoshot_ai_server.engine.upscaler import RunProfile, Upscaler
from echoshot_ai_server.errors import ErrorCode, PermanentError
from echoshot_ai_server.media.probe import VideoInfo
from test_upscaler import make_tiny_model
from worker_harness import enqueue, leftovers, make_worker, queue_counts, run_jobs, statuses, upload_clip


class CountingUpscaler:
    """The tiny upscaler, counting the frames jobs give it (the speed measurement aside)."""

    def __init__(self):
        self.inner = tiny_upscaler(batch_frames=1)
        self.frames = 0

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def upscale(self, frames, outscale):
        self.frames += len(frames)
        return self.inner.upscale(frames, outscale)


def speed_of(worker) -> float:
    [sample] = [m for m in worker.monitoring.registry.collect() if m.name == "echoshot_model_speed_pixels_per_second"]
    [value] = [s.value for s in sample.samples if s.labels == {"model": DEFAULT_MODEL}]
    return value


def test_the_first_processing_callback_carries_the_estimate(stack, make_clip):
    key = upload_clip(stack, make_clip, size=(64, 48), frames=6)
    enqueue(stack, key, "j-estimate")
    upscaler = tiny_upscaler()
    worker = make_worker(stack, [upscaler])

    run_jobs(worker)

    bodies = stack.receiver.bodies("j-estimate")
    first = bodies[0]
    assert first["status"] == "PROCESSING" and first["progress"] == 0
    # frames x the pixels the model takes in (tiles 32 + pads 4 over 64x48) / the speed measured on this device
    expected = 6 * upscaler.work_pixels(48, 64) / speed_of(worker)
    assert upscaler.work_pixels(48, 64) > 64 * 48  # the tiles' pads count
    assert first["etaSeconds"] == pytest.approx(expected, abs=0.11)
    assert bodies[-1]["status"] == "COMPLETED"
    assert b'echoshot_model_speed_pixels_per_second{model="RealESRGAN_x4plus"}' in generate_latest(worker.monitoring.registry)


def test_a_job_over_the_limit_is_refused_before_its_frames_and_a_pre_resize_makes_it_fit(stack, make_clip, tmp_path):
    key = upload_clip(stack, make_clip, size=(64, 48), frames=6)
    counting = CountingUpscaler()
    worker = make_worker(stack, [counting])
    speed = worker.task.estimator.speed(DEFAULT_MODEL, counting)
    full = 6 * counting.work_pixels(48, 64) / speed
    worker.task.estimator.max_job_s = full / 2  # the whole frames do not fit; a quarter of the pixels do

    enqueue(stack, key, "j-too-large")
    run_jobs(worker)

    [failed] = stack.receiver.bodies("j-too-large")  # nothing else was said: no PROCESSING, one FAILED
    assert failed["status"] == "FAILED" and failed["errorCode"] == ErrorCode.JOB_TOO_LARGE.value
    assert "6 frames of 64x48 with RealESRGAN_x4plus would take about" in failed["errorMessage"]
    assert "(MAX_JOB_SECONDS); at maxInputHeight" in failed["errorMessage"]
    assert counting.frames == 0 and queue_counts(stack) == (0, 0) and leftovers(stack.work_dir) == []
    assert "Contents" not in stack.s3.list_objects_v2(Bucket=BUCKET, Prefix="processed/upscaled/")

    enqueue(stack, key, "j-resized", maxInputHeight=24)
    run_jobs(worker)

    assert statuses(stack, "j-resized")[-1] == "COMPLETED"
    completed = stack.receiver.bodies("j-resized")[-1]
    assert completed["metadata"] == {"width": 64, "height": 48, "fps": 10.0, "frame_count": 6,
                                     "duration": pytest.approx(0.6, abs=0.05), "source_width": 64, "source_height": 48}
    schema = json.loads((REPO_ROOT / "docs" / "schemas" / "callback.schema.json").read_text())
    for body in stack.receiver.bodies("j-resized") + stack.receiver.bodies("j-too-large"):
        jsonschema.validate(body, schema)
    result = tmp_path / "resized.mp4"
    stack.s3.download_file(BUCKET, "processed/upscaled/j-resized/clip_upscaled.mp4", str(result))
    video = [s for s in ffprobe_json(result)["streams"] if s["codec_type"] == "video"][0]
    assert (video["width"], video["height"]) == (64, 48)  # 2x of 32x24
    head = stack.s3.head_object(Bucket=BUCKET, Key="processed/upscaled/j-resized/clip_upscaled.mp4")["Metadata"]
    assert (head["source_width"], head["source_height"]) == ("64", "48")
    assert counting.frames == 6


def test_the_setting_pre_resizes_every_job_and_a_job_may_ask_for_less(stack, make_clip):
    key = upload_clip(stack, make_clip, size=(96, 64), frames=2)
    worker = make_worker(stack, pre_resize_max_height=48)
    enqueue(stack, key, "j-setting")
    enqueue(stack, key, "j-less", maxInputHeight=32)
    enqueue(stack, key, "j-more", maxInputHeight=64)  # the setting still holds
    run_jobs(worker, rounds=3)
    sizes = {job: stack.receiver.bodies(job)[-1]["metadata"] for job in ("j-setting", "j-less", "j-more")}
    assert (sizes["j-setting"]["width"], sizes["j-setting"]["height"]) == (144, 96)  # 72x48, x2
    assert (sizes["j-less"]["width"], sizes["j-less"]["height"]) == (96, 64)  # 48x32, x2
    assert (sizes["j-more"]["width"], sizes["j-more"]["height"]) == (144, 96)


def info(width, height, rotation=0) -> VideoInfo:
    return VideoInfo(width=width, height=height, fps=Fraction(30), frame_count=1, duration_s=1.0, codec="h264",
                     audio=None, rotation=rotation)


@pytest.mark.parametrize("size, rotation, max_height, expected", [
    ((1920, 1080), 0, 720, (1280, 720)),
    ((1920, 1080), 0, 0, (1920, 1080)),      # no pre-resize
    ((640, 480), 0, 720, (640, 480)),        # never up
    ((1080, 1920), 0, 720, (404, 720)),      # portrait: the height as shown, even width (405 is as near)
    ((1920, 1080), 90, 720, (404, 720)),     # a phone's rotated landscape is shown portrait
    ((642, 362), 0, 241, (426, 240)),        # odd sizes come out even
])
def test_the_pre_resized_size_keeps_the_aspect_in_even_numbers(size, rotation, max_height, expected):
    assert input_size(info(*size, rotation=rotation), max_height) == expected


def test_work_pixels_count_the_tiles_pads():
    whole = Upscaler(make_tiny_model(), device="cpu", profile=RunProfile(tile=0, tile_pad=10, fallback_tile=0))
    tiled = Upscaler(make_tiny_model(), device="cpu", profile=RunProfile(tile=32, tile_pad=4, fallback_tile=0))
    assert whole.work_pixels(48, 64) == 48 * 64
    # 2x2 tiles of 32, each padded by 4 inside the frame: 36 x 36 each
    assert tiled.work_pixels(64, 64) == 4 * 36 * 36


def test_the_estimate_and_the_refusal_in_numbers():
    upscaler = Upscaler(make_tiny_model(), device="cpu", profile=RunProfile(tile=0, tile_pad=0, fallback_tile=0))
    estimator = ComputeEstimator(max_job_s=0)
    estimator._speeds[DEFAULT_MODEL] = 1000.0  # pixels per second, as if measured
    assert estimator.check(DEFAULT_MODEL, upscaler, 900, 640, 480) == pytest.approx(900 * 640 * 480 / 1000)
    estimator.max_job_s = 1000
    with pytest.raises(PermanentError) as err:
        estimator.check(DEFAULT_MODEL, upscaler, 900, 640, 480)
    assert err.value.code == ErrorCode.JOB_TOO_LARGE
    assert "about 76.8 h" in err.value.message and "limit of 17 min" in err.value.message
    assert err.value.message.endswith("at maxInputHeight 28 it would fit")  # 480 x sqrt(1000 / 276480)
    estimator.max_job_s = 100
    with pytest.raises(PermanentError) as err:
        estimator.check(DEFAULT_MODEL, upscaler, 900, 640, 480)
    assert "at maxInputHeight" not in err.value.message  # no size would fit: no hint
    assert [human_duration(s) for s in (45, 600, 36000)] == ["45 s", "10 min", "10.0 h"]
    assert np.isfinite(estimator.speed(DEFAULT_MODEL, upscaler))


def test_the_speed_is_measured_before_the_tail_starts_compiling():
    """A compiler running beside the measurement slowed it ninefold on a GPU (the estimates with it):
    the start-up measures each model's speed, and only then starts compiling in the background."""
    from echoshot_ai_server.app.wiring import warm_up_models
    from echoshot_ai_server.config import Settings

    calls = []

    class Recording:
        device = "gpu"

        def warm_up(self, **_):
            calls.append("warm up")
            return 1.0

        def measure_speed(self):
            calls.append("speed")
            return 1e6

        def compile_tail(self):
            calls.append("compile tail")

    warm_up_models(Settings(), [{DEFAULT_MODEL: Recording()}, {DEFAULT_MODEL: Recording()}], ComputeEstimator())
    assert calls == ["warm up", "warm up", "speed", "compile tail", "compile tail"]
