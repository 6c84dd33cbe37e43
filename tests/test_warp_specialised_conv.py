"""The warp-specialised Gluon kernels (engine/warp_specialised_conv.py): which of the trunk's layers take
them, with what, and that each shipped specialisation compiles for Hopper. CI has no GPU and Gluon does not run
in Triton's interpreter: their pixels are checked against the Triton kernel on a GPU
(bench/gluon_conv.py; BENCHMARKS.md), and off the GPU the Triton kernel serves every layer."""

import re

import pytest
import torch
import triton
from triton.backends.compiler import GPUTarget

from echoshot_ai_server.engine import fused_trunk, warp_specialised_conv
from echoshot_ai_server.engine.fused_trunk import FusedRRDBNet, launches_recorded, pad_frames
from echoshot_ai_server.engine.models import build_model
from echoshot_ai_server.engine.specs import RRDBNetArch

pytestmark = pytest.mark.skipif(warp_specialised_conv.gluon is None, reason="this Triton has no Gluon")

HOPPER_SHARED_MEMORY = 227 * 1024  # the most one program may take on an H100 / H200


@pytest.mark.parametrize("key", sorted(warp_specialised_conv.TILES))
def test_each_shipped_specialisation_compiles_for_hopper(key):
    cin, cout, kind = key
    tile = warp_specialised_conv.TILES[key]
    source = warp_specialised_conv.source_for(cin, cout, tile, kind, grow=32 if kind in ("first", "sums") else 0)
    kernel = triton.compile(source, target=GPUTarget("cuda", 90, 32), options={"num_warps": 4})
    ptx = kernel.asm["ptx"]
    # the output columns in blocks of powers of two: 96 = 64 + 32
    blocks = [64, 32] if cout == 96 else [cout]
    assert sorted(set(re.findall(r"wgmma\.mma_async\.sync\.aligned\.m64n(\d+)k16", ptx)), key=int) == \
        sorted(map(str, blocks), key=int)
    assert re.search(r"cp\.async\.bulk\.tensor\.2d\.shared::\w+\.global", ptx)  # TMA loads
    assert "cp.async.bulk.tensor.2d.global.shared" in ptx  # and TMA stores
    assert kernel.metadata.num_warps > 8  # two consumer warpgroups and the producer
    assert kernel.metadata.shared <= HOPPER_SHARED_MEMORY


def record_trunk(monkeypatch, warp_specialised: bool) -> list:
    """The trunk's launches (recorded, not run) of a one-RRDB model as if on a Hopper GPU."""
    monkeypatch.setattr(warp_specialised_conv, "available", lambda device: True)
    monkeypatch.setattr(fused_trunk, "WARP_SPECIALISED", warp_specialised)

    def launch_args(src, weight, bias, out, frame, tile, kind, *, res1=None, scale=1.0, slope=0.2, grow=0):
        return (1,), (src, out, res1, bias), dict(tile=tile, kind=kind, grow=grow, scale=scale)

    monkeypatch.setattr(warp_specialised_conv, "launch_args", launch_args)
    model = build_model(RRDBNetArch(num_feat=64, num_block=1, num_grow_ch=32))
    for module in model.modules():
        if isinstance(module, torch.nn.Conv2d):
            torch.nn.init.uniform_(module.bias, 0.1, 1.0)
    fused = FusedRRDBNet(model)
    with launches_recorded() as launches, torch.no_grad():
        fused.trunk(pad_frames(torch.rand(1, 64, 5, 6), 64), (5, 6))
    return launches


def test_the_dense_blocks_take_the_warp_specialised_kernel(monkeypatch):
    launches = record_trunk(monkeypatch, warp_specialised=True)
    gluon = [(args, kwargs) for kernel, _, args, kwargs in launches if kernel is warp_specialised_conv.conv3x3_ws_kernel]
    triton_kernel = [kernel for kernel, *_ in launches if kernel is fused_trunk.conv3x3_kernel]
    kinds = ["first", "sums", "sums", "sums", "residual"]
    # the third RDB's conv5 adds the RRDB's input too: the Triton kernel's
    assert [kwargs["kind"] for _, kwargs in gluon] == kinds * 2 + kinds[:4]
    tiles = warp_specialised_conv.TILES
    assert [kwargs["tile"] for _, kwargs in gluon[:5]] == [
        tiles[(64, 128, "first")], tiles[(32, 96, "sums")], tiles[(32, 64, "sums")], tiles[(32, 32, "sums")],
        tiles[(192, 64, "residual")]]
    for i, ((src, out, res1, bias), kwargs) in enumerate(gluon):
        step = i % 5
        if step < 4:  # a dense step: its own 32 columns activated, then the partial sums of the later ones
            assert kwargs["grow"] == 32 and out.shape[1] == 128 - 32 * step and res1 is None
            assert src.shape[1] == (64 if step == 0 else 32)
            assert bool(bias.abs().sum()) == (step == 0)  # every bias enters in step 0
        else:  # conv5: times 0.2 plus the dense block's input, into the next block's buffer
            assert kwargs["scale"] == 0.2 and res1.data_ptr() == src.data_ptr() and out.data_ptr() != src.data_ptr()
    assert len(triton_kernel) == 2  # the third RDB's conv5, conv_body


def test_without_them_every_layer_runs_in_the_triton_kernel(monkeypatch):
    launches = record_trunk(monkeypatch, warp_specialised=False)
    assert {kernel for kernel, *_ in launches} == {fused_trunk.conv3x3_kernel}
    assert len(launches) == 3 * 5 + 1


@pytest.mark.parametrize("layer, expected", [
    (dict(bias=True, lrelu=False, grow=0, sums_in=False, residuals=1), "residual"),  # conv5
    (dict(bias=True, lrelu=False, grow=0, sums_in=False, residuals=2), None),  # the third RDB's conv5
    (dict(bias=False, lrelu=True, grow=32, sums_in=True, residuals=0), "sums"),  # dense steps 1-3
    (dict(bias=True, lrelu=True, grow=32, sums_in=False, residuals=0), "first"),  # dense step 0
    (dict(bias=True, lrelu=False, grow=0, sums_in=False, residuals=0), None),  # a plain convolution
    (dict(bias=True, lrelu=True, grow=0, sums_in=False, residuals=0), None),  # the tail's
    (dict(bias=True, lrelu=True, grow=32, sums_in=True, residuals=0), None),  # no dense step of ours
])
def test_the_layer_kinds(layer, expected):
    assert warp_specialised_conv.kind_of(**layer) == expected


def test_off_the_gpu_they_are_not_available():
    assert not warp_specialised_conv.available(torch.device("cpu"))


def test_a_forward_pass_makes_each_descriptor_once():
    buffer = torch.zeros(1000, 192, dtype=torch.float16)
    make = warp_specialised_conv.descriptor
    assert make(buffer[:, 64:], (128, 64)) is not make(buffer[:, 64:], (128, 64))  # outside: made each time
    with warp_specialised_conv.descriptors_reused():
        first = make(buffer[:, 64:], (128, 64))
        assert make(buffer[:, 64:], (128, 64)) is first  # another view of the same columns
        assert make(buffer[:, 64:], (128, 32)) is not first  # another block
        assert make(buffer[:, 64:128], (128, 64)) is not first  # another shape
        assert make(buffer.view(2000, 96)[:, 32:], (128, 64)).strides != first.strides  # other strides
    assert make(buffer[:, 64:], (128, 64)) is not first  # and none kept after it


def test_launches_after_the_first_go_straight_to_the_compiled_kernel(monkeypatch):
    """The first launch of a specialisation through Triton's JIT; the next ones to the kernel it
    compiled, with every parameter in the kernel's order (constexprs included, as the JIT passes them)."""
    real = warp_specialised_conv.conv3x3_ws_kernel
    through_jit, launched = [], []

    class Compiled:
        function, packed_metadata = "function", "metadata"

        def launch_metadata(self, grid, stream, *args):
            return None

        def run(self, *args):
            launched.append(args)

    class Kernel:  # the JIT's interface: kernel[grid](*args, **constants) returns the compiled kernel
        params = real.params

        def __getitem__(self, grid):
            return lambda *args, **constants: through_jit.append((grid, args, constants)) or Compiled()

    class Driver:
        class active:
            get_current_stream = staticmethod(lambda device: 7)

    monkeypatch.setattr(warp_specialised_conv, "conv3x3_ws_kernel", Kernel())
    monkeypatch.setattr(warp_specialised_conv, "driver", Driver)
    monkeypatch.setattr(warp_specialised_conv, "_compiled", {})
    monkeypatch.setattr(warp_specialised_conv, "_programs", lambda device: 132)
    src = torch.zeros(1000, 192, dtype=torch.float16)
    weight, bias = torch.zeros(9 * 32, 96, dtype=torch.float16), torch.zeros(96)
    grid, args, constants = warp_specialised_conv.launch_args(
        src[:, 64:96], weight, bias, src[:, 96:], (8, 98), warp_specialised_conv.TILES[(32, 96, "sums")], "sums",
        grow=32)
    for _ in range(3):
        warp_specialised_conv.launch(grid, args, constants)
    assert through_jit == [(grid, args, constants)]
    assert len(launched) == 2
    grid_and_stream, bound = launched[0][:7], launched[0][9:]
    assert grid_and_stream == (grid[0], 1, 1, 7, "function", "metadata", None)
    names = [p.name for p in real.params]
    assert len(bound) == len(names)
    assert dict(zip(names, bound)) == {**dict(zip(names, args)), **{k: v for k, v in constants.items() if k in names}}
