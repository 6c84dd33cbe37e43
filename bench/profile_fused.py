"""Where the fused engine's time goes, on one GPU: kernels by total time (torch.profiler).

    python3 bench/profile_fused.py [--size 640x480] [--batch 4]
"""

import argparse
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from echoshot_ai_server.engine.models import build_model  # noqa: E402
from echoshot_ai_server.engine.specs import X4PLUS  # noqa: E402
from echoshot_ai_server.engine.upscaler import RunProfile, Upscaler  # noqa: E402


def category(name: str) -> str:
    for key, label in [("conv3x3", "fused kernels (Triton)"), ("triton", "compiled element-wise (Triton)"),
                       ("conv", "cuDNN convolution"), ("gemm", "cuDNN convolution"), ("xmma", "cuDNN convolution"),
                       ("elementwise", "eager element-wise"), ("copy", "copies")]:
        if key in name.lower():
            return label
    return "other"


def profile(w: int, h: int, batch: int) -> None:
    torch.manual_seed(0)
    up = Upscaler(build_model(X4PLUS.arch), device="gpu",
                  profile=RunProfile(0, 10, 128, half=True, batch_frames=batch, engine="fused"))
    frames = torch.randint(0, 256, (batch, h, w, 3), dtype=torch.uint8, device="cuda")
    for _ in range(3):
        up.upscale_tensor(frames, 4)
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(2):
            up.upscale_tensor(frames, 4)
        torch.cuda.synchronize()
    totals: dict[str, float] = {}
    kernels = []
    for event in prof.key_averages():
        cuda_us = getattr(event, "device_time_total", None) or getattr(event, "cuda_time_total", 0)
        if cuda_us <= 0:
            continue
        kernels.append((cuda_us, event.count, event.key))
        totals[category(event.key)] = totals.get(category(event.key), 0.0) + cuda_us
    per_frame = 1 / (2 * batch) / 1e3  # us over 2 passes of `batch` frames -> ms per frame
    print(f"{'ms/frame':>9} {'calls':>6}  kernel")
    for cuda_us, count, key in sorted(kernels, reverse=True)[:18]:
        print(f"{cuda_us * per_frame:9.3f} {count:6d}  {key[:110]}")
    print(f"\n{'ms/frame':>9}  category")
    for label, cuda_us in sorted(totals.items(), key=lambda item: -item[1]):
        print(f"{cuda_us * per_frame:9.3f}  {label}")
    print(f"{sum(totals.values()) * per_frame:9.3f}  all kernels ({1e3 / (sum(totals.values()) * per_frame):.2f} frames/s of GPU time)")


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--size", default="640x480")
    parser.add_argument("--batch", type=int, default=4)
    args = parser.parse_args()
    w, h = (int(v) for v in args.size.split("x"))
    profile(w, h, args.batch)
    return 0


if __name__ == "__main__":
    sys.exit(main())
