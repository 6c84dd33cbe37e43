"""What each engine choice buys, on one GPU: the model alone on device-resident frames, and the
H.264 encoder's own ceiling at the output size.

    python3 bench/model_variants.py --json variants.json [--size 640x480] [--compile]
"""

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from echoshot_ai_server.engine.models import build_model  # noqa: E402
from echoshot_ai_server.engine.specs import X4PLUS, RRDBNetArch  # noqa: E402
from echoshot_ai_server.engine.upscaler import RunProfile, Upscaler  # noqa: E402

MFLOP_PER_PIXEL = 35.85
FEAT_CHANNELS = 64


def timed(fn, repeats: int) -> float:
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeats):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / 1e3 / repeats


def engine(model, tile: int, batch: int, channels_last: bool = True, kind: str = "eager") -> Upscaler:
    return Upscaler(model, device="gpu", profile=RunProfile(tile, 10, 128, half=True, batch_frames=batch, engine=kind,
                                                            channels_last=channels_last))


def encoder_fps(ffmpeg: str, width: int, height: int, frames: int, pix_fmt: str) -> float:
    rng = np.random.default_rng(0)
    frame = rng.integers(0, 255, (height, width, 3 if pix_fmt == "bgr24" else 1), dtype=np.uint8)
    if pix_fmt == "yuv420p":
        frame = rng.integers(0, 255, (height * 3 // 2, width), dtype=np.uint8)
    data = frame.tobytes()
    process = subprocess.Popen(
        [ffmpeg, "-loglevel", "error", "-y", "-f", "rawvideo", "-pix_fmt", pix_fmt, "-video_size", f"{width}x{height}",
         "-framerate", "30", "-i", "pipe:0", "-c:v", "libx264", "-preset", "medium", "-crf", "23", "-pix_fmt", "yuv420p",
         "-f", "mp4", "/tmp/encoder-test.mp4"],
        stdin=subprocess.PIPE,
    )
    started = time.perf_counter()
    for _ in range(frames):
        process.stdin.write(data)
    process.stdin.close()
    process.wait()
    return frames / (time.perf_counter() - started)


def layer_rows(results: dict, args, w: int, h: int, batch: int = 4) -> None:
    """One dense block's convolutions at batch 4: cuDNN (contiguous channels-last input, as after a
    torch.cat) against the Triton kernel reading its input in place from the 192-channel buffer."""
    from echoshot_ai_server.engine.fused_trunk import PackedConv, conv3x3_tuned, dense_steps, dense_step_views

    torch.backends.cudnn.benchmark = True
    rows = batch * (h + 2) * (w + 2)
    buffer = torch.randn(rows, 192, device="cuda", dtype=torch.float16)
    for cin, cout in [(64, 32), (96, 32), (128, 32), (160, 32), (192, 64)]:
        conv = torch.nn.Conv2d(cin, cout, 3, padding=1).cuda().half().to(memory_format=torch.channels_last)
        dense = torch.randn(batch, cin, h, w, device="cuda", dtype=torch.float16).contiguous(memory_format=torch.channels_last)
        cudnn_s = timed(lambda: conv(dense), 20)
        packed = PackedConv.of(conv, torch.float16)
        out = torch.empty(rows, cout, device="cuda", dtype=torch.float16)
        if cout == FEAT_CHANNELS:  # conv5: the residual epilogue, as in the trunk
            triton_s = timed(lambda: packed(buffer, out, (h, w), res1=buffer[:, :cout], scale=0.2), 20)
        else:
            triton_s = timed(lambda: packed(buffer[:, :cin], out, (h, w), lrelu=True), 20)
        flop = 2 * 9 * cin * cout * batch * h * w
        timings = getattr(conv3x3_tuned, "configs_timings", None) or {}
        for cfg, ms in sorted(timings.items(), key=lambda item: item[1][0] if isinstance(item[1], list) else item[1])[:12]:
            ms = ms[0] if isinstance(ms, list) else ms
            print(f"    {cin}->{cout} {ms * 1e3:8.0f} us  {cfg}", flush=True)
        best = [str(cfg) for key, cfg in conv3x3_tuned.cache.items() if cin in key and cout in key]
        row = {"variant": f"conv {cin}->{cout}, batch {batch}", "cudnn_us": round(cudnn_s * 1e6), "triton_us": round(triton_s * 1e6),
               "cudnn_tflops": round(flop / cudnn_s / 1e12, 1), "triton_tflops": round(flop / triton_s / 1e12, 1),
               "triton_config": best[:1]}
        results["rows"].append(row)
        print(json.dumps(row), flush=True)
        args.json.write_text(json.dumps(results, indent=2))

    # conv1..conv4 regrouped by input (the engine's dense steps), against the four convolutions above
    rdb = build_model(RRDBNetArch(num_block=1)).body[0].rdb1.cuda()
    steps = dense_steps(rdb, 64, 32, torch.float16)
    total = 0.0
    for j, step in enumerate(steps):
        src, out = dense_step_views(buffer, j, 64, 32)
        seconds = timed(lambda: step(src, out, (h, w), lrelu=True, grow=32, sums_in=j > 0), 20)
        total += seconds
        flop = 2 * 9 * step.cin * step.cout * batch * h * w
        row = {"variant": f"dense step {j}: {step.cin} -> {step.cout} columns, batch {batch}", "triton_us": round(seconds * 1e6),
               "triton_tflops": round(flop / seconds / 1e12, 1)}
        results["rows"].append(row)
        print(json.dumps(row), flush=True)
    row = {"variant": "dense steps 0-3 together (= conv1..conv4)", "triton_us": round(total * 1e6),
           "triton_tflops_nominal": round(2 * 9 * (64 + 96 + 128 + 160) * 32 * batch * h * w / total / 1e12, 1)}
    results["rows"].append(row)
    print(json.dumps(row), flush=True)
    args.json.write_text(json.dumps(results, indent=2))


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--json", type=Path, required=True)
    parser.add_argument("--size", default="640x480")
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--compile-batches", default="1,4")
    parser.add_argument("--ffmpeg", default=None)
    parser.add_argument("--fused", action="store_true", help="also the fused Triton trunk")
    parser.add_argument("--only-fused", action="store_true", help="skip the eager variants")
    parser.add_argument("--layers", action="store_true", help="each dense-block convolution: cuDNN vs the Triton kernel")
    args = parser.parse_args()
    w, h = (int(v) for v in args.size.split("x"))
    torch.manual_seed(0)
    model = build_model(X4PLUS.arch)
    results = {"card": torch.cuda.get_device_name(0), "torch": torch.__version__, "size": args.size, "rows": []}

    def record(name: str, seconds_per_batch: float, batch: int, extra: dict | None = None) -> None:
        fps = batch / seconds_per_batch
        row = {"variant": name, "fps": round(fps, 2), "tflops": round(MFLOP_PER_PIXEL * 1e6 * w * h * fps / 1e12, 1),
               "peak_gb": round(torch.cuda.max_memory_allocated() / 1024**3, 2), **(extra or {})}
        results["rows"].append(row)
        print(json.dumps(row), flush=True)
        args.json.write_text(json.dumps(results, indent=2))

    frames = torch.randint(0, 256, (16, h, w, 3), dtype=torch.uint8, device="cuda")
    if args.layers:
        layer_rows(results, args, w, h)
    if args.fused or args.only_fused:
        from echoshot_ai_server.engine.fused_trunk import FusedRRDBNet

        reference = engine(model, 0, 1)
        expected = reference.upscale_tensor(frames[:1], 4).float()
        for batch, compile_tail in [(1, False), (4, False), (4, True), (8, True)]:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            up = engine(model, 0, batch)
            up.forward = FusedRRDBNet(up.model, compile_head_tail=compile_tail)
            up.fixed_shapes = True
            started = time.perf_counter()
            got = up.upscale_tensor(frames[:batch], 4)[:1].float()
            torch.cuda.synchronize()
            warmup = time.perf_counter() - started
            diff = (got - expected).abs()
            tail = ", compiled tail" if compile_tail else ""
            record(f"fused Triton trunk (TMA), whole frame, batch {batch}{tail}",
                   timed(lambda: up.upscale_tensor(frames[:batch], 4), 5),
                   batch, {"first_call_s": round(warmup, 1), "max_abs_diff_uint8": diff.max().item(),
                           "mean_abs_diff_uint8": round(diff.mean().item(), 4)})
    if not args.only_fused:  # the eager variants
        for name, tile, batch, channels_last in [
            ("fp16 NCHW, tile 256, batch 1 (the guide's model settings)", 256, 1, False),
            ("fp16 channels-last, tile 256, batch 1", 256, 1, True),
            ("fp16 channels-last, tile 256, batch 4", 256, 4, True),
            ("fp16 channels-last, whole frame, batch 1", 0, 1, True),
            ("fp16 channels-last, whole frame, batch 2", 0, 2, True),
            ("fp16 channels-last, whole frame, batch 4", 0, 4, True),
            ("fp16 channels-last, whole frame, batch 8", 0, 8, True),
        ]:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            up = engine(model, tile, batch, channels_last)
            record(name, timed(lambda: up.upscale_tensor(frames[:batch], 4), 5), batch)

        # Memory per input pixel of a whole-frame forward (for planning tiles and batches)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        up = engine(model, 0, 1)
        up.upscale_tensor(frames[:1], 4)
        torch.cuda.synchronize()
        results["bytes_per_input_pixel_fp16"] = round((torch.cuda.max_memory_allocated() - base) / (w * h))
        print("bytes per input pixel:", results["bytes_per_input_pixel_fp16"], flush=True)

    if args.compile:
        for batch in (int(b) for b in args.compile_batches.split(",")):
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            up = engine(build_model(X4PLUS.arch), 0, batch, kind="compile")
            started = time.perf_counter()
            up.upscale_tensor(frames[:batch], 4)
            torch.cuda.synchronize()
            compile_s = time.perf_counter() - started
            record(f"torch.compile, whole frame, batch {batch}", timed(lambda: up.upscale_tensor(frames[:batch], 4), 5),
                   batch, {"compile_s": round(compile_s, 1)})

    if args.ffmpeg:
        for scale in (4, 2):
            for pix_fmt in ("bgr24", "yuv420p"):
                fps = encoder_fps(args.ffmpeg, w * scale, h * scale, 60, pix_fmt)
                row = {"variant": f"libx264 medium crf 23, {w * scale}x{h * scale} from {pix_fmt} on stdin", "fps": round(fps, 1)}
                results["rows"].append(row)
                print(json.dumps(row), flush=True)
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
