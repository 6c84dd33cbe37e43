"""fp8 (e4m3) for RealESRGAN_x4plus: what it would cost in pixels, and what it could gain in speed.

    .venv/bin/python bench/fp8.py psnr --json PATH [--size 96x72] [--frames 3]      (any machine)
    python bench/fp8.py speed --json PATH                                            (Hopper GPU)

psnr: every convolution's input and weights rounded to float8_e4m3fn (weights scaled per output
channel, activations per tensor by their largest magnitude, as a dynamic-scaling fp8 engine would;
"per pixel": a scale for each pixel's channels, the finest scaling a GEMM's rows can carry),
the products summed in fp32; against the same network in fp32 and in bf16 (the same rounding to
bf16 instead), on Mandelbrot-with-grain frames (as bench/run.py) and on noise-free gradients.
speed: the convolutions' matrix products at their shapes in the fused engine (M = 4 frames of
640x480, K = 9 x input channels, N = output channels), bf16 `torch.mm` against fp8 `torch._scaled_mm`,
median of 20, and the model's TFLOP split by step, to bound what fp8 could buy end to end.
"""

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

E4M3_MAX = 448.0


def to_fp8(x: torch.Tensor, dims: tuple[int, ...] | None) -> torch.Tensor:
    """x rounded to e4m3 with a scale per slice over `dims` (None: one scale), returned dequantised."""
    amax = x.abs().amax() if dims is None else x.abs().amax(dim=dims, keepdim=True)
    scale = E4M3_MAX / amax.clamp(min=1e-12)
    return (x * scale).to(torch.float8_e4m3fn).float() / scale


def rounded(kind: str):
    def conv_forward(module, inputs):
        x, = inputs
        if kind.startswith("fp8"):
            module.weight.data = to_fp8(module._fp32_weight, (1, 2, 3))
            return (to_fp8(x, (1,) if kind == "fp8 per pixel" else None),)
        module.weight.data = module._fp32_weight.bfloat16().float()
        return (x.bfloat16().float(),)
    return conv_forward


def frames(kind: str, w: int, h: int, n: int) -> np.ndarray:
    source = {"grain": f"mandelbrot=size={w}x{h}:rate=10,noise=alls=6:allf=t+u",
              "gradients": f"gradients=size={w}x{h}:rate=10:speed=0.05"}[kind]
    raw = subprocess.run(["ffmpeg", "-nostdin", "-loglevel", "error", "-f", "lavfi", "-i", source, "-frames:v", str(n),
                          "-f", "rawvideo", "-pix_fmt", "rgb24", "-"], check=True, capture_output=True).stdout
    return np.frombuffer(raw, np.uint8).reshape(n, h, w, 3)


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    a8, b8 = (t.clamp(0, 1).mul(255).round() for t in (a, b))
    mse = float(((a8 - b8) ** 2).mean())
    return 99.0 if mse == 0 else 10 * np.log10(255.0**2 / mse)


@torch.inference_mode()
def run_psnr(args) -> dict:
    from echoshot_ai_server.config import Settings
    from echoshot_ai_server.engine.models import load_model
    from echoshot_ai_server.engine.specs import X4PLUS

    w, h = (int(v) for v in args.size.split("x"))
    model = load_model(Settings().weights_dir / X4PLUS.weights_file, X4PLUS.arch).eval()
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    for conv in convs:
        conv._fp32_weight = conv.weight.data.clone()
    report = {"size": args.size, "frames": args.frames, "psnr_db": {}}
    for content in ("grain", "gradients"):
        x = torch.from_numpy(frames(content, w, h, args.frames).copy()).permute(0, 3, 1, 2).float() / 255
        reference = torch.cat([model(x[i:i + 1]) for i in range(len(x))])
        for kind in ("bf16", "fp8", "fp8 per pixel"):
            hooks = [conv.register_forward_pre_hook(rounded(kind)) for conv in convs]
            out = torch.cat([model(x[i:i + 1]) for i in range(len(x))])
            for hook in hooks:
                hook.remove()
            for conv in convs:
                conv.weight.data = conv._fp32_weight.clone()
            report["psnr_db"][f"{content} {kind}"] = round(statistics.mean(psnr(o, r) for o, r in zip(out, reference)), 2)
            print(content, kind, report["psnr_db"][f"{content} {kind}"], flush=True)
    return report


def timed(fn, repeats: int = 20) -> float:
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        torch.cuda.synchronize()
        started = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def run_speed(args) -> dict:
    m = 4 * 640 * 480
    # (name, K = 9 x input channels, N = output channels, how many per RRDB block) in RealESRGAN_x4plus
    shapes = [("dense step 1", 9 * 64, 32, 3), ("dense step 2", 9 * 96, 32, 3), ("dense step 3", 9 * 128, 32, 3),
              ("dense step 4", 9 * 160, 32, 3), ("conv5", 9 * 192, 64, 3)]
    report = {"card": torch.cuda.get_device_name(0), "m": m, "shapes": []}
    for name, k, n, _ in shapes:
        a = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        b = torch.randn(n, k, device="cuda", dtype=torch.bfloat16)
        a8, b8 = a.to(torch.float8_e4m3fn), b.to(torch.float8_e4m3fn)
        one = torch.ones((), device="cuda")
        bf16_s = timed(lambda: torch.mm(a, b.t()))
        fp8_s = timed(lambda: torch._scaled_mm(a8, b8.t(), scale_a=one, scale_b=one, out_dtype=torch.bfloat16))
        flop = 2 * m * k * n
        row = {"step": name, "k": k, "n": n, "bf16_tflops": round(flop / bf16_s / 1e12, 1),
               "fp8_tflops": round(flop / fp8_s / 1e12, 1), "fp8_speedup": round(bf16_s / fp8_s, 2)}
        report["shapes"].append(row)
        print(json.dumps(row), flush=True)
    big = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    big8 = big.to(torch.float8_e4m3fn)
    one = torch.ones((), device="cuda")
    report["square_8192_bf16_tflops"] = round(2 * 8192**3 / timed(lambda: torch.mm(big, big)) / 1e12, 1)
    report["square_8192_fp8_tflops"] = round(2 * 8192**3 / timed(lambda: torch._scaled_mm(
        big8, big8.t(), scale_a=one, scale_b=one, out_dtype=torch.bfloat16)) / 1e12, 1)
    print(json.dumps({k: v for k, v in report.items() if k.startswith("square")}), flush=True)
    return report


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("part", choices=("psnr", "speed"))
    parser.add_argument("--json", type=Path, required=True)
    parser.add_argument("--size", default="96x72")
    parser.add_argument("--frames", type=int, default=3)
    args = parser.parse_args()
    report = run_psnr(args) if args.part == "psnr" else run_speed(args)
    args.json.write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
