"""The model alone on the CPU, in the ways it can run there, against the guide's design.

    .venv/bin/python bench/cpu_variants.py --size 128x96 --repeats 3 --json bench/results/cpu-variants.json

Frames: a Mandelbrot zoom with film grain (as bench/run.py), decoded as the pipeline decodes them.
Each variant upscales the same frames x4; the variants run one after another in each round and the
rounds repeat, so that the machine's drift touches them all alike; the median round counts.
PSNR: against fp32 RealESRGANer with the guide's CPU tiles (128, pad 5), before H.264.
"""

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.run import make_clip, psnr  # noqa: E402
from echoshot_ai_server.config import Settings  # noqa: E402
from echoshot_ai_server.engine.models import load_model, reference_model  # noqa: E402
from echoshot_ai_server.engine.specs import X4PLUS  # noqa: E402
from echoshot_ai_server.engine.upscaler import RunProfile, Upscaler  # noqa: E402
from echoshot_ai_server.media.probe import probe  # noqa: E402
from echoshot_ai_server.media.reader import FrameReader  # noqa: E402


def guide(weights: Path):
    model = reference_model(X4PLUS.arch)  # basicsr's RRDBNet; first: it makes realesrgan importable
    from realesrgan import RealESRGANer

    enhancer = RealESRGANer(scale=4, model_path=str(weights), model=model, tile=128, tile_pad=5,
                            pre_pad=0, half=False, device=torch.device("cpu"))
    return lambda frames: np.stack([enhancer.enhance(f, outscale=4)[0] for f in frames])  # BGR in and out, as ours


def ours(weights: Path, **profile):
    model = load_model(weights, X4PLUS.arch)
    upscaler = Upscaler(model, device="cpu", profile=RunProfile(**{"tile": 128, "tile_pad": 5, "fallback_tile": 0,
                                                                    **profile}))
    return lambda frames: upscaler.upscale(frames, 4)


VARIANTS = {
    "guide (RealESRGANer, tile 128, fp32)": lambda w: guide(w),
    "ours today (tile 128, fp32)": lambda w: ours(w),
    "fp32, channels-last, tile 128": lambda w: ours(w, channels_last=True),
    "fp32, whole frame": lambda w: ours(w, tile=0),
    "fp32, channels-last, whole frame": lambda w: ours(w, tile=0, channels_last=True),
    "fp32, compiled, channels-last, whole frame": lambda w: ours(w, tile=0, channels_last=True, engine="compile"),
    "bf16, channels-last, tile 128": lambda w: ours(w, bf16=True, channels_last=True),
    "bf16, channels-last, whole frame": lambda w: ours(w, tile=0, bf16=True, channels_last=True),
    "bf16, compiled, channels-last, whole frame": lambda w: ours(w, tile=0, bf16=True, channels_last=True, engine="compile"),
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="128x96")
    parser.add_argument("--frames", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--only", default=None, help="comma-separated substrings of the variants to run")
    parser.add_argument("--json", type=Path, required=True)
    args = parser.parse_args()
    width, height = (int(v) for v in args.size.split("x"))
    weights = Settings().weights_dir / X4PLUS.weights_file
    variants = {k: v for k, v in VARIANTS.items()
                if args.only is None or k.startswith("guide") or any(s in k for s in args.only.split(","))}
    with tempfile.TemporaryDirectory() as tmp:
        clip = make_clip("ffmpeg", Path(tmp) / "clip.mp4", (width, height), 1.0)
        with FrameReader(clip, probe(clip, "ffprobe")) as reader:
            frames = next(reader.batches(args.frames)).frames
    runs = {name: make(weights) for name, make in variants.items()}
    reference = runs[next(iter(runs))](frames)
    results = {name: {"seconds": [], "psnr_db": None} for name in runs}
    for name, run in runs.items():  # untimed: oneDNN's first call, compilation
        out = run(frames)
        results[name]["psnr_db"] = round(statistics.mean(psnr(o, r) for o, r in zip(out, reference)), 2)
    for _ in range(args.repeats):
        for name, run in runs.items():
            started = time.perf_counter()
            run(frames)
            results[name]["seconds"].append(round(time.perf_counter() - started, 3))
    guide_s = statistics.median(results[next(iter(results))]["seconds"])
    flop = X4PLUS.mflop_per_pixel * 1e6 * width * height * len(frames)
    print(f"| variant ({width}x{height} x4, {len(frames)} frame(s), {torch.get_num_threads()} threads) "
          "| s (median) | TFLOP/s | vs guide | PSNR dB vs fp32 |")
    print("|---|---|---|---|---|")
    for name, result in results.items():
        median = statistics.median(result["seconds"])
        result.update(median_s=median, speedup=round(guide_s / median, 2), tflops=round(flop / median / 1e12, 3))
        print(f"| {name} | {median:.2f} | {result['tflops']} | {result['speedup']}x | {result['psnr_db']} |")
    args.json.write_text(json.dumps({"size": args.size, "frames": len(frames), "threads": torch.get_num_threads(),
                                     "cpu_flags": [f for f in ("avx512_bf16", "amx_bf16", "avx512_vnni")
                                                   if f in Path("/proc/cpuinfo").read_text()],
                                     "torch": torch.__version__, "variants": results}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
