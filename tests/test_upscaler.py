"""The upscaler computes Real-ESRGAN's pixels, falls back on OOM and refuses what it cannot do."""

import logging

import cv2
import numpy as np
import pytest
import torch

from conftest import TINY_ARCH, make_tiny_model, psnr, reference_enhancer, tiny_upscaler
from echoshot_ai_server.config import Settings
from echoshot_ai_server.engine.device import DeviceOutOfMemory, cpu_multiplies_bf16, resolve_device
from echoshot_ai_server.engine.models import load_model, read_state_dict
from echoshot_ai_server.engine.resize import lanczos4_weights, lanczos_half
from echoshot_ai_server.engine.specs import MODELS, X4PLUS
from echoshot_ai_server.engine.tiling import BYTES_PER_INPUT_PIXEL, plan_forward, tile_windows
from echoshot_ai_server.engine.upscaler import RunProfile, Upscaler
from echoshot_ai_server.errors import ErrorCode, PermanentError
from echoshot_ai_server.app.wiring import load_engine, run_profile


def random_frames(n: int, h: int, w: int, seed: int = 1) -> np.ndarray:
    """Smooth-ish random content: noise plus gradients, like a real frame rather than pure noise."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack([xx * 255 / w, yy * 255 / h, (xx + yy) * 127 / (w + h)], axis=-1)
    frames = base[None] + rng.normal(0, 30, size=(n, h, w, 3))
    return np.clip(frames, 0, 255).astype(np.uint8)


@pytest.mark.parametrize("h, w, tile, pad", [(37, 29, 16, 5), (48, 64, 32, 4), (20, 20, 0, 10), (50, 33, 128, 5)])
def test_tile_windows_cover_the_output_exactly_once(h, w, tile, pad):
    coverage = np.zeros((h * 4, w * 4), np.int32)
    for win in tile_windows(h, w, tile, pad, 4):
        coverage[win.out_y0:win.out_y1, win.out_x0:win.out_x1] += 1
        assert 0 <= win.in_y0 and win.in_y1 <= h and 0 <= win.in_x0 and win.in_x1 <= w
        # the core of each padded tile is what lands in the output
        assert win.crop_y0 + (win.out_y1 - win.out_y0) <= (win.in_y1 - win.in_y0) * 4
    assert (coverage == 1).all()


@pytest.mark.parametrize("outscale", [4, 2])
@pytest.mark.parametrize("pre_pad", [0, 3])
def test_frames_equal_realesrganer_enhance(tiny_checkpoint, outscale, pre_pad):
    # Given three frames of a size that is no multiple of 8 and several tiles per frame
    frames = random_frames(3, 37, 45)
    ours = Upscaler(
        load_model(tiny_checkpoint, TINY_ARCH), device="cpu", profile=RunProfile(half=False, tile=16, tile_pad=5,
        fallback_tile=8, pre_pad=pre_pad))
    reference = reference_enhancer(tiny_checkpoint, TINY_ARCH, tile=16, tile_pad=5, pre_pad=pre_pad)

    # When our upscaler takes them as one batch
    out = ours.upscale(frames, outscale)

    # Then each frame is what RealESRGANer.enhance gives for it, within float rounding
    assert out.shape == (3, 37 * outscale, 45 * outscale, 3) and out.dtype == np.uint8
    for i, frame in enumerate(frames):
        expected, _ = reference.enhance(frame, outscale=outscale)
        diff = np.abs(out[i].astype(int) - expected.astype(int))
        assert diff.max() <= 1, f"frame {i}: max difference {diff.max()}"
        assert (diff == 0).mean() > 0.99


def test_official_weights_equal_realesrganer(shared_weights_dir):
    # The production model, CPU profile (tile 128, pad 5, fp32), on a frame that needs two tiles
    settings = Settings(weights_dir=shared_weights_dir, cpu_precision="fp32")
    profile = run_profile(settings, "cpu")
    frames = random_frames(1, 40, 150, seed=7)
    [ours] = load_engine(settings, "cpu")
    reference = reference_enhancer(shared_weights_dir / X4PLUS.weights_file, X4PLUS.arch, tile=profile.tile,
                                   tile_pad=profile.tile_pad)

    expected, _ = reference.enhance(frames[0], outscale=2)
    out = ours.upscale(frames, 2)[0]

    diff = np.abs(out.astype(int) - expected.astype(int))
    assert diff.max() <= 1 and (diff == 0).mean() > 0.99


@pytest.mark.parametrize("key", ["params_ema", "params", None])
def test_checkpoint_formats(tmp_path, key):
    state = make_tiny_model(seed=3).state_dict()
    path = tmp_path / "w.pth"
    torch.save({key: state} if key else state, path)

    loaded = read_state_dict(path)

    assert loaded.keys() == state.keys()
    assert all(torch.equal(loaded[k], state[k]) for k in state)


def test_missing_weights_name_the_path_and_how_to_get_them(tmp_path):
    with pytest.raises(PermanentError) as err:
        load_engine(Settings(weights_dir=tmp_path / "weights"), "cpu")
    assert err.value.code == ErrorCode.WEIGHTS_MISSING
    assert str(tmp_path / "weights" / "RealESRGAN_x4plus.pth") in err.value.message
    assert "releases/download/v0.1.0/RealESRGAN_x4plus.pth" in err.value.message


@pytest.mark.parametrize("content", [b"not a checkpoint at all", None])
def test_unreadable_or_mismatched_weights(tmp_path, content):
    path = tmp_path / "RealESRGAN_x4plus.pth"
    if content is None:  # a valid checkpoint of another architecture
        torch.save({"params_ema": make_tiny_model().state_dict()}, path)
    else:
        path.write_bytes(content)
    with pytest.raises(PermanentError) as err:
        load_engine(Settings(weights_dir=tmp_path), "cpu")
    assert err.value.code == ErrorCode.WEIGHTS_INVALID
    assert str(path) in err.value.message


@pytest.mark.parametrize("scale", [1, 3, 8])
def test_unsupported_scale_is_a_clear_error(scale):
    with pytest.raises(ValueError, match="scale must be 2 or 4"):
        tiny_upscaler().upscale(random_frames(1, 8, 8), scale)


class RunsOutOfMemoryAbove(torch.nn.Module):
    """Wraps a model; raises CUDA's OOM error for tiles larger than `limit` pixels on a side."""

    def __init__(self, model: torch.nn.Module, limit: int):
        super().__init__()
        self.model = model
        self.limit = limit
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        if max(x.shape[-2:]) > self.limit:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return self.model(x)


def test_out_of_memory_retries_the_frame_with_the_fallback_tile(caplog):
    frames = random_frames(2, 40, 40)
    expected = tiny_upscaler(tile=16, tile_pad=4).upscale(frames, 4)
    flaky = Upscaler(
        RunsOutOfMemoryAbove(make_tiny_model(), limit=16 + 2 * 4), device="cpu", profile=RunProfile(half=False,
        tile=32, tile_pad=4, fallback_tile=16))

    out = flaky.upscale(frames, 4)

    assert np.abs(out.astype(int) - expected.astype(int)).max() <= 1  # one frame per pass now: float rounding
    assert any("32 → 16" in r.getMessage() and r.levelno == logging.WARNING for r in caplog.records)
    assert flaky.profile.tile == 32  # the next batch tries the normal tile size again


def test_out_of_memory_even_with_the_fallback_tile_is_its_own_error():
    flaky = Upscaler(
        RunsOutOfMemoryAbove(make_tiny_model(), limit=4), device="cpu", profile=RunProfile(half=False,
        tile=32, tile_pad=4, fallback_tile=16))
    with pytest.raises(DeviceOutOfMemory, match="even with tile 16"):
        flaky.upscale(random_frames(1, 40, 40), 4)


def test_other_model_errors_are_not_mistaken_for_out_of_memory():
    class Broken(torch.nn.Module):
        def forward(self, x):
            raise RuntimeError("Given groups=1, weight of size [64, 3, 3, 3], expected input to have 3 channels")

    upscaler = Upscaler(Broken(), device="cpu", profile=RunProfile(half=False, tile=16, tile_pad=2, fallback_tile=8))
    with pytest.raises(RuntimeError, match="expected input"):
        upscaler.upscale(random_frames(1, 20, 20), 4)


def test_gpu_requested_without_cuda_falls_back_to_cpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("gpu") == "cpu"


def test_device_profiles():
    settings = Settings()
    gpu, cpu = run_profile(settings, "gpu"), run_profile(settings, "cpu")
    # GPU: fp16, whole frames (or the largest tiles the memory limit allows), 128-px tiles after an OOM
    assert (gpu.tile, gpu.tile_pad, gpu.fallback_tile, gpu.half, gpu.engine) == (0, 10, 128, True, "auto")
    # CPU: the guide's fp32, 128-px tiles with 5 px of padding, 64 after an OOM
    assert (cpu.tile, cpu.tile_pad, cpu.fallback_tile, cpu.half, cpu.engine) == (128, 5, 64, False, "eager")
    # the guide's GPU tiles remain one setting away
    assert run_profile(Settings(gpu_tile=256), "gpu").tile == 256
    # the fused engine's tail runs in its Triton kernels, no compiler, unless GPU_TAIL_COMPILE says otherwise
    assert gpu.tail_compile == "never"
    assert run_profile(Settings(gpu_tail_compile="background"), "gpu").tail_compile == "background"
    # small batches replayed as CUDA graphs unless GPU_CUDA_GRAPHS turns them off; never on the CPU
    assert gpu.cuda_graphs and not run_profile(Settings(gpu_cuda_graphs=False), "gpu").cuda_graphs
    assert not run_profile(Settings(gpu_worker_count=2), "gpu").cuda_graphs  # two jobs at once on one GPU
    assert not cpu.cuda_graphs


def test_the_graphs_memory_pool_is_kept_out_of_the_memory_plan():
    from echoshot_ai_server.engine.graphs import GRAPH_MAX_PIXELS
    from echoshot_ai_server.engine.tiling import BYTES_PER_INPUT_PIXEL
    from echoshot_ai_server.engine.upscaler import budget_with_graphs

    pool = GRAPH_MAX_PIXELS * BYTES_PER_INPUT_PIXEL
    assert budget_with_graphs(40 * 2**30, True) == (True, 40 * 2**30 - pool)
    assert budget_with_graphs(40 * 2**30, False) == (False, 40 * 2**30)
    assert budget_with_graphs(3 * pool, True) == (False, 3 * pool)  # a small GPU_MEMORY_LIMIT_GB: no graphs
    assert budget_with_graphs(None, True) == (True, None)


def test_cpu_upscaler_never_runs_in_half_precision(tiny_checkpoint):
    upscaler = Upscaler(load_model(tiny_checkpoint, TINY_ARCH), device="cpu", profile=RunProfile(half=True, tile=16, tile_pad=2, fallback_tile=8))
    assert upscaler.half is False
    assert next(upscaler.model.parameters()).dtype == torch.float32


def test_lanczos_weights_are_opencvs():
    weights = lanczos4_weights(0.5)
    assert sum(weights) == pytest.approx(1.0)
    assert weights[3] == weights[4] == pytest.approx(0.6189, abs=1e-4)
    assert weights[0] == pytest.approx(-0.0126, abs=1e-4)
    assert lanczos4_weights(0.0) == [0, 0, 0, 1, 0, 0, 0, 0]


@pytest.mark.parametrize("h, w", [(40, 60), (34, 18)])
def test_lanczos_half_matches_opencv_within_one(h, w):
    image = random_frames(1, h, w, seed=3)[0]
    expected = cv2.resize(image, (w // 2, h // 2), interpolation=cv2.INTER_LANCZOS4)
    tensor = torch.from_numpy(image).permute(2, 0, 1)[None].float()
    ours = lanczos_half(tensor).round().clamp(0, 255).to(torch.uint8)[0].permute(1, 2, 0).numpy()
    diff = np.abs(ours.astype(int) - expected.astype(int))
    assert diff.max() <= 1 and (diff == 0).mean() > 0.7


@pytest.mark.parametrize("outscale", [4, 2])
@pytest.mark.parametrize("tile", [16, 0])
def test_the_gpu_code_path_on_the_cpu_equals_realesrganer(tiny_checkpoint, outscale, tile):
    # channels-last memory, post-processing and the x2 resize on the device, as on the GPU
    frames = random_frames(2, 37, 45)
    ours = Upscaler(
        load_model(tiny_checkpoint, TINY_ARCH), device="cpu", profile=RunProfile(half=False, tile=tile, tile_pad=5,
        fallback_tile=8, channels_last=True, resize_on_device=True))
    reference = reference_enhancer(tiny_checkpoint, TINY_ARCH, tile=tile, tile_pad=5)

    out = ours.upscale(frames, outscale)

    assert out.shape == (2, 37 * outscale, 45 * outscale, 3)
    for i, frame in enumerate(frames):
        expected, _ = reference.enhance(frame, outscale=outscale)
        diff = np.abs(out[i].astype(int) - expected.astype(int))
        # float Lanczos vs OpenCV's fixed point: off by one now and then, never more
        assert diff.max() <= 1 and (diff == 0).mean() > (0.9 if outscale == 4 else 0.7)


@pytest.mark.parametrize("frames, h, w, budget, expected", [
    (4, 480, 640, None, (4, 0)),                       # no budget: everything at once
    (4, 480, 640, 80 * 2**30, (4, 0)),                 # plenty: whole frames, the full batch
    (4, 480, 640, 4 * 2**30, (2, 0)),                  # two frames fit
    (4, 1080, 1920, 15 * 2**30, (1, 0)),               # a T4-class card: one 1080p frame at a time
    (1, 2160, 3840, 15 * 2**30, (1, 1728)),            # 4K does not fit whole: the largest tile that does
    (1, 2160, 3840, 1 * 2**30, (1, 432)),
    (1, 2160, 3840, 10 * 2**20, (1, 64)),              # never below 64 px
])
def test_plan_forward_fits_the_memory_budget(frames, h, w, budget, expected):
    assert plan_forward(frames, h, w, tile_pad=10, budget_bytes=budget) == expected
    per_pass, tile = expected
    if budget and tile:
        assert BYTES_PER_INPUT_PIXEL * (tile + 20) ** 2 <= budget or tile == 64
    elif budget:
        assert BYTES_PER_INPUT_PIXEL * h * w * per_pass <= budget


def test_auto_tiles_under_a_small_budget_equal_the_whole_frame_result(tiny_checkpoint):
    frames = random_frames(3, 40, 56)
    model = load_model(tiny_checkpoint, TINY_ARCH)
    whole = Upscaler(model, device="cpu", profile=RunProfile(half=False, tile=0, tile_pad=8, fallback_tile=16, batch_frames=3))
    budget = BYTES_PER_INPUT_PIXEL * 40 * 56 * 2  # two frames per pass
    split = Upscaler(model, device="cpu", profile=RunProfile(half=False, tile=0, tile_pad=8, fallback_tile=16, batch_frames=3,
                     memory_budget_bytes=budget))
    tiled = Upscaler(model, device="cpu", profile=RunProfile(half=False, tile=0, tile_pad=8, fallback_tile=16, batch_frames=3,
                     memory_budget_bytes=BYTES_PER_INPUT_PIXEL * 36 * 36))  # 36 px padded: 16 px tiles

    reference = whole.upscale(frames, 4)
    assert np.abs(split.upscale(frames, 4).astype(int) - reference.astype(int)).max() <= 1
    # tiles change the pixels near their seams only a little (the reference itself is tiled)
    assert np.abs(tiled.upscale(frames, 4).astype(int) - reference.astype(int)).mean() < 2


def test_out_of_memory_on_whole_frames_falls_back_to_tiles(caplog):
    frames = random_frames(2, 40, 40)
    flaky = Upscaler(RunsOutOfMemoryAbove(make_tiny_model(), limit=16 + 2 * 4), device="cpu", profile=RunProfile(half=False,
                     tile=0, tile_pad=4, fallback_tile=16, batch_frames=2))
    out = flaky.upscale(frames, 4)
    expected = tiny_upscaler(tile=16, tile_pad=4).upscale(frames, 4)
    assert np.abs(out.astype(int) - expected.astype(int)).max() <= 1
    assert "전체 프레임 → 16" in caplog.text


def test_compiled_engine_equals_the_eager_one_and_keeps_its_shape(tiny_checkpoint):
    frames = random_frames(3, 24, 32)
    model = load_model(tiny_checkpoint, TINY_ARCH)
    eager = Upscaler(model, device="cpu", profile=RunProfile(half=False, tile=0, tile_pad=4, fallback_tile=16, batch_frames=2))
    compiled = Upscaler(load_model(tiny_checkpoint, TINY_ARCH), device="cpu", profile=RunProfile(half=False, tile=0, tile_pad=4,
                        fallback_tile=16, batch_frames=2, engine="compile"))
    shapes = []
    compiled.model.register_forward_pre_hook(lambda module, args: shapes.append(tuple(args[0].shape)))

    out = compiled.upscale(frames, 2)  # 3 frames in passes of 2: the last pass is padded to 2

    assert np.abs(out.astype(int) - eager.upscale(frames, 2).astype(int)).max() <= 1
    assert out.shape == (3, 48, 64, 3)
    assert set(shapes) == {(2, 3, 24, 32)}


@pytest.mark.parametrize("outscale", [4, 2])
def test_sixteen_bit_frames_equal_realesrganer_enhance(tiny_checkpoint, outscale):
    # Sources deeper than 8 bits travel as 16-bit frames; RealESRGANer takes 16-bit images the same way
    frames = (random_frames(2, 29, 35).astype(np.uint16) * 257 + np.random.default_rng(5).integers(0, 257, (2, 29, 35, 3))
              ).astype(np.uint16)
    ours = Upscaler(load_model(tiny_checkpoint, TINY_ARCH), device="cpu",
                    profile=RunProfile(tile=16, tile_pad=5, fallback_tile=8))
    reference = reference_enhancer(tiny_checkpoint, TINY_ARCH, tile=16, tile_pad=5)

    out = ours.upscale(frames, outscale)

    assert out.dtype == np.uint16 and out.shape == (2, 29 * outscale, 35 * outscale, 3)
    for i, frame in enumerate(frames):
        expected, _ = reference.enhance(frame, outscale=outscale)
        assert expected.dtype == np.uint16
        diff = np.abs(out[i].astype(int) - expected.astype(int))
        assert diff.max() <= 2 and (diff <= 1).mean() > 0.99, diff.max()


def test_the_compiled_engine_compiles_once_for_every_frame_size(tiny_checkpoint):
    from torch._dynamo.utils import counters

    compiled = Upscaler(load_model(tiny_checkpoint, TINY_ARCH), device="cpu",
                        profile=RunProfile(tile=0, tile_pad=4, fallback_tile=16, batch_frames=2, engine="compile"))
    assert compiled.warm_up([(32, 24)]) > 0
    graphs = counters["stats"]["unique_graphs"]

    for h, w in ((20, 28), (36, 44), (18, 62)):  # sizes the warm-up never saw
        frames = random_frames(2, h, w)
        eager = Upscaler(load_model(tiny_checkpoint, TINY_ARCH), device="cpu",
                         profile=RunProfile(tile=0, tile_pad=4, fallback_tile=16, batch_frames=2))
        assert np.abs(compiled.upscale(frames, 4).astype(int) - eager.upscale(frames, 4).astype(int)).max() <= 1

    assert counters["stats"]["unique_graphs"] == graphs  # nothing compiled after the warm-up


def natural_frames(n: int, h: int, w: int) -> np.ndarray:
    """Frames with smooth gradients, fine detail and film grain (a Mandelbrot zoom), as ffmpeg makes them."""
    import subprocess

    raw = subprocess.run(["ffmpeg", "-nostdin", "-loglevel", "error", "-f", "lavfi", "-i",
                          f"mandelbrot=size={w}x{h}:rate=10,noise=alls=6:allf=t+u", "-frames:v", str(n),
                          "-f", "rawvideo", "-pix_fmt", "bgr24", "-"], check=True, capture_output=True).stdout
    return np.frombuffer(raw, np.uint8).reshape(n, h, w, 3).copy()


@pytest.mark.parametrize("name", list(MODELS))
def test_bfloat16_on_the_cpu_stays_within_40_db_of_fp32(shared_weights_dir, name):
    # The CPU profile as "auto" picks it on CPUs that multiply bf16 (forced here, whatever this CPU is)
    spec = MODELS[name]
    settings = Settings(weights_dir=shared_weights_dir, cpu_precision="bf16")
    [ours] = load_engine(settings, "cpu", spec=spec)
    assert ours.dtype == torch.bfloat16 and "bfloat16" in ours.describe()
    frames = natural_frames(2, 48, 64)
    reference = reference_enhancer(shared_weights_dir / spec.weights_file, spec.arch, tile=128, tile_pad=5)

    out = ours.upscale(frames, 4)

    for got, frame in zip(out, frames):
        expected, _ = reference.enhance(frame, outscale=4)
        assert psnr(got, expected) >= 40


def test_auto_precision_follows_the_cpu(tmp_path, monkeypatch):
    from echoshot_ai_server.app import wiring

    for flags, bf16 in (("fpu sse avx2 avx512f", False), ("fpu avx512f avx512_bf16", True), ("amx_bf16 amx_tile", True)):
        cpuinfo = tmp_path / "cpuinfo"
        cpuinfo.write_text(f"processor : 0\nflags : {flags}\n")
        monkeypatch.setattr(wiring, "cpu_multiplies_bf16", lambda path=cpuinfo: cpu_multiplies_bf16(path))
        assert run_profile(Settings(), "cpu").bf16 is bf16
        assert run_profile(Settings(cpu_precision="fp32"), "cpu").bf16 is False
    assert cpu_multiplies_bf16(tmp_path / "missing") is False
