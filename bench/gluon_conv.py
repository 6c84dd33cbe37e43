"""The trunk's layers in Gluon against the Triton kernel, each alone.

Three kinds of kernel, each persistent with TMA loads:

- `plain`: conv5 (192 -> 64 channels, K = 1728) with its own software pipeline in one partition;
- `swapped`: the same with output channels as the MMA's M (64) and the tile's pixels as its N. On
  Hopper a warpgroup MMA with both operands in shared memory reads 4 KB a 64x64x16 product, as many
  bytes as shared memory delivers in the 32 cycles the product takes, so at N = 64 it might wait on
  shared memory; swapped, a product reads 10 KB for 128 cycles;
- `warp-specialised`: the engine's kernel (engine/warp_specialised_conv.py): a producer warp, two
  consumer warpgroups taking tiles in turn, epilogue operands in and results out by TMA. Also for
  the dense steps (`--layer step0..step3`; steps 1-3 add partial sums in place), on several tile shapes
  each, some with all the weights kept in shared memory.

On the GPU: each configuration against the Triton kernel (pixels and µs, the layer of the first
dense block on 4 frames of 640x480 with the model's weights; the Triton kernel again at the end,
the clocks drift):

    python bench/gluon_conv.py [--layer conv5|step0|step1|step2|step3] [--kinds plain,swapped,warp-specialised]
        [--size 640x480] --json PATH
Without a GPU: `python bench/gluon_conv.py --compile-only` compiles every configuration for sm90.
"""

import argparse
import json
import re
import sys
from pathlib import Path

import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import fence_async_shared, mbarrier, tma, warpgroup_mma, \
    warpgroup_mma_wait

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "bench")]

from echoshot_ai_server.engine import warp_specialised_conv  # noqa: E402

# (kind, pixels a tile, channels a step, stages[, weights resident]): kinds "swapped" and "plain"
# (`conv5_kernel`), "warp-specialised" (the engine's `warp_specialised_conv.conv3x3_ws_kernel`)
CONFIGS = [
    ("swapped", 256, 64, 3), ("swapped", 256, 64, 4), ("swapped", 256, 32, 5), ("swapped", 256, 32, 8),
    ("swapped", 256, 64, 2), ("swapped", 128, 64, 5), ("swapped", 128, 32, 8),
    ("plain", 256, 64, 3), ("plain", 256, 64, 4), ("plain", 256, 32, 5), ("plain", 128, 64, 5),
    ("warp-specialised", 256, 64, 4, False), ("warp-specialised", 256, 64, 3, False),
    ("warp-specialised", 256, 32, 8, False), ("warp-specialised", 256, 32, 6, False),
    ("warp-specialised", 128, 64, 6, False), ("warp-specialised", 128, 64, 8, False),
]
# the other layers: warp-specialised only, by layer
WS = "warp-specialised"
LAYER_CONFIGS = {
    "step0": [(WS, 128, 64, 4, False), (WS, 128, 64, 5, False), (WS, 128, 32, 8, False), (WS, 128, 32, 10, False),
              (WS, 64, 64, 6, False), (WS, 64, 64, 8, False), (WS, 64, 32, 12, False)],
    "step1": [(WS, 128, 32, 8, True), (WS, 128, 32, 12, True), (WS, 128, 32, 6, True), (WS, 128, 32, 10, False),
              (WS, 64, 32, 12, True), (WS, 64, 32, 16, True)],
    "step2": [(WS, 128, 32, 12, False), (WS, 128, 32, 12, True), (WS, 128, 32, 16, True), (WS, 256, 32, 6, True),
              (WS, 256, 32, 6, False), (WS, 128, 32, 9, False)],
    "step3": [(WS, 256, 32, 6, False), (WS, 256, 32, 6, True), (WS, 256, 32, 8, True), (WS, 128, 32, 12, True),
              (WS, 128, 32, 12, False), (WS, 256, 32, 4, False)],
}
# each layer's (input channels, output channels, kind in warp_specialised_conv.TILES)
SHAPES = {"conv5": (192, 64, "residual"), "step0": (64, 128, "first"),
          "step1": (32, 96, "sums"), "step2": (32, 64, "sums"), "step3": (32, 32, "sums")}


@gluon.jit
def _issue(j, x_desc, w_desc, a_bufs, b_bufs, ready, pid, nprog, row_pitch,
           CIN: gl.constexpr, BP: gl.constexpr, BK: gl.constexpr, S: gl.constexpr, SWAP: gl.constexpr):
    """Start the loads of step j of this program (its tile j // steps): the pixels' rows for one tap and
    channel block, and the weights that multiply them."""
    KS: gl.constexpr = CIN // BK
    steps: gl.constexpr = 9 * KS
    tile = pid + (j // steps) * nprog
    step = j % steps
    tap = step // KS
    k0 = (step % KS) * BK
    shift = (tap // 3 - 1) * row_pitch + (tap % 3 - 1)
    s = j % S
    bar = ready.index(s)
    mbarrier.expect(bar, x_desc.block_type.nbytes + w_desc.block_type.nbytes)
    tma.async_copy_global_to_shared(x_desc, [tile * BP + shift, k0], bar, b_bufs.index(s) if SWAP else a_bufs.index(s))
    if SWAP:  # weights transposed: [COUT, 9 * CIN]
        tma.async_copy_global_to_shared(w_desc, [0, tap * CIN + k0], bar, a_bufs.index(s))
    else:  # [9 * CIN, COUT]
        tma.async_copy_global_to_shared(w_desc, [tap * CIN + k0, 0], bar, b_bufs.index(s))


@gluon.jit
def conv5_kernel(x_desc, w_desc, bias_ptr, out_ptr, res_ptr, stride, rows, frame_rows, row_pitch, H, W, scale,
                 CIN: gl.constexpr, COUT: gl.constexpr, BP: gl.constexpr, BK: gl.constexpr, S: gl.constexpr,
                 SWAP: gl.constexpr):
    """out[row, :COUT] = (conv3x3(x)[row] + bias) * scale + res[row] on the padded rows (zeros on the ring)."""
    KS: gl.constexpr = CIN // BK
    steps: gl.constexpr = 9 * KS
    pid = gl.program_id(0)
    nprog = gl.num_programs(0)
    tiles = gl.cdiv(rows, BP)
    my_tiles = gl.cdiv(tiles - pid, nprog)
    total = my_tiles * steps

    # swapped: the weights' tile is the MMA's A operand and the pixels' tile its B, read transposed
    a_desc = w_desc if SWAP else x_desc
    b_desc = x_desc if SWAP else w_desc
    m: gl.constexpr = COUT if SWAP else BP
    n: gl.constexpr = BP if SWAP else COUT
    a_bufs = gl.allocate_shared_memory(gl.float16, [S, m, BK], a_desc.layout)
    b_bufs = gl.allocate_shared_memory(gl.float16, [S, BP, BK] if SWAP else [S, BK, COUT], b_desc.layout)
    acc_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, n, 16])
    acc = gl.zeros([m, n], gl.float32, acc_layout)
    # the epilogue's layout: each thread 8 consecutive channels of a pixel (16-byte loads and stores)
    out_layout: gl.constexpr = gl.BlockedLayout([8, 1], [8, 4], [1, 4], [0, 1]) if SWAP else \
        gl.BlockedLayout([1, 8], [4, 8], [4, 1], [1, 0])
    ready = gl.allocate_shared_memory(gl.int64, [S, 1], mbarrier.MBarrierLayout())
    for stage in gl.static_range(S):
        mbarrier.init(ready.index(stage), count=1)
    fence_async_shared()

    for j in gl.static_range(S - 1):
        if j < total:
            _issue(j, x_desc, w_desc, a_bufs, b_bufs, ready, pid, nprog, row_pitch, CIN, BP, BK, S, SWAP)

    for i in range(total):
        s = i % S
        step = i % steps
        mbarrier.wait(ready.index(s), (i // S) & 1)
        if SWAP:
            acc = warpgroup_mma(a_bufs.index(s), b_bufs.index(s).permute((1, 0)), acc, use_acc=step != 0,
                                is_async=True)
        else:
            acc = warpgroup_mma(a_bufs.index(s), b_bufs.index(s), acc, use_acc=step != 0, is_async=True)
        # the product before this one is done: its stage takes the load S - 1 steps ahead
        acc = warpgroup_mma_wait(1, deps=[acc])
        if i + S - 1 < total:
            _issue(i + S - 1, x_desc, w_desc, a_bufs, b_bufs, ready, pid, nprog, row_pitch, CIN, BP, BK, S, SWAP)
        if step == steps - 1:
            acc = warpgroup_mma_wait(0, deps=[acc])
            row0 = (pid + (i // steps) * nprog) * BP
            result = gl.convert_layout(acc, out_layout)
            if SWAP:
                channel = gl.arange(0, COUT, layout=gl.SliceLayout(1, out_layout))[:, None]
                row = row0 + gl.arange(0, BP, layout=gl.SliceLayout(0, out_layout))[None, :]
            else:
                channel = gl.arange(0, COUT, layout=gl.SliceLayout(0, out_layout))[None, :]
                row = row0 + gl.arange(0, BP, layout=gl.SliceLayout(1, out_layout))[:, None]
            in_frame = row % frame_rows
            y = in_frame // row_pitch
            x = in_frame % row_pitch
            inside = (y >= 1) & (y <= H) & (x >= 1) & (x <= W)
            live = (row < rows) & (channel < COUT)
            at = row.to(gl.int64) * stride + channel
            res = gl.load(res_ptr + at, mask=live, other=0.0).to(gl.float32)
            value = (result + gl.load(bias_ptr + channel)) * scale + res
            value = gl.where(inside, value, 0.0)
            gl.store(out_ptr + at, value.to(gl.float16), mask=live)

    for stage in gl.static_range(S):
        mbarrier.invalidate(ready.index(stage))


def launch(x, weight, bias, out, frame, config, programs: int, kind: str, res1=None, grow=0):
    if config[0] == WS:
        grid, args, constants = warp_specialised_conv.launch_args(x, weight, bias, out, frame, config[1:], kind,
                                                                  res1=res1, scale=0.2 if res1 is not None else 1.0,
                                                                  grow=grow)
        warp_specialised_conv.conv3x3_ws_kernel[grid](*args, **constants)
        return
    kind, bp, bk, stages = config
    res, scale = res1, 0.2
    h, w = frame
    rows = x.shape[0]
    x_d = warp_specialised_conv.descriptor(x, (bp, bk))  # conv5 only
    w_d = warp_specialised_conv.descriptor(weight, (weight.shape[0], bk) if kind == "swapped" else (bk, weight.shape[1]))
    conv5_kernel[(min(programs, triton.cdiv(rows, bp)),)](
        x_d, w_d, bias, out, res, out.stride(0), rows, (h + 2) * (w + 2), w + 2, h, w, scale,
        CIN=x.shape[1], COUT=bias.shape[0], BP=bp, BK=bk, S=stages, num_warps=4, SWAP=kind == "swapped")


def compile_only() -> int:
    from triton.backends.compiler import GPUTarget
    from triton.experimental.gluon._runtime import GluonASTSource

    layout = gl.NVMMASharedLayout.get_default_for
    everything = [("conv5", c) for c in CONFIGS] + [(layer, c) for layer, cs in LAYER_CONFIGS.items() for c in cs]
    for layer, config in everything:
        cin, cout, ws_kind = SHAPES[layer]
        kind, bp, bk, stages = config[:4]
        if kind == WS:
            source = warp_specialised_conv.source_for(cin, cout, config[1:], ws_kind,
                                                      grow=32 if layer.startswith("step") else 0)
        else:
            swap = kind == "swapped"
            x_block, w_block = [bp, bk], ([cout, bk] if swap else [bk, cout])
            signature = {
                "x_desc": f"tensordesc<fp16[{bp}, {bk}],{layout(x_block, gl.float16)!r}>",
                "w_desc": f"tensordesc<fp16[{w_block[0]}, {w_block[1]}],{layout(w_block, gl.float16)!r}>",
                "bias_ptr": "*fp32", "out_ptr": "*fp16", "res_ptr": "*fp16", "stride": "i32", "rows": "i32",
                "frame_rows": "i32", "row_pitch": "i32", "H": "i32", "W": "i32", "scale": "fp32",
                "CIN": "constexpr", "COUT": "constexpr", "BP": "constexpr", "BK": "constexpr", "S": "constexpr",
                "SWAP": "constexpr"}
            constants = {"CIN": cin, "COUT": cout, "BP": bp, "BK": bk, "S": stages, "SWAP": swap}
            source = GluonASTSource(conv5_kernel, signature, constants)
        try:
            kernel = triton.compile(source, target=GPUTarget("cuda", 90, 32), options={"num_warps": 4})
            mma = sorted(set(re.findall(r"wgmma\.mma_async\.sync\.aligned\.(m\d+n\d+k\d+)", kernel.asm["ptx"])))
            print(layer, *config, "shared", kernel.metadata.shared, "MMA", mma, flush=True)
        except Exception as exc:  # report every configuration
            print(layer, *config, "failed:", " | ".join(str(exc).splitlines()[-3:])[:400], flush=True)
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--compile-only", action="store_true")
    parser.add_argument("--size", default="640x480")
    parser.add_argument("--kinds", default="swapped,plain,warp-specialised")
    parser.add_argument("--layer", choices=tuple(SHAPES), default="conv5")
    args = parser.parse_args()
    if args.compile_only:
        return compile_only()

    import torch

    from echoshot_ai_server.app.wiring import load_engine
    from echoshot_ai_server.config import Settings
    from echoshot_ai_server.engine import fused_trunk
    from model_variants import timed
    from run import matmul_tflops

    fused_trunk.load_tuned(fused_trunk.measured_defaults(), any_kernel=True)
    [upscaler] = load_engine(Settings(), "gpu")
    fused = upscaler.forward
    steps, conv5 = fused.blocks[0][0]
    w, h = (int(v) for v in args.size.split("x"))
    rows = 4 * (h + 2) * (w + 2)
    torch.manual_seed(0)
    start = fused_trunk.zero_ring(torch.randn(rows, 192, device="cuda", dtype=torch.float16) * 0.5, 4, h, w)
    cin, cout, kind = SHAPES[args.layer]
    configs = CONFIGS if args.layer == "conv5" else LAYER_CONFIGS[args.layer]
    if args.layer == "conv5":
        layer, grow = conv5, 0

        def views(buf, nxt):  # input, output, residual
            return buf, nxt[:, :64], buf[:, :64]
    else:
        j = int(args.layer[-1])
        layer, grow = steps[j], 32

        def views(buf, nxt):  # in place: a dense step's partial sums are in its output's columns
            src, out = fused_trunk.dense_step_views(buf, j, 64, 32)
            return src, out, None

    def shipped_on(buf, nxt):  # the Triton kernel
        src, out, res1 = views(buf, nxt)
        fused_trunk.WARP_SPECIALISED = False
        if grow:
            layer(src, out, (h, w), lrelu=True, grow=grow, sums_in=j > 0)
        else:
            layer(src, out, (h, w), res1=res1, scale=0.2)

    flop = 2 * 4 * h * w * layer.weight.shape[0] * layer.weight.shape[1]
    report = {"card": torch.cuda.get_device_name(0), "bf16_tflops": round(matmul_tflops(), 1), "size": args.size,
              "layer": args.layer, "results": []}
    buf, nxt = start.clone(), torch.zeros_like(start)
    shipped_on(buf, nxt)
    reference = views(buf, nxt)[1].clone()
    shipped = lambda: shipped_on(buf, nxt)  # noqa: E731
    seconds = timed(shipped, 20)
    report["shipped_us"] = round(seconds * 1e6, 1)
    report["shipped_tflops"] = round(flop / seconds / 1e12, 1)
    print("shipped", report["shipped_us"], "us", report["shipped_tflops"], "TFLOP/s", flush=True)
    weights = {False: layer.weight, True: layer.weight.t().contiguous()}
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    for config in (c for c in configs if c[0] in args.kinds.split(",")):
        row = {"kind": config[0], "pixels": config[1], "channels_a_step": config[2], "stages": config[3],
               "weights_resident": config[4] if len(config) > 4 else False}
        try:
            mine, mine_next = start.clone(), torch.zeros_like(start)
            src, out, res1 = views(mine, mine_next)
            run = lambda: launch(src, weights[config[0] == "swapped"], layer.bias, out, (h, w), config, sms, kind,  # noqa: E731
                                 res1=res1, grow=grow)
            run()
            torch.cuda.synchronize()
            difference = (out.float() - reference.float()).abs()
            row["max_diff"] = float(difference.max())
            row["mean_diff"] = float(difference.mean())
            seconds = timed(run, 20)
            row["us"] = round(seconds * 1e6, 1)
            row["tflops"] = round(flop / seconds / 1e12, 1)
        except Exception as exc:
            row["error"] = str(exc).splitlines()[-1][:300]
        report["results"].append(row)
        print(json.dumps(row), flush=True)
        if args.json:
            args.json.write_text(json.dumps(report, indent=2))
    report["shipped_again_us"] = round(timed(shipped, 20) * 1e6, 1)  # the clocks drift
    print("shipped again", report["shipped_again_us"], "us", flush=True)
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
