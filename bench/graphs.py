"""Small batches with and without CUDA graphs (engine/graphs.py), in one process on one GPU.

For each frame size (batch 4, model alone, frames already on the GPU): frames per second and the
CPU time the process spends per batch, with the fused engine's kernels launched one by one and with
the batch replayed as a CUDA graph; the first three batches of a size through the graphs (a new shape
runs as it is once and is captured right after, then replayed) timed one by one; the largest
difference between the two ways' pixels; and the memory the graphs' shared pool holds after each size
(the sizes grow, so a pool shared as intended grows by the difference only, not by each graph's need).

    KERNEL_CACHE_DIR=... python bench/graphs.py --json PATH
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

MFLOP_PER_PIXEL = 35.85
SIZES = ((176, 144), (256, 144), (320, 240), (426, 240), (640, 360), (642, 362))
ROUNDS = 12


def timed(upscaler, frames, scale: int) -> tuple[float, float]:
    """Wall and process CPU seconds of one batch, GPU work included."""
    wall, cpu = time.perf_counter(), time.process_time()
    upscaler.upscale_tensor(frames, scale)
    torch.cuda.synchronize()
    return time.perf_counter() - wall, time.process_time() - cpu


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", type=Path, required=True)
    args = parser.parse_args()
    settings = Settings()
    [upscaler] = load_engine(settings, "gpu")
    upscaler.warm_up(tuned=tuned_file(settings))  # as a worker starts: tile shapes from its cache or the shipped ones
    graphs = upscaler.graphs
    assert graphs is not None, "CUDA graphs are off (GPU_CUDA_GRAPHS)"
    report = {"card": torch.cuda.get_device_name(0), "torch": torch.__version__, "sizes": {}}
    rng = np.random.default_rng(0)
    for w, h in SIZES:
        frames = torch.from_numpy(rng.integers(0, 256, (4, h, w, 3), dtype=np.uint8)).cuda()
        row = {}
        upscaler.graphs = None
        plain = upscaler.upscale_tensor(frames, 4)
        runs = [timed(upscaler, frames, 4) for _ in range(ROUNDS)]
        row["launched"] = summary(runs, w, h)
        upscaler.graphs = graphs
        row["first_three_s"] = [round(timed(upscaler, frames, 4)[0], 4) for _ in range(3)]
        graphed = upscaler.upscale_tensor(frames, 4)
        runs = [timed(upscaler, frames, 4) for _ in range(ROUNDS)]
        row["graph"] = summary(runs, w, h)
        row["max_abs_diff_uint8"] = int((graphed.int() - plain.int()).abs().max())
        row["speed-up"] = round(row["graph"]["fps"] / row["launched"]["fps"], 2)
        row["graph_pool_gb"] = pool_gb(graphs.pool)
        report["sizes"][f"{w}x{h}"] = row
        print(f"{w}x{h}", json.dumps(row), flush=True)
    report["graphs_kept"] = len(graphs.graphs)
    report["memory_reserved_gb"] = round(torch.cuda.memory_reserved() / 2**30, 2)
    print(json.dumps({k: v for k, v in report.items() if k != "sizes"}), flush=True)
    args.json.write_text(json.dumps(report, indent=2))
    return 0


def pool_gb(pool) -> float | None:
    """GB of memory PyTorch's allocator holds in the graphs' pool."""
    segments = [s for s in torch.cuda.memory_snapshot() if "segment_pool_id" in s]
    if pool is None or not segments:
        return None
    return round(sum(s["total_size"] for s in segments if tuple(s["segment_pool_id"]) == tuple(pool)) / 2**30, 3)


def summary(runs: list[tuple[float, float]], w: int, h: int) -> dict:
    wall = sorted(t for t, _ in runs)[len(runs) // 2]
    cpu = sorted(c for _, c in runs)[len(runs) // 2]
    return {"fps": round(4 / wall, 1), "ms_per_batch": round(wall * 1e3, 1), "cpu_ms_per_batch": round(cpu * 1e3, 1),
            "tflops": round(MFLOP_PER_PIXEL * w * h * 4 / wall / 1e6, 1)}


if __name__ == "__main__":
    sys.exit(main())
