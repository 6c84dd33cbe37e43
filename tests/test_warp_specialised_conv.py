"""The warp-specialised Gluon kernels (engine/warp_specialised_conv.py): which of the trunk's layers take
them, and that each shipped specialisation compiles for Hopper. CI has no GPU and Gluon does not run
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
    source = warp_specialised_conv.source_for(cin, cout, tile, grow=32 if kind == "sums" else 0)
    kernel = triton.compile(source, target=GPUTarget("cuda", 90, 32), options={"num_warps": 4})
    ptx = kernel.asm["ptx"]
    assert f"wgmma.mma_async.sync.aligned.m64n{cout}k16" in ptx
    assert re.search(r"cp\.async\.bulk\.tensor\.2d\.shared::\w+\.global", ptx)  # TMA loads
    assert "cp.async.bulk.tensor.2d.global.shared" in ptx  # and TMA stores
    assert kernel.metadata.num_warps > 8  # two consumer warpgroups and the producer
    assert kernel.metadata.shared <= HOPPER_SHARED_MEMORY


def record_trunk(monkeypatch, warp_specialised: bool) -> list:
    """The trunk's launches (recorded, not run) of a one-RRDB model as if on a Hopper GPU."""
    monkeypatch.setattr(warp_specialised_conv, "available", lambda device: True)
    monkeypatch.setattr(fused_trunk, "WARP_SPECIALISED", warp_specialised)

    def launch_args(src, weight, bias, out, res, frame, tile, scale=1.0, slope=0.2, grow=0):
        return (1,), (src, out, res), dict(tile=tile, grow=grow, scale=scale)

    monkeypatch.setattr(warp_specialised_conv, "launch_args", launch_args)
    fused = FusedRRDBNet(build_model(RRDBNetArch(num_feat=64, num_block=1, num_grow_ch=32)))
    with launches_recorded() as launches, torch.no_grad():
        fused.trunk(pad_frames(torch.rand(1, 64, 5, 6), 64), (5, 6))
    return launches


def test_conv5_and_the_later_dense_steps_take_the_warp_specialised_kernel(monkeypatch):
    launches = record_trunk(monkeypatch, warp_specialised=True)
    gluon = [(args, kwargs) for kernel, _, args, kwargs in launches if kernel is warp_specialised_conv.conv3x3_ws_kernel]
    triton_kernel = [kernel for kernel, *_ in launches if kernel is fused_trunk.conv3x3_kernel]
    tiles = warp_specialised_conv.TILES
    step2, step3, conv5 = tiles[(32, 64, "sums")], tiles[(32, 32, "sums")], tiles[(192, 64, "residual")]
    # each RDB: dense steps 2 and 3; conv5 in the first two (the third adds the RRDB's residual too)
    assert [kwargs["tile"] for _, kwargs in gluon] == [step2, step3, conv5, step2, step3, conv5, step2, step3]
    for (src, out, res), kwargs in gluon:
        if kwargs["grow"]:  # a dense step adds the partial sums it overwrites
            assert res is out and kwargs["grow"] == 32 and src.shape[1] == 32
        else:  # conv5: times 0.2 plus the dense block's input, into the next block's buffer
            assert kwargs["scale"] == 0.2 and res.data_ptr() == src.data_ptr() and out.data_ptr() != src.data_ptr()
    # dense steps 0 and 1 of each RDB, the third RDB's conv5, conv_body
    assert len(triton_kernel) == 3 * 2 + 1 + 1


def test_without_them_every_layer_runs_in_the_triton_kernel(monkeypatch):
    launches = record_trunk(monkeypatch, warp_specialised=False)
    assert {kernel for kernel, *_ in launches} == {fused_trunk.conv3x3_kernel}
    assert len(launches) == 3 * 5 + 1


@pytest.mark.parametrize("layer, expected", [
    (dict(cin=192, cout=64, bias=True, lrelu=False, grow=0, sums_in=False, residuals=1), (192, 64, "residual")),
    (dict(cin=32, cout=64, bias=False, lrelu=True, grow=32, sums_in=True, residuals=0), (32, 64, "sums")),
    (dict(cin=32, cout=32, bias=False, lrelu=True, grow=32, sums_in=True, residuals=0), (32, 32, "sums")),
    (dict(cin=64, cout=128, bias=True, lrelu=True, grow=32, sums_in=False, residuals=0), None),  # dense step 0
    (dict(cin=64, cout=64, bias=True, lrelu=False, grow=0, sums_in=False, residuals=1), None),  # conv_body
    (dict(cin=192, cout=64, bias=True, lrelu=False, grow=0, sums_in=False, residuals=0), None),
])
def test_tile_shapes_by_the_layers_kind(layer, expected):
    tile = warp_specialised_conv.tile_for(**layer)
    assert tile == (warp_specialised_conv.TILES[expected] if expected else None)


def test_off_the_gpu_they_are_not_available():
    assert not warp_specialised_conv.available(torch.device("cpu"))
