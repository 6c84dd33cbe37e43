"""Where a batch's GPU time goes, layer by layer, and what other tile shapes would buy each layer.

Model alone, batch 4, uint8 frames on the GPU through the worker's `upscale_tensor` (CUDA graphs off):

- `forward`: every fused-kernel launch of a batch timed with CUDA events, summed by layer (the 69
  dense blocks' steps and conv5s, conv_body, the up-sampling phases, conv_hr, conv_last's sum of its
  shares); "other" is the rest of the batch (head, padding, post-processing, gaps between launches);
- `configs` (with `--configs`): each convolution alone on buffers of its real shapes (`--sweep-size`;
  µs, 20 launches back to back) under each tuning configuration and others that leave room for more
  programs on an SM, next to its shipped tile shape, with each kernel's registers, spills and shared
  memory. Configurations that do not fit are listed as failed. Compiled side by side first. The sweep
  is of the Triton kernel: the layers that run warp-specialised on Hopper (the dense blocks';
  engine/warp_specialised_conv.py) are swept and timed in it too.

    python bench/layers.py --json PATH [--configs [--sweep-size 640x480] [--layers "dense step 3,conv_hr"]]
    ncu --launch-skip 5 --launch-count 1 python bench/layers.py --json unused --only-run "dense step 1"
"""

import argparse
import json
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
import triton

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "bench")]

from echoshot_ai_server.app.wiring import load_engine  # noqa: E402
from echoshot_ai_server.config import Settings  # noqa: E402
from echoshot_ai_server.engine import fused_trunk  # noqa: E402
from echoshot_ai_server.engine.fused_trunk import PackedConv, TapShares, dense_step_views, zero_ring  # noqa: E402
from model_variants import timed as queued  # noqa: E402
from run import matmul_tflops  # noqa: E402

SIZES = ((640, 480), (1280, 720))
FEAT, GROW = 64, 32
# beyond fused_trunk.TUNING_CONFIGS, mostly shapes that leave room for two or three programs on an SM
# (fewer stages, smaller tiles, a register cap): (BLOCK_M, BLOCK_K, warps, stages, programs per SM[, maxnreg])
EXTRA_CONFIGS = [
    (128, 32, 4, 2, 0), (128, 32, 4, 3, 0), (128, 64, 4, 2, 0), (128, 64, 4, 3, 0),
    (64, 32, 4, 3, 0), (64, 32, 4, 4, 0), (64, 64, 4, 3, 0),
    (256, 32, 4, 2, 0), (256, 32, 4, 3, 0), (256, 64, 4, 2, 0), (256, 32, 8, 3, 0), (256, 64, 8, 2, 0),
    (256, 32, 4, 3, 2), (256, 64, 4, 2, 2), (128, 64, 4, 3, 2), (128, 32, 4, 3, 3), (128, 64, 4, 2, 3),
    (128, 32, 4, 3, 0, 168), (128, 32, 4, 2, 0, 128), (128, 64, 4, 3, 0, 168), (256, 32, 4, 3, 0, 168),
    (256, 32, 4, 4, 0, 168), (64, 32, 4, 4, 0, 128), (64, 64, 4, 3, 0, 128), (256, 32, 8, 3, 0, 128),
    (256, 64, 4, 4, 1, 208),
]


def labels(fused) -> dict[int, str]:
    names = {}
    for rrdb in fused.blocks:
        for steps, conv5 in rrdb:
            names.update({id(step): f"dense step {j}" for j, step in enumerate(steps)})
            names[id(conv5)] = "conv5"
    for name in ("conv_body", "up1", "up2", "conv_hr", "conv_last"):
        names[id(getattr(fused, name))] = name
    return names


def forward_breakdown(upscaler, fused, frames, repeats: int = 5) -> dict:
    """ms per batch of each layer (summed over its launches) and of the rest."""
    names, events = labels(fused), []
    originals = {cls: cls.__call__ for cls in (PackedConv, TapShares)}

    def timed(original):
        def call(layer, *args, **kwargs):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            result = original(layer, *args, **kwargs)
            end.record()
            events.append((names[id(layer)], start, end))
            return result
        return call

    total = queued(lambda: upscaler.upscale_tensor(frames, 4), repeats)
    for cls, original in originals.items():
        cls.__call__ = timed(original)
    try:
        for _ in range(repeats):
            upscaler.upscale_tensor(frames, 4)
        torch.cuda.synchronize()
    finally:
        for cls, original in originals.items():
            cls.__call__ = original
    layers: dict[str, float] = {}
    for name, start, end in events:
        layers[name] = layers.get(name, 0.0) + start.elapsed_time(end) / repeats
    result = {name: round(ms, 3) for name, ms in sorted(layers.items(), key=lambda item: -item[1])}
    result["other"] = round(total * 1e3 - sum(layers.values()), 3)
    result["batch"] = round(total * 1e3, 3)
    return result


def layer_runs(fused, size) -> dict:
    """Each layer alone on buffers of its shapes in a batch of 4 frames of `size`: name -> (conv, run)."""
    w, h = size
    n, dev, half = 4, "cuda", torch.float16
    rows = n * (h + 2) * (w + 2)
    buf = torch.randn(rows, FEAT + 4 * GROW, device=dev, dtype=half)
    nxt = torch.empty(rows, FEAT, device=dev, dtype=half)
    big = [zero_ring(torch.randn(n * (s * h + 2) * (s * w + 2), FEAT, device=dev, dtype=half), n, s * h, s * w)
           for s in (2, 4)]
    shares = fused.conv_last.buffer(big[1].shape[0], big[1])
    steps, conv5 = fused.blocks[0][0]
    runs = {}
    for j, step in enumerate(steps):
        src, out = dense_step_views(buf, j, FEAT, GROW)
        runs[f"dense step {j}"] = (step, lambda step=step, src=src, out=out, j=j: step(
            src, out, (h, w), lrelu=True, grow=GROW, sums_in=j > 0))
    runs["conv5"] = (conv5, lambda: conv5(buf, nxt, (h, w), res1=buf[:, :FEAT], scale=0.2))
    runs["conv_body"] = (fused.conv_body, lambda: fused.conv_body(buf[:, :FEAT], nxt, (h, w), res1=nxt, scale=1.0))
    runs["up1"] = (fused.up1, lambda: fused.up1(buf[:, :FEAT], big[0], (h, w), lrelu=True))
    runs["up2"] = (fused.up2, lambda: fused.up2(big[0], big[1], (2 * h, 2 * w), lrelu=True))
    runs["conv_hr"] = (fused.conv_hr, lambda: fused.conv_hr(big[1], shares, (4 * h, 4 * w), lrelu=True,
                                                            project=fused.conv_last))
    runs["conv_last"] = (None, lambda: fused.conv_last(shares, n, 4 * h, 4 * w))  # no tile shape to sweep
    return runs


def key_of(name: str, conv: PackedConv, rows: int) -> tuple[int, int, int, int]:
    return conv.tuning_key(rows, project=name == "conv_hr")  # conv_hr runs storing conv_last's shares


def config_sweep(fused, size, only: set[str]) -> dict:
    """Each layer alone under each configuration: µs (or why it failed), the shipped one first. Layers
    of one tuning key (the up-sampling phases and conv_hr) are timed apart."""
    w, h = size
    rows = 4 * (h + 2) * (w + 2)
    warp_specialised = fused_trunk.WARP_SPECIALISED
    fused_trunk.WARP_SPECIALISED = False  # the sweep is of the Triton kernel's tile shapes, for every layer
    runs = {name: run for name, run in layer_runs(fused, size).items()
            if run[0] is not None and (not only or name in only)}
    configs = {}
    for bm, bk, wp, st, ps, *cap in fused_trunk.TUNING_CONFIGS + EXTRA_CONFIGS:
        label = f"{bm}/{bk}/w{wp}/s{st}/p{ps}" + (f"/r{cap[0]}" if cap else "")
        configs[label] = triton.Config({"BLOCK_M": bm, "BLOCK_K": bk, "PERSISTENT": ps > 0, "PER_SM": ps},
                                       num_warps=wp, num_stages=st, maxnreg=cap[0] if cap else None)
    shipped = dict(fused_trunk.TUNED)
    # compile every (layer, configuration) side by side first; failures show when timed
    launches = {}
    for name, (conv, run) in runs.items():
        key = key_of(name, conv, rows)
        for label, cfg in configs.items():
            fused_trunk.TUNED[key] = cfg
            with fused_trunk.launches_recorded() as recorded:
                run()
            launches[name, label] = recorded[0][1:]  # (grid, args, kwargs) of the convolution
    fused_trunk.TUNED.clear()
    fused_trunk.TUNED.update(shipped)
    started = time.perf_counter()

    def compile_one(launch) -> dict | str:
        grid, args, kwargs = launch
        try:
            kernel = fused_trunk.conv3x3_kernel.warmup(*args, grid=grid, **kwargs)
            kernel._init_handles()
            return {"regs": kernel.n_regs, "spills": kernel.n_spills, "smem_kb": round(kernel.metadata.shared / 1024)}
        except Exception as error:  # reported with the layer's timings
            return f"{type(error).__name__}: {str(error)[:120]}"

    with ThreadPoolExecutor(max_workers=16) as pool:
        built = dict(zip(launches, pool.map(compile_one, launches.values())))
    print(f"compiled {len(launches)} kernels in {time.perf_counter() - started:.0f} s", flush=True)
    result = {}
    for name, (conv, run) in runs.items():
        key = key_of(name, conv, rows)
        row = {"shipped": str(shipped.get(key))}
        row["shipped_us"] = round(queued(run, 20) * 1e6, 1)
        row["kernels"] = {label: built[name, label] for label in configs}
        for label, cfg in configs.items():
            fused_trunk.TUNED[key] = cfg
            try:
                row[label] = round(queued(run, 20) * 1e6, 1)
            except Exception as error:  # a configuration that does not fit
                row[label] = f"failed: {type(error).__name__}"
        fused_trunk.TUNED[key] = shipped[key]
        row["shipped_us_again"] = round(queued(run, 20) * 1e6, 1)  # the GPU's clocks drift: the same, timed last
        best = min((us, label) for label, us in row.items() if isinstance(us, float) and label in configs)
        row["best"] = {"config": best[1], "us": best[0]}
        result[name] = row
        print(f"{name:14s} shipped {row['shipped_us']:8.1f} / {row['shipped_us_again']:8.1f} µs  "
              f"best {best[0]:8.1f} µs "
              f"({best[1]}: {built[name, best[1]]})", flush=True)
    fused_trunk.WARP_SPECIALISED = warp_specialised
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", type=Path, required=True)
    parser.add_argument("--configs", action="store_true")
    parser.add_argument("--sweep-size", default="640x480")
    parser.add_argument("--layers", default="", help="comma-separated layer names to sweep (default: all)")
    parser.add_argument("--only-run", help="run this layer alone 10 times at 640x480 and stop (for a profiler)")
    args = parser.parse_args()
    fused_trunk.load_tuned(fused_trunk.measured_defaults(), any_kernel=True)
    [upscaler] = load_engine(Settings(), "gpu")
    upscaler.graphs = None
    fused = upscaler.forward
    if args.only_run:
        _, run = layer_runs(fused, SIZES[0])[args.only_run]
        for _ in range(10):
            run()
        torch.cuda.synchronize()
        return 0
    rng = np.random.default_rng(0)
    report = {"card": torch.cuda.get_device_name(0), "torch": torch.__version__,
              "bf16_tflops": round(matmul_tflops(), 1),
              "forward_ms": {}}
    print(f"bf16 matrix rate {report['bf16_tflops']} TFLOP/s", flush=True)
    for w, h in SIZES:
        frames = torch.from_numpy(rng.integers(0, 256, (4, h, w, 3), dtype=np.uint8)).cuda()
        upscaler.upscale_tensor(frames, 4)
        row = report["forward_ms"][f"{w}x{h}"] = forward_breakdown(upscaler, fused, frames)
        row["fps"] = round(4e3 / row["batch"], 2)
        row["of_bf16_rate_percent"] = round(100 * 35.85e6 * w * h * row["fps"] / 1e12 / report["bf16_tflops"], 1)
        print(f"{w}x{h}", json.dumps(row), flush=True)
        del frames
    args.json.write_text(json.dumps(report, indent=2))
    if args.configs:
        size = tuple(int(v) for v in args.sweep_size.split("x"))
        only = {name for name in args.layers.split(",") if name}
        report[f"configs_us_{args.sweep_size}"] = config_sweep(fused, size, only)
        args.json.write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
