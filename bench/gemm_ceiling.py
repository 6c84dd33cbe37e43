"""What the card's libraries reach on the trunk's layer shapes: a ceiling to compare the fused
kernels' figures with (bench/layers.py).

For each layer of a residual dense block at a batch of 4 frames of 640x480 (padded rows, fp16):

- `gemm`: cuBLAS (torch.matmul) on the layer as one matrix product, [rows, 9 x CIN] x [9 x CIN, COUT]:
  the work of the convolution with its taps already gathered (no im2col counted);
- `conv`: cuDNN's 3x3 convolution of the same shape (channels-last, the fastest algorithm cuDNN picks);
- `gemm` with wider N (128, 256) at conv5's K, to show what the number of output columns costs;
- the kernels each one launched (their names carry the library's tile shapes).

Each figure is the median of 5 rounds of 20 launches back to back, as TFLOP/s and as a share of the
bf16 rate measured in the same process (bench/run.py's `matmul_tflops`).

    python bench/gemm_ceiling.py --json PATH
"""

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch
from torch.nn import functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))

from model_variants import timed as queued  # noqa: E402
from run import matmul_tflops  # noqa: E402

W, H, N = 640, 480, 4
ROWS = N * (H + 2) * (W + 2)
LAYERS = {  # name: (CIN, COUT)
    "dense step 0": (64, 128), "dense step 1": (32, 96), "dense step 2": (32, 64), "dense step 3": (32, 32),
    "conv5": (192, 64), "conv5 at N 128": (192, 128), "conv5 at N 256": (192, 256),
}


def seconds(run, *operands, rounds: int = 5) -> float:
    """Median over `rounds` of the seconds of one `run(*operands)` among 20 queued back to back."""
    return statistics.median(queued(lambda: run(*operands), 20) for _ in range(rounds))


def kernel_names(run, *operands) -> list[str]:
    """The CUDA kernels one `run(*operands)` launches (cuDNN's and cuBLAS's names carry their tile shapes)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as profile:
        run(*operands)
        torch.cuda.synchronize()
    return sorted({event.name for event in profile.events() if event.device_type == torch.autograd.DeviceType.CUDA})


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", type=Path, required=True)
    args = parser.parse_args()
    torch.backends.cudnn.benchmark = True
    rate = matmul_tflops()
    report = {"card": torch.cuda.get_device_name(0), "torch": torch.__version__, "cudnn": torch.backends.cudnn.version(),
              "bf16_tflops": round(rate, 1), "rows": ROWS, "layers": {}}
    print(f"{report['card']}: bf16 rate {rate:.1f} TFLOP/s; {ROWS} rows (4 frames of {W}x{H}, padded)")
    print(f"{'layer':16s} {'K':>5s} {'N':>4s}  {'gemm µs':>8s} {'TF/s':>6s} {'%':>5s}  {'conv µs':>8s} {'TF/s':>6s} {'%':>5s}")
    for name, (cin, cout) in LAYERS.items():
        flop = 2 * ROWS * 9 * cin * cout
        gemm_operands = (torch.randn(ROWS, 9 * cin, device="cuda", dtype=torch.float16),
                         torch.randn(9 * cin, cout, device="cuda", dtype=torch.float16))
        gemm = seconds(torch.mm, *gemm_operands)
        gemm_kernels = kernel_names(torch.mm, *gemm_operands)
        del gemm_operands
        conv_operands = (torch.randn(N, cin, H, W, device="cuda", dtype=torch.float16).to(memory_format=torch.channels_last),
                         torch.randn(cout, cin, 3, 3, device="cuda", dtype=torch.float16).to(memory_format=torch.channels_last))
        conv = seconds(lambda x, w: F.conv2d(x, w, padding=1), *conv_operands)
        conv_kernels = kernel_names(lambda x, w: F.conv2d(x, w, padding=1), *conv_operands)
        del conv_operands
        conv_flop = 2 * N * H * W * 9 * cin * cout  # cuDNN computes no ring rows
        row = {"K": 9 * cin, "N": cout,
               "gemm_us": round(gemm * 1e6, 1), "gemm_tflops": round(flop / gemm / 1e12, 1),
               "gemm_of_rate_percent": round(100 * flop / gemm / 1e12 / rate, 1),
               "conv_us": round(conv * 1e6, 1), "conv_tflops": round(conv_flop / conv / 1e12, 1),
               "conv_of_rate_percent": round(100 * conv_flop / conv / 1e12 / rate, 1),
               "gemm_kernels": gemm_kernels, "conv_kernels": conv_kernels}
        report["layers"][name] = row
        print(f"{name:16s} {row['K']:5d} {cout:4d}  {row['gemm_us']:8.1f} {row['gemm_tflops']:6.1f} "
              f"{row['gemm_of_rate_percent']:5.1f}  {row['conv_us']:8.1f} {row['conv_tflops']:6.1f} "
              f"{row['conv_of_rate_percent']:5.1f}", flush=True)
    for name, row in report["layers"].items():
        print(f"{name}: gemm {row['gemm_kernels']}\n  conv {row['conv_kernels']}")
    args.json.write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
