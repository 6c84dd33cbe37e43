"""The fused engine's head and tail four ways, in one process on one GPU: the tail in the trunk's
Triton kernels (what a worker runs from its first frame), eager with the sub-pixel up-sampling through
cuDNN (what served before), RRDBNet's own under torch.compile from the start, and the eager head with
the tail compiled in the background. For each: the first batch of each frame size (compilation
included), the model alone in frames per second at 640x480 and 1280x720 (batch 4, x4) and how far
its pixels are from eager fp16 RRDBNet's, and the peak memory of a batch per input pixel.

    KERNEL_CACHE_DIR=... python bench/tail.py --json PATH
"""

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from echoshot_ai_server.app.wiring import load_engine, tuned_file  # noqa: E402
from echoshot_ai_server.config import Settings  # noqa: E402
from echoshot_ai_server.engine.fused_trunk import FusedRRDBNet, load_tuned, measured_defaults  # noqa: E402

MFLOP_PER_PIXEL = 35.85
SIZES = ((640, 480), (1280, 720), (854, 480), (1920, 1080), (176, 144))
VARIANTS = ("Triton tail", "cuDNN sub-pixel", "torch.compile", "compiled in the background")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", type=Path, required=True)
    parser.add_argument("--variants", default=",".join(VARIANTS), help="a comma-separated choice of: " + ", ".join(VARIANTS))
    args = parser.parse_args()
    variants = [name for name in args.variants.split(",") if name in VARIANTS]
    settings = Settings()
    [upscaler] = load_engine(settings, "gpu")
    upscaler.graphs = None  # the variants below swap the forward pass; graphs would keep the first one's
    tuned = tuned_file(settings)
    if not (tuned is not None and load_tuned(tuned)):
        load_tuned(measured_defaults(), any_kernel=True)
    report = {"card": torch.cuda.get_device_name(0), "torch": torch.__version__, "variants": {}}
    rng = np.random.default_rng(0)
    frames = {size: torch.from_numpy(rng.integers(0, 256, (4, size[1], size[0], 3), dtype=np.uint8)).cuda()
              for size in SIZES}
    eager = upscaler.model
    outputs = {}
    for name in variants:
        upscaler.forward = FusedRRDBNet(eager, compile_head_tail=name == "torch.compile")
        if name == "cuDNN sub-pixel":
            upscaler.forward.tail = upscaler.forward._subpixel_tail
        row = {"first_batch_s": {}, "fps": {}}
        if name == "compiled in the background":
            started = time.perf_counter()
            upscaler.forward.compile_tail_in_background(4, SIZES[:2]).join()
            row["compile_s"] = round(time.perf_counter() - started, 1)
        for size in SIZES:
            started = time.perf_counter()
            out = upscaler.upscale_tensor(frames[size], 4)
            torch.cuda.synchronize()
            row["first_batch_s"][f"{size[0]}x{size[1]}"] = round(time.perf_counter() - started, 2)
            outputs.setdefault(size, {})[name] = out
        for size in SIZES[:2]:
            # peak memory of a batch beyond what is held before it (weights, frames), per input pixel
            torch.cuda.synchronize()
            held = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            upscaler.upscale_tensor(frames[size], 4)
            torch.cuda.synchronize()
            row.setdefault("peak_bytes_per_input_pixel", {})[f"{size[0]}x{size[1]}"] = round(
                (torch.cuda.max_memory_allocated() - held) / (4 * size[0] * size[1]))
            times = []
            for _ in range(8):
                started = time.perf_counter()
                upscaler.upscale_tensor(frames[size], 4)
                torch.cuda.synchronize()
                times.append(time.perf_counter() - started)
            fps = 4 / sorted(times)[len(times) // 2]
            row["fps"][f"{size[0]}x{size[1]}"] = round(fps, 2)
            row.setdefault("tflops", {})[f"{size[0]}x{size[1]}"] = round(MFLOP_PER_PIXEL * size[0] * size[1] * fps / 1e6, 1)
        report["variants"][name] = row
        print(name, json.dumps(row), flush=True)
    upscaler.forward = eager
    diffs = {}
    for size in SIZES:
        reference = upscaler.upscale_tensor(frames[size], 4).int()
        diffs[f"{size[0]}x{size[1]}"] = {
            name: {"max": int((outputs[size][name].int() - reference).abs().max()),
                   "mean": round(float((outputs[size][name].int() - reference).abs().float().mean()), 4)}
            for name in variants}
    report["max_abs_diff_uint8"] = diffs
    print(json.dumps(diffs), flush=True)
    args.json.write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
