"""The fused engine's kernels from two CUDA streams at once (model alone, one process, one GPU).

Each layer of the engine is one persistent kernel that runs on every SM; between layers the GPU
drains (the last tiles of a layer, the next kernel's start). Two independent sequences of layers
on two streams can fill those gaps and share an SM where both kernels fit. Variants, each through
the worker's `upscale_tensor` (pre- and post-processing included), batch 4:

- `one stream`: the engine as it runs;
- `halves on two streams`: frames 0-1 and 2-3 of each batch on two streams (the same memory);
- `two batches on two streams`: two batches of 4 at once (twice the memory; the most it could give);
- `one stream, batch 2`: what a half alone costs.

    python bench/streams.py --json PATH [--sizes 640x480,1280x720]
"""

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "bench")]

from echoshot_ai_server.app.wiring import load_engine  # noqa: E402
from echoshot_ai_server.config import Settings  # noqa: E402
from echoshot_ai_server.engine import fused_trunk  # noqa: E402
from model_variants import timed  # noqa: E402  (GPU seconds of a run among those queued back to back)
from run import matmul_tflops  # noqa: E402

MFLOP_PER_PIXEL = 35.85


class OnStreams:
    """`forward` with a batch's frames split into `parts` runs, each on a stream of its own."""

    def __init__(self, forward, parts: int):
        self.forward, self.parts = forward, parts
        self.streams = [torch.cuda.Stream() for _ in range(parts)]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat(self.each(x.chunk(self.parts)))

    def each(self, inputs) -> list:
        """`forward` of each input, each on its stream, all joined to the current stream."""
        main = torch.cuda.current_stream()
        outs = []
        for stream, part in zip(self.streams, inputs):
            stream.wait_stream(main)
            with torch.cuda.stream(stream):
                outs.append(self.forward(part))
        for stream, out in zip(self.streams, outs):
            main.wait_stream(stream)
            out.record_stream(main)  # allocated on its stream, read by the main one from now on
        return outs


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", type=Path, required=True)
    parser.add_argument("--sizes", default="640x480,1280x720")
    parser.add_argument("--repeats", type=int, default=8)
    args = parser.parse_args()
    fused_trunk.load_tuned(fused_trunk.measured_defaults(), any_kernel=True)
    [upscaler] = load_engine(Settings(), "gpu")
    upscaler.graphs = None
    fused = upscaler.forward
    halves = OnStreams(fused, 2)
    rng = np.random.default_rng(0)
    report = {"card": torch.cuda.get_device_name(0), "torch": torch.__version__,
              "bf16_tflops": round(matmul_tflops(), 1), "sizes": {}}
    for size in args.sizes.split(","):
        w, h = (int(v) for v in size.split("x"))
        frames = torch.from_numpy(rng.integers(0, 256, (8, h, w, 3), dtype=np.uint8)).cuda()
        first, second = frames[:4], frames[4:]

        def run(split, batch):
            upscaler.forward = halves if split else fused
            return upscaler.upscale_tensor(batch, 4)

        batches_on_streams = OnStreams(lambda batch: run(False, batch), 2)

        def run_batch_of_two():
            upscaler.batch_frames = 2  # else the batch is padded to the planned 4 frames
            try:
                return run(False, first[:2])
            finally:
                upscaler.batch_frames = 4

        reference = run(False, first)
        split = run(True, first)
        torch.cuda.synchronize()
        difference = (split.int() - reference.int()).abs()
        row = {"diff_uint8_halves": {"max": int(difference.max()), "mean": round(float(difference.float().mean()), 4)}}
        variants = {
            "one stream": (lambda: run(False, first), 4),
            "halves on two streams": (lambda: run(True, first), 4),
            "two batches on two streams": (lambda: batches_on_streams.each((first, second)), 8),
            "one stream, batch 2": (lambda: run_batch_of_two(), 2),
        }
        for name, (fn, count) in variants.items():
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            fn()
            torch.cuda.synchronize()
            row[name + " peak GB"] = round(torch.cuda.max_memory_allocated() / 1e9, 2)
        for round_ in range(2):
            for name, (fn, count) in variants.items():
                fps = count / timed(fn, args.repeats)
                row.setdefault(name, []).append(round(fps, 2))
        for name in variants:
            best = max(row[name])
            row[name + " TFLOP/s"] = round(MFLOP_PER_PIXEL * w * h * best / 1e6, 1)
            row[name + " % of bf16"] = round(100 * MFLOP_PER_PIXEL * w * h * best / 1e6 / report["bf16_tflops"], 1)
        report["sizes"][size] = row
        print(size, json.dumps(row), flush=True)
        args.json.write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
