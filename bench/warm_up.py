"""Where a worker's start-up and the first job of a new frame size spend their time (GPU).

In one fresh process: load the model, warm the engine up size by size (WARM_UP_SIZES), then for a
few frame sizes the warm-up never saw, a full batch twice (first and second time), then the model's
steady speed at 640x480 -> x4. `--cudnn-benchmark 0` runs cuDNN on its heuristics instead of timing
its algorithms for every new shape (the head and tail convolutions).

    KERNEL_CACHE_DIR=... python bench/warm_up.py --json PATH [--cudnn-benchmark 0|1]
"""

import time

PROCESS_STARTED = time.monotonic()

import argparse  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from echoshot_ai_server.app.wiring import load_engine, tuned_file  # noqa: E402
from echoshot_ai_server.config import Settings  # noqa: E402
from echoshot_ai_server.engine.upscaler import WARM_UP_SIZES  # noqa: E402

NEW_SIZES = [(176, 144), (480, 854), (1920, 1080)]


def batch(upscaler, width: int, height: int) -> np.ndarray:
    return np.random.default_rng(width).integers(0, 256, (upscaler.batch_frames, height, width, 3), dtype=np.uint8)


def timed(fn) -> float:
    started = time.monotonic()
    fn()
    torch.cuda.synchronize()
    return time.monotonic() - started


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", type=Path, required=True)
    parser.add_argument("--cudnn-benchmark", type=int, default=None)
    args = parser.parse_args()
    report = {"imports_s": round(time.monotonic() - PROCESS_STARTED, 1)}
    started = time.monotonic()
    settings = Settings()
    [upscaler] = load_engine(settings, "gpu")
    if args.cudnn_benchmark is not None:
        torch.backends.cudnn.benchmark = bool(args.cudnn_benchmark)
    report["load_s"] = round(time.monotonic() - started, 1)
    report["warm_up_s"] = {f"{w}x{h}": round(upscaler.warm_up([(w, h)], tuned=tuned_file(settings)), 1) for w, h in WARM_UP_SIZES}
    report["ready_s"] = round(time.monotonic() - PROCESS_STARTED, 1)
    report["new_sizes"] = {}
    for w, h in NEW_SIZES:
        frames = batch(upscaler, w, h)
        first = timed(lambda: upscaler.upscale(frames, 2))
        second = timed(lambda: upscaler.upscale(frames, 2))
        report["new_sizes"][f"{w}x{h}"] = {"first_s": round(first, 2), "second_s": round(second, 2)}
    frames = torch.from_numpy(batch(upscaler, 640, 480)).cuda()
    times = [timed(lambda: upscaler.upscale_tensor(frames, 4)) for _ in range(8)]
    report["model_fps_640x480_x4"] = round(len(frames) / statistics.median(times), 2)
    report["cudnn_benchmark"] = torch.backends.cudnn.benchmark
    print(json.dumps(report), flush=True)
    args.json.write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
