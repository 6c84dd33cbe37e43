"""Variants of the fused engine's trunk, in one process on one GPU (model alone, batch 4).

Each runs through the worker's `upscale_tensor`:

- `before` (with `--before`): an earlier engine, from a copy of its engine/fused_trunk.py, e.g.
  `git show 45341ff:echoshot_ai_server/engine/fused_trunk.py > old.py` (partial sums in side
  buffers) or 097e54d's (the up-sampling phases over all nine taps). With `--before-tiles tuned` its
  tile shapes are tuned in the process (for a kernel whose best tiles differ), with `shipped` it
  takes the shipped ones (`--before-tuned`: its own commit's engine/tuned/sm90.json);
- `now`: the engine as it is, on the shipped tile shapes (engine/tuned/);
- `dense steps retuned` (`--retune dense`): the dense steps' tile shapes tuned again in the process;
- with `--gluon-sets`: the engine as it is with the warp-specialised Gluon kernels serving only some of
  the layer kinds of `warp_specialised_conv.TILES` (each set: kinds joined by `+`, `none` or `all`;
  sets separated by commas; `--tiles KIND=BP/BK/STAGES/RESIDENT` replaces a kind's tile first), to
  tell what each kind buys. `before` is then not needed.

Each layer under every tuning configuration: `bench/layers.py --configs`. Commit 097e54d's version of
this script also tried the convolutions swapped (output channels as the MMA's M, pixels as N):
BENCHMARKS.md has the figures.

For each: frames per second at 640x480 and 1280x720 (x4; `--sizes` for others), each dense step and
conv5 alone at the first size (µs, 20 launches back to back), and the largest difference of its pixels
from the first variant's. Retuned tile shapes are written to `--tuned-out` (the format of engine/tuned/).

    python bench/trunk_variants.py [--before old.py [--before-tiles tuned|shipped] [--rounds N]] [--retune none|dense]
        [--sizes 640x480,1280x720] --json PATH [--tuned-out PATH]
    python bench/trunk_variants.py --gluon-sets none,residual+sums-64+sums-32,all [--tiles first=128/64/4/0]
        [--rounds N] --json PATH
"""

import argparse
import importlib.util
import inspect
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "bench")]

from echoshot_ai_server.app.wiring import load_engine  # noqa: E402
from echoshot_ai_server.config import Settings  # noqa: E402
from echoshot_ai_server.engine import fused_trunk, warp_specialised_conv  # noqa: E402
from model_variants import timed as queued  # noqa: E402  (GPU seconds of a run among 20 queued back to back)
from run import matmul_tflops  # noqa: E402

MFLOP_PER_PIXEL = 35.85
DENSE_KEYS = ((64, 128), (32, 96), (32, 64), (32, 32))  # (CIN, COUT) of dense steps 0-3
FEAT, GROW = 64, 32


def timed(run, repeats: int) -> float:
    """Median seconds of `run`, GPU work included."""
    run()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        run()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - started)
    return sorted(times)[len(times) // 2]


def step_times(module, fused, size, in_place: bool) -> list[float]:
    """Each dense step of the first RDB alone and its conv5, µs, on a buffer of random features."""
    w, h = size
    rows = 4 * (h + 2) * (w + 2)
    buf = torch.randn(rows, FEAT + 4 * GROW, device="cuda", dtype=torch.float16)
    steps = fused.blocks[0][0][0]
    result = []
    if in_place:
        for j, step in enumerate(steps):
            src, out = module.dense_step_views(buf, j, FEAT, GROW)
            result.append(queued(lambda: step(src, out, (h, w), lrelu=True, grow=GROW, sums_in=j > 0), 20))
    else:
        partials = [torch.randn(rows, 4 * GROW, device="cuda", dtype=torch.float16),
                    torch.randn(rows, 3 * GROW, device="cuda", dtype=torch.float16)]
        for j, step in enumerate(steps):
            src, out, pre_res, partial = module.dense_step_views(buf, partials, j, FEAT, GROW)
            result.append(queued(lambda: step(src, out, (h, w), lrelu=True, pre_res=pre_res, partial=partial), 20))
    conv5, nxt = fused.blocks[0][0][1], torch.empty(rows, FEAT, device="cuda", dtype=torch.float16)
    result.append(queued(lambda: conv5(buf, nxt, (h, w), res1=buf[:, :FEAT], scale=0.2), 20))
    return [round(s * 1e6, 1) for s in result]


def tile_label(key) -> str:
    """A key of `warp_specialised_conv.TILES` as the command line names it: its kind, and for the dense
    steps after the first their output channels (sums-96, sums-64, sums-32)."""
    cin, cout, kind = key
    return f"{kind}-{cout}" if kind == "sums" else kind


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--before", type=Path, help="the older fused_trunk.py")
    parser.add_argument("--before-tiles", choices=("tuned", "shipped"), default="tuned")
    parser.add_argument("--before-tuned", type=Path, help="with --before-tiles shipped: the older engine's tuned file")
    parser.add_argument("--retune", choices=("none", "dense"), default="none")
    parser.add_argument("--json", type=Path, required=True)
    parser.add_argument("--sizes", default="640x480,1280x720", help="frame sizes (batches of 4), the first also per layer")
    parser.add_argument("--tuned-out", type=Path)
    parser.add_argument("--gluon-sets", help="e.g. none,residual+sums-64+sums-32,all (kinds: see tile_label)")
    parser.add_argument("--tiles", default="", help="e.g. first=128/64/4/0,sums-96=128/32/8/1")
    parser.add_argument("--rounds", type=int, default=1,
                        help="with --before: measure before and now this many times, alternately "
                             "(the GPU's clocks drift)")
    args = parser.parse_args()
    sizes = [tuple(int(v) for v in size.split("x")) for size in args.sizes.split(",")]
    fused_trunk.load_tuned(fused_trunk.measured_defaults(), any_kernel=True)

    [upscaler] = load_engine(Settings(), "gpu")
    upscaler.graphs = None  # the variants swap the forward pass; a graph would keep the first one's
    eager = upscaler.model
    rng = np.random.default_rng(0)
    frames = {size: torch.from_numpy(rng.integers(0, 256, (4, size[1], size[0], 3), dtype=np.uint8)).cuda()
              for size in sizes}
    report = {"card": torch.cuda.get_device_name(0), "torch": torch.__version__,
              "bf16_tflops": round(matmul_tflops(), 1),
              "variants": {}}
    reference = {}

    def measure(name: str, module, in_place: bool) -> None:
        upscaler.forward = fused = module.FusedRRDBNet(eager)
        row = {"fps": {}, "tflops": {}, "diff_uint8": {}}
        for size in sizes:
            label = f"{size[0]}x{size[1]}"
            started = time.perf_counter()
            out = upscaler.upscale_tensor(frames[size], 4)  # the first batch: tuning, if any, included
            torch.cuda.synchronize()
            row.setdefault("first_batch_s", {})[label] = round(time.perf_counter() - started, 2)
            reference.setdefault(label, out)
            difference = (out.int() - reference[label].int()).abs()
            row["diff_uint8"][label] = {"max": int(difference.max()), "mean": round(float(difference.float().mean()), 4)}
            fps = 4 / timed(lambda: upscaler.upscale_tensor(frames[size], 4), 8)
            row["fps"][label] = round(fps, 2)
            row["tflops"][label] = round(MFLOP_PER_PIXEL * size[0] * size[1] * fps / 1e6, 1)
        first = "x".join(map(str, sizes[0]))
        *row[f"dense_steps_us_{first}"], row[f"conv5_us_{first}"] = step_times(module, fused, sizes[0], in_place)
        row["dense_steps_total_us"] = round(sum(row[f"dense_steps_us_{first}"]), 1)
        report["variants"][name] = row
        print(f"{name:45s} {json.dumps(row)}", flush=True)
        args.json.write_text(json.dumps(report, indent=2))

    if args.gluon_sets:
        shipped = dict(warp_specialised_conv.TILES)
        for change in filter(None, args.tiles.split(",")):
            label, tile = change.split("=")
            bp, bk, stages, resident = (int(v) for v in tile.split("/"))
            [key] = [key for key in shipped if tile_label(key) == label]
            shipped[key] = (bp, bk, stages, bool(resident))
        report["tiles"] = {tile_label(key): tile for key, tile in shipped.items()}
        for round_ in range(args.rounds):
            for name in args.gluon_sets.split(","):
                labels = {tile_label(key) for key in shipped} if name == "all" else set(name.split("+")) - {"none"}
                warp_specialised_conv.TILES.clear()
                warp_specialised_conv.TILES.update({k: t for k, t in shipped.items() if tile_label(k) in labels})
                measure(f"gluon {name}" + (f" {round_ + 1}" if args.rounds > 1 else ""), fused_trunk, in_place=True)
        return 0
    if args.before is not None:
        spec = importlib.util.spec_from_file_location("fused_trunk_before", args.before)
        before = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(before)
        if args.before_tiles == "shipped":
            any_kernel = {"any_kernel": True} if "any_kernel" in inspect.signature(before.load_tuned).parameters else {}
            before.load_tuned(args.before_tuned or fused_trunk.measured_defaults(), **any_kernel)
        in_place = "partial" not in inspect.signature(before.PackedConv.__call__).parameters
        for round_ in range(args.rounds):
            suffix = f" {round_ + 1}" if args.rounds > 1 else ""
            measure("before" + suffix, before, in_place=in_place)
            measure("now" + suffix, fused_trunk, in_place=True)
    else:
        measure("now", fused_trunk, in_place=True)
    if args.retune == "none":
        return 0
    retuned, name = [key for key in fused_trunk.TUNED if key[:2] in DENSE_KEYS], "dense steps retuned"
    for key in retuned:
        del fused_trunk.TUNED[key]
    fused_trunk.conv3x3_tuned.cache.clear()
    started = time.perf_counter()
    measure(name, fused_trunk, in_place=True)
    row = report["variants"][name]
    row["retune_s"] = round(time.perf_counter() - started, 1)
    row["tuned"] = {str(key): str(fused_trunk.TUNED[key]) for key in sorted(retuned)}
    print(json.dumps(row["tuned"], indent=1), flush=True)
    args.json.write_text(json.dumps(report, indent=2))
    if args.tuned_out is not None:
        fused_trunk.save_tuned(args.tuned_out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
