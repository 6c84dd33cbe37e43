"""The fused engine (echoshot_ai_server/engine/fused_trunk.py) computes RRDBNet: its Triton kernel runs in
Triton's interpreter here (CI has no GPU), in a subprocess because the interpreter is chosen at import."""

import os
import subprocess
import sys

import pytest
import torch

from conftest import REPO_ROOT, TINY_ARCH
from echoshot_ai_server.engine.fused_trunk import fused_unsupported_reason
from echoshot_ai_server.engine.models import build_model
from echoshot_ai_server.engine.specs import RRDBNetArch
from echoshot_ai_server.engine.upscaler import resolve_engine

PRELUDE = """
import sys, numpy as np, torch
sys.path[:0] = [{repo!r}]
from echoshot_ai_server.engine.models import build_model
from echoshot_ai_server.engine.specs import RRDBNetArch
from echoshot_ai_server.engine.upscaler import RunProfile, Upscaler
torch.manual_seed(0)

def random_model(feat, blocks, grow):
    model = build_model(RRDBNetArch(num_feat=feat, num_block=blocks, num_grow_ch=grow)).eval()
    for module in model.modules():
        if isinstance(module, torch.nn.Conv2d):
            module.reset_parameters()  # ESRGAN's init scales the dense blocks down; keep the activations lively
    return model
"""

MODEL_CHECK = """
from echoshot_ai_server.engine.fused_trunk import FusedRRDBNet
model = random_model(64, 2, 32)  # RealESRGAN_x4plus's widths, two blocks
x = torch.rand(2, 3, 9, 11)
fused = FusedRRDBNet(model)
with torch.no_grad():
    expected = model(x)
    trunk = fused.trunk(fused.head(x), (9, 11))  # what forward() does, the trunk kept for the check below
    got = fused.tail(trunk, 2, 9, 11)
error = ((got - expected).norm() / expected.norm()).item()
assert got.shape == expected.shape and error < 1e-4, error
print("relative error", error)

# RRDBNet's own tail, compiled on a thread of its own, takes over from the Triton tail
assert fused.tail == fused._triton_tail
fused.compile_tail_in_background(2, [(5, 4), (7, 6)]).join()
assert fused.tail != fused._triton_tail
with torch.inference_mode():
    compiled = fused.tail(trunk, 2, 9, 11)
error = ((compiled - expected).norm() / expected.norm()).item()
assert error < 1e-4, error
# a tail that cannot compile leaves the eager one serving
broken = FusedRRDBNet(model)
broken._tail = lambda *args: 1 / 0
broken.compile_tail_in_background(2, [(5, 4)]).join()
assert broken.tail == broken._triton_tail
print("compiled tail error", error)
"""

TAIL_CHECK = """
from torch.nn import functional as F
from echoshot_ai_server.engine.fused_trunk import PackedConv, TapShares, pad_frames, unpad_frames, zero_ring
up = torch.nn.Conv2d(16, 16, 3, padding=1)
x = torch.randn(2, 16, 5, 7)
expected = F.leaky_relu(up(F.interpolate(x, scale_factor=2, mode="nearest")), 0.2)
# the larger buffer: garbage inside (the kernel must write every pixel), zeros only on the ring
larger = zero_ring(torch.full((2 * 12 * 16, 16), float("nan")), 2, 10, 14)
PackedConv.up(up, torch.float32)(pad_frames(x, 16), larger, (5, 7), lrelu=True)
frames = larger.view(2, 12, 16, 16)
assert not frames.isnan().any() and frames[:, 0].eq(0).all() and frames[:, :, -1].eq(0).all()
error = ((unpad_frames(larger, 2, 10, 14) - expected).norm() / expected.norm()).item()
assert error < 1e-5, error
# conv_hr + LeakyReLU + conv_last: conv_hr's kernel stores each tap's share of conv_last's 3 outputs,
# ring rows included (zeros there), and TapShares adds the nine up
hr, last = torch.nn.Conv2d(16, 16, 3, padding=1), torch.nn.Conv2d(16, 3, 3, padding=1)
expected = last(F.leaky_relu(hr(x), 0.2))
taps = TapShares(last, torch.float32)
assert taps.weight.shape == (16, 32) and not taps.weight[:, 27:].any()  # 9 taps x 3 outputs, padded
assert torch.equal(taps.weight[:, 3 * 5:3 * 6], last.weight[:, :, 1, 2].t())  # tap 5: row 1, column 2
src = pad_frames(x, 16)
shares = taps.buffer(src.shape[0], src).fill_(float("nan"))  # the kernel must write every share it is read for
PackedConv.of(hr, torch.float32)(src, shares, (5, 7), lrelu=True, project=taps)
assert not shares[:, :, :3].isnan().any() and shares.view(9, 2, 7, 9, 4)[:, :, 0, :, :3].eq(0).all()
got = taps(shares, 2, 5, 7)
error = ((got - expected).norm() / expected.norm()).item()
assert got.shape == expected.shape and error < 1e-5, error
print("ok")
"""

RECORD_CHECK = """
from echoshot_ai_server.engine import fused_trunk
from echoshot_ai_server.engine.fused_trunk import FusedRRDBNet, distinct_launches, launches_recorded
model = random_model(64, 2, 32)
fused = FusedRRDBNet(model)
with launches_recorded() as launches, torch.no_grad():
    fused(torch.rand(2, 3, 9, 11))
    fused(torch.rand(2, 3, 6, 5))  # another size: the same kernels
# per size: 2 blocks x 3 dense blocks x (4 dense steps + conv5), conv_body, the tail's 4 convolutions
assert len(launches) == 2 * (2 * 3 * 5 + 1 + 4), len(launches)
# distinct kernels: the 4 dense steps, conv5 with one residual and with two, conv_body, the
# up-sampling (both), conv_hr (storing conv_last's shares), the sum of the shares
assert len(distinct_launches(launches)) == 10, len(distinct_launches(launches))
# the tail's convolutions take the larger size class's tile shapes whatever the frame's size
assert {conv.tuned_class for conv in (fused.up1, fused.up2, fused.conv_hr)} == {1}
klass = lambda args: args[-4]  # (..., size_class, slope, scale, scale2)
assert {klass(args) for _, _, args, _ in launches[-4:-1]} == {1}, [klass(args) for _, _, args, _ in launches[-4:-1]]
assert launches[-1][0] == fused_trunk.taps_sum_kernel  # conv_last adds up its shares
with torch.no_grad():  # and once no longer recording, the kernels run again
    expected = model(torch.rand(1, 3, 5, 4).fill_(0.5))
    got = fused(torch.rand(1, 3, 5, 4).fill_(0.5))
assert ((got - expected).norm() / expected.norm()).item() < 1e-4
# the warm-up's shortcut: its dry pass hands the recorded launches to the compiler; if compiling
# fails, start-up goes on (the batches compile the kernels one by one) and nothing is left recording
import logging
up = Upscaler(random_model(16, 1, 16), device="cpu", profile=RunProfile(half=False, tile=0, tile_pad=4, fallback_tile=8,
              batch_frames=2, engine="fused"))
handed = []
fused_trunk.compile_launches = lambda launches, workers: handed.append(len(launches)) or 0
up._compile_side_by_side([np.zeros((2, 6, 5, 3), np.uint8)])
assert handed == [3 * 5 + 1 + 4], handed  # one block: 3 dense blocks x 5 launches; conv_body; the tail
def broken(launches, workers):
    raise RuntimeError("no compiler here")
fused_trunk.compile_launches = broken
warnings = []
logging.getLogger("echoshot_ai_server.engine.upscaler").addHandler(type("H", (logging.Handler,), {"emit": lambda self, r: warnings.append(r.getMessage())})())
up._compile_side_by_side([np.zeros((2, 6, 5, 3), np.uint8)])
assert any("side by side failed" in w for w in warnings) and not fused_trunk.recording(), warnings
print("ok")
"""

ENGINE_CHECK = """
frames = np.random.default_rng(1).integers(0, 256, (3, 10, 14, 3), dtype=np.uint8)
other_size = np.random.default_rng(2).integers(0, 256, (2, 7, 19, 3), dtype=np.uint8)
def upscaler(engine):
    torch.manual_seed(0)
    return Upscaler(random_model(16, 1, 16), device="cpu", profile=RunProfile(half=False, tile=0, tile_pad=4, fallback_tile=8,
                    batch_frames=2, engine=engine))
eager, fused = upscaler("eager"), upscaler("fused")
assert fused.engine == "fused" and fused.fixed_shapes
shapes = []
engine_forward = fused.forward
fused.forward = lambda x: (shapes.append(tuple(x.shape)), engine_forward(x))[1]
for scale in (4, 2):
    got, expected = fused.upscale(frames, scale), eager.upscale(frames, scale)  # 3 frames: the last pass padded to 2
    assert got.shape == expected.shape == (3, 10 * scale, 14 * scale, 3), got.shape
    diff = np.abs(got.astype(int) - expected.astype(int)).max()
    assert diff <= 1, diff
assert set(shapes) == {(2, 3, 10, 14)}, shapes
# the same engine takes a frame size it has not seen (kernels take the size at run time)
got, expected = fused.upscale(other_size, 4), eager.upscale(other_size, 4)
assert np.abs(got.astype(int) - expected.astype(int)).max() <= 1
# by default the tail runs in the Triton kernels: nothing to compile
assert eager.compile_tail() is None
fused.forward = engine_forward
assert fused.compile_tail() is None and fused.forward.tail == fused.forward._triton_tail
# GPU_TAIL_COMPILE: background (RRDBNet's tail compiled on a thread takes over) and start (compiled
# with the rest, before the worker is ready): the same pixels
def with_tail(when):  # the same weights as `eager`
    torch.manual_seed(0)
    return Upscaler(random_model(16, 1, 16), device="cpu", profile=RunProfile(half=False, tile=0, tile_pad=4,
                    fallback_tile=8, batch_frames=2, engine="fused", tail_compile=when))
background, start = with_tail("background"), with_tail("start")
background.compile_tail([(14, 10)]).join()
assert background.forward.tail != background.forward._triton_tail
assert start.compile_tail() is None and start.forward.tail != start.forward._triton_tail
for other in (background, start):
    assert np.abs(other.upscale(other_size, 4).astype(int) - expected.astype(int)).max() <= 1
print("ok")
"""


def run_in_interpreter(check: str) -> None:
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    code = PRELUDE.format(repo=str(REPO_ROOT)) + check
    run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]


def test_fused_trunk_equals_rrdbnet():
    run_in_interpreter(MODEL_CHECK)


def test_dense_steps_keep_their_partial_sums_where_the_later_features_go():
    """Step j writes from x_(j+1)'s channels to the buffer's end: its own convolution, then partial
    sums in the channels of features not written yet; its weight columns line up with that."""
    from echoshot_ai_server.engine.fused_trunk import dense_step_views, dense_steps

    rdb = build_model(RRDBNetArch(num_feat=64, num_block=1, num_grow_ch=32)).body[0].rdb1
    buf = torch.zeros(7, 64 + 4 * 32)
    for j, step in enumerate(dense_steps(rdb, 64, 32, torch.float32)):
        src, out = dense_step_views(buf, j, 64, 32)
        first = 0 if j == 0 else 64 + (j - 1) * 32
        assert (src.shape[1], src.data_ptr()) == (step.cin, buf[:, first:].data_ptr())
        assert (out.shape[1], out.data_ptr()) == ((4 - j) * 32, buf[:, 64 + j * 32:].data_ptr())
        assert step.cout == out.shape[1] and (step.cout1, step.cout2) == {0: (128, 0), 1: (64, 32)}.get(j, (step.cout, 0))
        # every bias is added where its convolution starts, in step 0
        targets = [rdb.conv1, rdb.conv2, rdb.conv3, rdb.conv4][j:]
        assert torch.equal(step.bias, torch.cat([c.bias for c in targets]) if j == 0 else torch.zeros(out.shape[1]))
        assert step.has_bias == (j == 0)


def test_each_up_sampling_phase_is_packed_as_its_four_taps():
    """Phase (a, b) of "nearest 2x + 3x3" sees rows a, a + 1 and columns b, b + 1 of the small image's
    3x3 window; its other five taps are zeros, which the kernel does not multiply."""
    from echoshot_ai_server.engine.fused_trunk import PackedConv
    from echoshot_ai_server.engine.subpixel import phase_weights

    conv = torch.nn.Conv2d(8, 16, 3, padding=1)
    weight, _ = phase_weights(conv)
    by_phase = weight.reshape(2, 2, 16, 8, 3, 3)
    packed = PackedConv.up(conv, torch.float32)
    assert packed.weight.shape == (4 * 4 * 8, 16)
    blocks = packed.weight.reshape(4, 2, 2, 8, 16)  # [phase, row, column, in, out]
    for a in range(2):
        for b in range(2):
            kept = torch.zeros(3, 3, dtype=torch.bool)
            kept[a:a + 2, b:b + 2] = True
            assert not by_phase[a, b][..., ~kept].any()
            assert torch.equal(blocks[2 * a + b], by_phase[a, b][..., a:a + 2, b:b + 2].permute(2, 3, 1, 0))


def test_tail_kernels_put_each_phase_of_the_up_sampling_in_place_and_sum_conv_last_from_its_shares():
    # nearest 2x + conv + LeakyReLU written straight into the larger padded buffer, its ring kept zero;
    # conv_hr storing conv_last's per-tap shares, which are then added up
    run_in_interpreter(TAIL_CHECK)


def test_a_dry_pass_records_each_kernel_to_compile_once():
    # the warm-up compiles the recorded kernels side by side before running anything
    run_in_interpreter(RECORD_CHECK)


def test_fused_engine_equals_the_eager_one_and_keeps_its_shape():
    # batches padded to a fixed shape, the x2 resize after the x4 network, the tail's three ways
    run_in_interpreter(ENGINE_CHECK)


def test_engine_choice(monkeypatch, caplog):
    x4plus_like = build_model(RRDBNetArch(num_feat=16, num_block=1, num_grow_ch=16))
    assert fused_unsupported_reason(x4plus_like, torch.device("cpu")) is None
    assert "power-of-two" in fused_unsupported_reason(build_model(TINY_ARCH), torch.device("cpu"))
    assert "x4" in fused_unsupported_reason(build_model(RRDBNetArch(num_feat=16, num_block=1, num_grow_ch=16, scale=2)),
                                            torch.device("cpu"))
    # Cards before Hopper have no TMA: `auto` takes torch.compile, an explicit `fused` says why it cannot
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 5))
    cuda = torch.device("cuda")
    assert "compute capability 9.0" in fused_unsupported_reason(x4plus_like, cuda)
    assert resolve_engine("auto", x4plus_like, cuda) == "compile"
    assert caplog.text == ""
    assert resolve_engine("fused", x4plus_like, cuda) == "compile"
    assert "TMA" in caplog.text
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    assert resolve_engine("auto", x4plus_like, cuda) == "fused"
    for engine in ("compile", "eager"):
        assert resolve_engine(engine, x4plus_like, cuda) == engine


@pytest.mark.parametrize("engine", ["auto", "fused", "compile", "eager"])
def test_engine_setting(engine):
    from echoshot_ai_server.config import Settings
    from echoshot_ai_server.app.wiring import run_profile

    assert run_profile(Settings(gpu_engine=engine), "gpu").engine == engine
    assert run_profile(Settings(gpu_engine=engine), "cpu").engine == "eager"


def test_launch_grid(monkeypatch):
    from types import SimpleNamespace

    from echoshot_ai_server.engine.fused_trunk import launch_grid

    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device=0: SimpleNamespace(multi_processor_count=132))
    rows = 4 * 482 * 642  # four padded 640x480 frames
    assert launch_grid(rows, {"BLOCK_M": 256, "PER_SM": 0}) == (4836,)  # one program per tile
    assert launch_grid(rows, {"BLOCK_M": 256, "PER_SM": 1}) == (132,)  # persistent: one per multiprocessor
    assert launch_grid(rows, {"BLOCK_M": 128, "PER_SM": 2}) == (264,)
    assert launch_grid(1000, {"BLOCK_M": 256, "PER_SM": 2}) == (4,)  # never more programs than tiles


def test_kernels_are_tuned_per_size_class_not_per_frame_size():
    from echoshot_ai_server.engine.fused_trunk import SIZE_CLASS_ROWS, conv3x3_kernel, conv3x3_tuned, size_class

    # what the autotuner keys on, and what the compiler may specialise on: never the frame's size
    assert conv3x3_tuned.keys == ["CIN", "COUT", "size_class", "SHUFFLE", "PROJECT"]
    sizes = {"rows", "frame_rows", "row_pitch", "H", "W", "size_class"}
    unspecialised = {conv3x3_kernel.arg_names[i] if isinstance(i, int) else i for i in conv3x3_kernel.do_not_specialize}
    assert sizes <= unspecialised
    # 4 frames of 640x480 and of 176x144 share a class; 720p and 1080p share the other
    rows = lambda w, h: 4 * (w + 2) * (h + 2)  # noqa: E731
    assert size_class(rows(176, 144)) == size_class(rows(640, 480)) == 0
    assert size_class(rows(1280, 720)) == size_class(rows(1920, 1080)) == 1 == len(SIZE_CLASS_ROWS)


def test_each_kind_of_convolution_has_its_own_tuning_key():
    from echoshot_ai_server.engine.fused_trunk import SIZE_CLASS_ROWS, PackedConv

    conv = torch.nn.Conv2d(64, 64, 3, padding=1)
    small, large = 1000, SIZE_CLASS_ROWS[-1]
    assert PackedConv.of(conv, torch.float32).tuning_key(small) == (64, 64, 0, 0)
    assert PackedConv.of(conv, torch.float32).tuning_key(large) == (64, 64, 1, 0)
    # the tail's: the larger class's whatever the rows, up-sampling phases and conv_hr storing shares apart
    assert PackedConv.up(conv, torch.float32, tuned_class=1).tuning_key(small) == (64, 64, 1, 1)
    assert PackedConv.of(conv, torch.float32, tuned_class=1).tuning_key(small, project=True) == (64, 64, 1, 2)


def test_the_tile_sweep_times_each_layer_under_the_key_it_is_launched_with():
    import importlib.util

    from echoshot_ai_server.engine.fused_trunk import FusedRRDBNet

    # bench/layers.py sets a layer's tile shape in TUNED under this key before timing it; a key the layer
    # does not look up (conv_hr as a plain convolution, once) times the shipped shape under every label
    sys.path.insert(0, str(REPO_ROOT / "bench"))
    try:
        spec = importlib.util.spec_from_file_location("layers_bench", REPO_ROOT / "bench" / "layers.py")
        layers = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(layers)
    finally:
        sys.path.remove(str(REPO_ROOT / "bench"))
    fused = FusedRRDBNet(build_model(RRDBNetArch(num_feat=64, num_block=1, num_grow_ch=32)))
    rows = 4 * 482 * 642
    steps, conv5 = fused.blocks[0][0]
    assert layers.key_of("conv_hr", fused.conv_hr, rows) == (64, 64, 1, 2)  # storing conv_last's shares
    assert layers.key_of("up2", fused.up2, rows) == (64, 64, 1, 1)
    assert layers.key_of("conv5", conv5, rows) == (192, 64, 0, 0)
    assert layers.key_of("dense step 1", steps[1], rows) == (32, 96, 0, 0)


def test_kernel_cache_folders_are_keyed_by_gpu_and_versions(monkeypatch, tmp_path):
    from types import SimpleNamespace

    import triton

    from echoshot_ai_server.engine import device

    def folder_for(name, major):
        monkeypatch.setattr(torch.cuda, "get_device_properties", lambda index=0: SimpleNamespace(name=name, major=major, minor=0))
        return device.use_kernel_cache(tmp_path)

    h100 = folder_for("NVIDIA H100 80GB HBM3", 9)
    assert h100.parent == tmp_path and (h100 / "triton").is_dir() and (h100 / "inductor").is_dir()
    assert "H100" in h100.name and "sm90" in h100.name and f"triton{triton.__version__}" in h100.name
    assert torch.__version__.split("+")[0] in h100.name
    assert os.environ["TRITON_CACHE_DIR"] == str(h100 / "triton")
    assert folder_for("Tesla T4", 7) != h100  # other hardware tunes its own kernels
    assert folder_for("NVIDIA H100 80GB HBM3", 9) == h100


def test_tuned_tile_shapes_are_kept_between_processes(tmp_path):
    import json

    import triton

    from echoshot_ai_server.engine import fused_trunk

    saved, saved_autotuner = dict(fused_trunk.TUNED), dict(fused_trunk.conv3x3_tuned.cache)
    try:
        fused_trunk.TUNED.clear()
        fused_trunk.conv3x3_tuned.cache.clear()
        fused_trunk.TUNED[(64, 128, 0, 0)] = triton.Config(
            {"BLOCK_M": 256, "BLOCK_K": 64, "PERSISTENT": True, "PER_SM": 1}, num_warps=8, num_stages=3, maxnreg=168)
        # a shape the autotuner tuned in this process, under its own key (the argument dtypes appended)
        fused_trunk.conv3x3_tuned.cache[(64, 64, 1, True, 0, "torch.float32", "torch.float16")] = triton.Config(
            {"BLOCK_M": 128, "BLOCK_K": 32, "PERSISTENT": False, "PER_SM": 0}, num_warps=4, num_stages=4)
        fused_trunk.conv3x3_tuned.cache[(64, 64, 1, False, 32, "torch.float32", "torch.float16")] = triton.Config(
            {"BLOCK_M": 128, "BLOCK_K": 64, "PERSISTENT": False, "PER_SM": 0}, num_warps=4, num_stages=3)
        assert fused_trunk.save_tuned(tmp_path / "tuned.json") == 3

        fused_trunk.TUNED.clear()  # a new process
        fused_trunk.conv3x3_tuned.cache.clear()
        assert fused_trunk.load_tuned(tmp_path / "tuned.json") == 3
        config = fused_trunk.TUNED[(64, 128, 0, 0)]
        assert config.kwargs["BLOCK_M"] == 256 and (config.num_warps, config.num_stages, config.maxnreg) == (8, 3, 168)
        # the up-sampling phases and a convolution storing conv_last's shares are tuned apart from the plain
        # convolutions of the same channels
        assert fused_trunk.TUNED[(64, 64, 1, 1)].kwargs["BLOCK_K"] == 32 and (64, 64, 1, 0) not in fused_trunk.TUNED
        assert fused_trunk.TUNED[(64, 64, 1, 2)].kwargs["BLOCK_K"] == 64
        # files of older formats: keys that end after the size class, or go on with argument dtypes
        older = [{"key": [192, 64, 0, "torch.float32"], "kwargs": {"BLOCK_M": 128, "BLOCK_K": 64, "PERSISTENT": False,
                                                                 "PER_SM": 0}, "num_warps": 4, "num_stages": 4},
                 {"key": [64, 64, 1], "kwargs": {"BLOCK_M": 256, "BLOCK_K": 32, "PERSISTENT": False, "PER_SM": 0},
                  "num_warps": 4, "num_stages": 4}]
        (tmp_path / "older.json").write_text(json.dumps(older))
        # shapes tuned for another version of the kernel (a kernel cache kept over an upgrade) are not
        # taken: the shipped ones for this kernel stay; the shipped file itself is read whatever it says
        assert fused_trunk.load_tuned(tmp_path / "older.json") == 0 and len(fused_trunk.TUNED) == 3
        other = json.loads((tmp_path / "tuned.json").read_text()) | {"kernel": "an older kernel"}
        (tmp_path / "other.json").write_text(json.dumps(other))
        assert fused_trunk.load_tuned(tmp_path / "other.json") == 0 and len(fused_trunk.TUNED) == 3
        assert fused_trunk.load_tuned(tmp_path / "older.json", any_kernel=True) == 2
        assert fused_trunk.TUNED[(192, 64, 0, 0)].maxnreg is None and (64, 64, 1, 0) in fused_trunk.TUNED
        assert len(fused_trunk.TUNED) == 5
        assert fused_trunk.load_tuned(tmp_path / "none.json") == 0
    finally:
        fused_trunk.TUNED.clear()
        fused_trunk.TUNED.update(saved)
        fused_trunk.conv3x3_tuned.cache.clear()
        fused_trunk.conv3x3_tuned.cache.update(saved_autotuner)


def test_the_measured_tile_shapes_for_hopper_ship_with_the_package(monkeypatch):
    import json

    from echoshot_ai_server.engine import fused_trunk

    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    entries = json.loads(fused_trunk.measured_defaults().read_text())
    tuned = {tuple(e["key"]) for e in entries}
    # every convolution of the fused trunk and tail, in both size classes, and the up-sampling phases
    for cin, cout in ((64, 128), (32, 96), (32, 64), (32, 32), (192, 64), (64, 64)):
        assert {(cin, cout, 0, 0), (cin, cout, 1, 0)} <= tuned
    assert {(64, 64, 1, 1), (64, 64, 1, 2)} <= tuned  # the up-sampling phases, conv_hr storing conv_last's shares
    configs = {tuple(c) for c in fused_trunk.TUNING_CONFIGS}
    for e in entries:  # each one of the configurations the autotuner would have chosen from
        k = e["kwargs"]
        assert (k["BLOCK_M"], k["BLOCK_K"], e["num_warps"], e["num_stages"], k["PER_SM"]) in configs
