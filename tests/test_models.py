"""A model per job: each listed once, verified when loaded, equal to its reference implementation."""

import json
import shutil

import numpy as np
import pytest

from conftest import BUCKET, decode_frames, psnr, reference_enhancer
from echoshot_ai_server.app.wiring import load_engine, load_models
from echoshot_ai_server.config import Settings
from echoshot_ai_server.engine.models import build_model, reference_model
from echoshot_ai_server.engine.specs import MODELS, X4PLUS, RRDBNetArch, SRVGGNetArch
from echoshot_ai_server.errors import ErrorCode, PermanentError
from test_upscaler import random_frames
from worker_harness import enqueue, make_worker, queue_counts, run_jobs, statuses, upload_clip

FAST = MODELS["realesr-animevideov3"]
ANIME = MODELS["RealESRGAN_x4plus_anime_6B"]


@pytest.mark.parametrize("spec", [FAST, ANIME], ids=lambda spec: spec.name)
@pytest.mark.parametrize("outscale", [4, 2])
def test_each_model_equals_realesrganer_with_its_architecture(shared_weights_dir, spec, outscale):
    settings = Settings(weights_dir=shared_weights_dir, cpu_precision="fp32")  # the CPU profile: tile 128, pad 5
    frames = random_frames(1, 36, 140, seed=11)  # two tiles wide
    [ours] = load_engine(settings, "cpu", spec=spec)
    reference = reference_enhancer(shared_weights_dir / spec.weights_file, spec.arch, tile=128, tile_pad=5)

    expected, _ = reference.enhance(frames[0], outscale=outscale)
    out = ours.upscale(frames, outscale)[0]

    diff = np.abs(out.astype(int) - expected.astype(int))
    assert out.shape == (36 * outscale, 140 * outscale, 3)
    assert diff.max() <= 1 and (diff == 0).mean() > 0.99


@pytest.mark.parametrize("arch", [
    RRDBNetArch(num_feat=16, num_block=2, num_grow_ch=8), RRDBNetArch(num_feat=16, num_block=1, num_grow_ch=8, scale=2),
    SRVGGNetArch(num_feat=16, num_conv=3, scale=4, act_type="prelu"),
    SRVGGNetArch(num_feat=8, num_conv=2, scale=2, act_type="leakyrelu"), SRVGGNetArch(num_feat=8, num_conv=1, act_type="relu"),
], ids=repr)
def test_our_networks_are_basicsr_and_realesrgan_s_to_the_parameter_names_and_outputs(arch):
    import torch

    ours, reference = build_model(arch).eval(), reference_model(arch).eval()
    assert list(ours.state_dict()) == list(reference.state_dict())
    torch.manual_seed(3)
    with torch.no_grad():
        for tensor in reference.state_dict().values():
            tensor.copy_(torch.randn_like(tensor) * 0.1)
        ours.load_state_dict(reference.state_dict(), strict=True)
        x = torch.rand(2, 3, 12, 20)
        assert torch.allclose(ours(x), reference(x), atol=1e-6)


def test_a_worker_imports_neither_torchvision_nor_basicsr():
    # they cost seconds of every worker's start-up (more on a cold disk); the networks are our own
    import subprocess
    import sys

    from conftest import REPO_ROOT

    code = ("import sys; from echoshot_ai_server.app import wiring, pipeline; from echoshot_ai_server.engine import "
            "fused_trunk, models; from echoshot_ai_server import cli; from echoshot_ai_server.engine.specs import X4PLUS; "
            "models.build_model(X4PLUS.arch); print(sorted(m for m in sys.modules if m.split('.')[0] in "
            "('torchvision', 'basicsr', 'realesrgan')))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout


def test_each_model_is_listed_once_with_a_cost_that_matches_its_network():
    import torch

    for spec in MODELS.values():
        total = []
        model = build_model(spec.arch)
        for module in model.modules():
            if isinstance(module, torch.nn.Conv2d):
                module.register_forward_hook(lambda m, i, o: total.append(
                    2 * o.numel() * m.in_channels * m.kernel_size[0] * m.kernel_size[1] // m.groups))
        with torch.no_grad():
            model(torch.zeros(1, 3, 16, 16))
        assert sum(total) / 256 / 1e6 == pytest.approx(spec.mflop_per_pixel, rel=0.01), spec.name
        assert spec.scale == 4 and len(spec.sha256) == 2


def test_a_weights_file_that_is_not_a_known_one_is_refused(shared_weights_dir, tmp_path):
    tampered = tmp_path / FAST.weights_file
    shutil.copy(shared_weights_dir / FAST.weights_file, tampered)
    with tampered.open("ab") as file:
        file.write(b"\0")  # still loads with torch; not the file that was checked
    with pytest.raises(PermanentError) as err:
        load_engine(Settings(weights_dir=tmp_path), "cpu", spec=FAST)
    assert err.value.code == ErrorCode.WEIGHTS_INVALID
    assert "not a known file" in err.value.message and FAST.sha256[1] in err.value.message


def test_a_worker_loads_the_models_it_serves(shared_weights_dir):
    [slot] = load_models(Settings(weights_dir=shared_weights_dir, models=["realesr-animevideov3"]), "cpu")
    assert list(slot) == ["realesr-animevideov3"]
    [slot] = load_models(Settings(weights_dir=shared_weights_dir), "cpu")
    assert list(slot) == list(MODELS)
    with pytest.raises(PermanentError, match="MODELS: model must be one of"):
        load_models(Settings(weights_dir=shared_weights_dir, models=["x8"]), "cpu")


def luma(frame: np.ndarray) -> np.ndarray:
    return frame.astype(np.float64) @ np.array([0.114, 0.587, 0.299])


def test_a_job_is_upscaled_with_the_model_it_asks_for(stack, make_clip, shared_weights_dir, tmp_path):
    key = upload_clip(stack, make_clip, size=(48, 32), frames=3)
    enqueue(stack, key, "job-fast", scale=4, model="realesr-animevideov3")
    enqueue(stack, key, "job-unknown-to-this-worker", scale=4, model="RealESRGAN_x4plus_anime_6B")
    worker = make_worker(stack, load_models(Settings(weights_dir=shared_weights_dir, models=["realesr-animevideov3",
                                                                                             "RealESRGAN_x4plus"]), "cpu"))
    run_jobs(worker, rounds=2)

    result = tmp_path / "fast.mp4"
    stack.s3.download_file(BUCKET, "processed/upscaled/job-fast/clip_upscaled.mp4", str(result))
    source = tmp_path / "source.mp4"
    stack.s3.download_file(BUCKET, key, str(source))
    fast = reference_enhancer(shared_weights_dir / FAST.weights_file, FAST.arch, tile=0, tile_pad=0)
    x4plus = reference_enhancer(shared_weights_dir / X4PLUS.weights_file, X4PLUS.arch, tile=0, tile_pad=0)
    for got, frame in zip(decode_frames(result), decode_frames(source)):
        expected, _ = fast.enhance(frame, outscale=4)
        other, _ = x4plus.enhance(frame, outscale=4)
        assert got.shape == (128, 192, 3)
        assert psnr(luma(got), luma(expected)) > 30
        assert psnr(luma(got), luma(expected)) > psnr(luma(got), luma(other)) + 3  # not the default model's pixels
    refused = stack.receiver.bodies("job-unknown-to-this-worker")[-1]
    assert refused["status"] == "FAILED" and refused["errorCode"] == "INVALID_PARAMETERS"
    assert "RealESRGAN_x4plus_anime_6B is not served by this worker" in refused["errorMessage"]
    assert statuses(stack, "job-fast")[-1] == "COMPLETED" and queue_counts(stack) == (0, 0)


def test_the_command_line_takes_a_model(echoshot_cli, make_clip, shared_weights_dir, tmp_path):
    source = make_clip(size=(40, 30), frames=2)
    run = echoshot_cli("upscale", "--input", str(source), "--scale", "4", "--model", "realesr-animevideov3",
                       "--output", str(tmp_path / "out"), env={"WEIGHTS_DIR": str(shared_weights_dir)})
    assert run.returncode == 0, run.stderr
    assert "모델: realesr-animevideov3" in run.stdout and "width: 160" in run.stdout
    wrong = echoshot_cli("upscale", "--input", str(source), "--model", "x8")
    assert wrong.returncode == 2 and "invalid choice: 'x8'" in wrong.stderr


def test_enqueue_sends_the_model(stack):
    from echoshot_ai_server.cli import main as echoshot

    assert echoshot(["enqueue", "--source", "uploads/a.mp4", "--scale", "4", "--device", "gpu", "--model",
                     "realesr-animevideov3", "--queue-url", stack.queue_url, "--job-id", "j"]) == 0
    [message] = stack.sqs.receive_message(QueueUrl=stack.queue_url)["Messages"]
    assert json.loads(message["Body"])["parameters"]["model"] == "realesr-animevideov3"


@pytest.mark.parametrize("engine", ["eager", "compile"])
def test_the_fast_model_on_the_gpu_code_path_equals_realesrganer(shared_weights_dir, engine):
    # Whole frames, channels-last, the x2 resize on the device, as the GPU runs it (torch.compile on the CPU)
    from echoshot_ai_server.engine.models import load_model
    from echoshot_ai_server.engine.upscaler import RunProfile, Upscaler

    path = shared_weights_dir / FAST.weights_file
    ours = Upscaler(load_model(path, FAST.arch), device="cpu", profile=RunProfile(
        half=False, tile=0, tile_pad=10, fallback_tile=64, engine=engine, batch_frames=2, channels_last=True,
        resize_on_device=True))
    reference = reference_enhancer(path, FAST.arch, tile=0, tile_pad=10)
    frames = random_frames(2, 30, 44, seed=5)

    out = ours.upscale(frames, 2)

    for i, frame in enumerate(frames):
        expected, _ = reference.enhance(frame, outscale=2)
        diff = np.abs(out[i].astype(int) - expected.astype(int))
        assert diff.max() <= 1 and (diff == 0).mean() > 0.7
