"""What the CPU spends launching a forward pass's kernels (model alone, batch 4, CUDA graphs off).

At small frame sizes the fused engine's ~350 launches take longer on the CPU than their kernels on
the GPU (engine/graphs.py). This times a batch of a small size launched one by one, with the GPU
work excluded (`--size`, default 176x144: wall and process CPU ms a batch), and profiles the Python
side (cProfile, the functions with the most time of their own and in total).

    python bench/launch_cost.py [--size 176x144] [--batches 20] --json PATH
"""

import argparse
import cProfile
import io
import json
import pstats
import re
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from echoshot_ai_server.app.wiring import load_engine  # noqa: E402
from echoshot_ai_server.config import Settings  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="176x144")
    parser.add_argument("--batches", type=int, default=20)
    parser.add_argument("--json", type=Path, required=True)
    args = parser.parse_args()
    w, h = (int(v) for v in args.size.split("x"))
    [upscaler] = load_engine(Settings(), "gpu")
    upscaler.graphs = None
    frames = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (4, h, w, 3), dtype=np.uint8)).cuda()
    for _ in range(3):
        upscaler.upscale_tensor(frames, 4)
    torch.cuda.synchronize()
    wall, cpu = time.perf_counter(), time.process_time()
    for _ in range(args.batches):
        upscaler.upscale_tensor(frames, 4)
    torch.cuda.synchronize()
    report = {"card": torch.cuda.get_device_name(0), "size": args.size,
              "wall_ms_per_batch": round((time.perf_counter() - wall) / args.batches * 1e3, 2),
              "cpu_ms_per_batch": round((time.process_time() - cpu) / args.batches * 1e3, 2)}
    profile = cProfile.Profile()
    profile.enable()
    for _ in range(args.batches):
        upscaler.upscale_tensor(frames, 4)
    profile.disable()
    torch.cuda.synchronize()
    for order in ("tottime", "cumtime"):
        text = io.StringIO()
        pstats.Stats(profile, stream=text).sort_stats(order).print_stats(30)
        # file names relative to the package folders they are in (no machine's paths in the results)
        lines = [re.sub(r"\S*/site-packages/|\S*/lib/python3\.\d+/", "", line) for line in text.getvalue().splitlines()]
        report[f"by_{order}"] = [line.replace(f"{REPO}/", "") for line in lines]
    print(json.dumps({k: v for k, v in report.items() if not k.startswith("by_")}))
    print("\n".join(line[:200] for line in report["by_tottime"][:45]))
    args.json.write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
