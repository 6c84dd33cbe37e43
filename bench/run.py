"""Side by side, on the same clips, weights and machine: the guide's design ("seed") against this
project's pipeline ("ours"), plus our engine alone on device-resident frames ("model only").

    .venv/bin/python bench/run.py --device cpu --quick --json bench-cpu.json
    python3 bench/run.py --device cuda --json bench-gpu.json --weights random

Reports per clip and scale: end-to-end frames/s of seed and ours (file to file, audio included)
and their ratio; the model's frames/s and TFLOP/s next to the card's measured bf16 matrix rate;
peak GPU memory; PSNR of our frames against fp32 RealESRGANer reference frames, before H.264
(`psnr_db`) and after decoding our output file (`psnr_decoded_db`).
"""

import argparse
import dataclasses
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import cv2
import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from echoshot_ai_server.config import Settings  # noqa: E402
from echoshot_ai_server.app.pipeline import upscale_video  # noqa: E402
from echoshot_ai_server.engine.models import build_model, reference_model  # noqa: E402
from echoshot_ai_server.engine.specs import X4PLUS  # noqa: E402
from echoshot_ai_server.engine.upscaler import load_upscalers  # noqa: E402
from echoshot_ai_server.app.wiring import run_profile  # noqa: E402
from echoshot_ai_server.media.probe import probe  # noqa: E402
from echoshot_ai_server.media.reader import FrameReader  # noqa: E402
from echoshot_ai_server.media.writer import EncoderSettings  # noqa: E402

FFMPEG, FFPROBE = "ffmpeg", "ffprobe"  # set from the command line

FULL_CASES = [((640, 480), 4), ((1280, 720), 2), ((640, 480), 2), ((1280, 720), 4)]
QUICK_CASES = [((80, 60), 4), ((80, 60), 2)]


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def run(args: list[str]) -> None:
    subprocess.run(args, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


# -- inputs ---------------------------------------------------------------------------------
def clip_arguments(parser: argparse.ArgumentParser) -> None:
    """The clip a bench makes (--size, --seconds), its scale, where the results go (--json) and the tools."""
    parser.add_argument("--json", type=Path, required=True)
    parser.add_argument("--size", default="640x480")
    parser.add_argument("--scale", type=int, default=4)
    parser.add_argument("--seconds", type=float, default=10)
    parser.add_argument("--ffmpeg", default="ffmpeg")
    parser.add_argument("--ffprobe", default="ffprobe")


def children_cpu_s() -> float:
    """CPU seconds of this process's finished children (ffmpeg's, here)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def make_clip(ffmpeg: str, path: Path, size: tuple[int, int], seconds: float, fps: int = 30) -> Path:
    """Stand-in for natural footage: a Mandelbrot zoom (smooth gradients, fine detail, motion
    everywhere) with film grain, and a tone as the audio track."""
    w, h = size
    run([ffmpeg, "-nostdin", "-y", "-loglevel", "error",
         "-f", "lavfi", "-i", f"mandelbrot=size={w}x{h}:rate={fps},noise=alls=6:allf=t+u,format=yuv420p",
         "-f", "lavfi", "-i", f"sine=frequency=330:sample_rate=44100:duration={seconds}",
         "-t", str(seconds), "-c:v", "libx264", "-crf", "16", "-preset", "fast", "-c:a", "aac", str(path)])
    return path


def weights_file(choice: str, workdir: Path) -> tuple[Path, str]:
    """The official weights, or RRDBNet x4plus with random weights saved as a checkpoint.

    Speed does not depend on the weights' values. The random model is initialised so that its
    output varies with its input (not a constant), which keeps the PSNR comparison meaningful.
    """
    if choice != "random":
        return Path(choice), Path(choice).name
    torch.manual_seed(0)
    model = build_model(X4PLUS.arch)
    with torch.no_grad():
        model.conv_last.bias.fill_(0.5)
        model.conv_last.weight.mul_(4.0)
    path = workdir / "random_x4plus.pth"
    torch.save({"params_ema": model.state_dict()}, path)
    return path, "random-init RRDBNet x4plus"


def decode(path: Path, limit: int | None = None) -> list[np.ndarray]:
    """Frames as the pipeline (and a player) reads them: the file's colour tags, or the convention."""
    frames = []
    with FrameReader(path, probe(path, FFPROBE), ffmpeg=FFMPEG) as reader:
        for batch in reader.batches(8):
            frames += list(batch.frames)
            if limit is not None and len(frames) >= limit:
                break
    return frames[:limit]


# -- the guide's design, as written --------------------------------------------------------
def seed_enhancer(weights: Path, device: str):
    model = reference_model(X4PLUS.arch)  # basicsr's RRDBNet, as the guide builds it
    from realesrgan import RealESRGANer

    gpu = device == "cuda"
    return RealESRGANer(
        scale=4, model_path=str(weights), model=model, tile=256 if gpu else 128,
        tile_pad=10 if gpu else 5, pre_pad=0, half=gpu, device=torch.device(device),
    )


def run_seed(enhancer, source: Path, output: Path, scale: int, ffmpeg: str, workdir: Path) -> tuple[float, int]:
    """test_upscale_local.py's pipeline: audio to a .aac, frames through RealESRGANer into an mp4v
    file, then ffmpeg encodes that file again with the audio."""
    started = time.perf_counter()
    audio, temp_video = workdir / "temp_audio.aac", workdir / "temp_upscaled_no_audio.mp4"
    has_audio = subprocess.run([ffmpeg, "-nostdin", "-y", "-loglevel", "error", "-i", str(source), "-vn",
                                "-acodec", "copy", str(audio)]).returncode == 0
    capture = cv2.VideoCapture(str(source))
    fps = capture.get(cv2.CAP_PROP_FPS)
    w, h = int(capture.get(cv2.CAP_PROP_FRAME_WIDTH)), int(capture.get(cv2.CAP_PROP_FRAME_HEIGHT))
    writer = cv2.VideoWriter(str(temp_video), cv2.VideoWriter_fourcc(*"mp4v"), fps, (w * scale, h * scale))
    frames = 0
    while True:
        ok, frame = capture.read()
        if not ok:
            break
        img_rgb = cv2.cvtColor(frame, cv2.COLOR_BGR2RGB)
        upscaled_rgb, _ = enhancer.enhance(img_rgb, outscale=scale)
        writer.write(cv2.cvtColor(upscaled_rgb, cv2.COLOR_RGB2BGR))
        frames += 1
    writer.release()
    capture.release()
    encode = [ffmpeg, "-nostdin", "-y", "-loglevel", "error", "-i", str(temp_video)]
    encode += ["-i", str(audio)] if has_audio else []
    encode += ["-c:v", "libx264", "-preset", "medium", "-crf", "23"]
    encode += ["-c:a", "aac", "-b:a", "128k", "-shortest"] if has_audio else []
    run(encode + [str(output)])
    return time.perf_counter() - started, frames


# -- measurements ---------------------------------------------------------------------------
def flops_per_input_pixel(model: torch.nn.Module) -> float:
    """Multiply-adds x 2 of every convolution, per input pixel, counted on a 64x64 input."""
    total = 0

    def count(module, inputs, output):
        nonlocal total
        kh, kw = module.kernel_size
        total += 2 * module.in_channels // module.groups * kh * kw * output.numel()

    hooks = [m.register_forward_hook(count) for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    with torch.inference_mode():
        model(torch.zeros(1, 3, 64, 64))
    for hook in hooks:
        hook.remove()
    return total / (64 * 64)


def matmul_tflops() -> float:
    """The card's bf16 matrix rate, measured now (8192^3 products on random data)."""
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(10):
        a @ b
    end.record()
    torch.cuda.synchronize()
    return 10 * 2 * 8192**3 / (start.elapsed_time(end) / 1e3) / 1e12


def time_model(upscaler, frames: list[np.ndarray], scale: int, device: str, repeats: int) -> float:
    """Frames/s of the engine on frames already on the device (uint8 in, uint8 out)."""
    batch = torch.from_numpy(np.stack(frames[: upscaler.batch_frames])).to(upscaler.torch_device)
    upscaler.upscale_tensor(batch, scale)
    if device == "cuda":
        torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        upscaler.upscale_tensor(batch, scale)
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - started)
    return len(batch) / statistics.median(times)


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return 99.0 if mse == 0 else 10 * np.log10(255.0**2 / mse)


def reference_frames(weights: Path, frames: list[np.ndarray], scale: int, device: str) -> list[np.ndarray]:
    """fp32 RealESRGANer (the guide's tiles) on the same frames."""
    model = reference_model(X4PLUS.arch)
    from realesrgan import RealESRGANer

    gpu = device == "cuda"
    reference = RealESRGANer(
        scale=4, model_path=str(weights), model=model, tile=256 if gpu else 128,
        tile_pad=10 if gpu else 5, pre_pad=0, half=False, device=torch.device(device),
    )
    return [reference.enhance(frame, outscale=scale)[0] for frame in frames]


def bench_case(size, scale, args, weights, workdir, seed, flops_px, peak_tflops) -> dict:
    w, h = size
    name = f"{w}x{h}"
    source = make_clip(args.ffmpeg, workdir / f"clip_{name}.mp4", size, args.seconds)
    frames = decode(source)
    log(f"{name} x{scale}: {len(frames)} frames")

    settings = Settings(ffmpeg_bin=args.ffmpeg, ffprobe_bin=args.ffprobe, gpu_engine=args.engine)
    engine_device = "gpu" if args.device == "cuda" else "cpu"
    spec = dataclasses.replace(X4PLUS, weights_file=weights.name)
    [upscaler] = load_upscalers(weights.parent, spec, engine_device, run_profile(settings, engine_device),
                                memory_limit_gb=settings.gpu_memory_limit_gb)
    started = time.perf_counter()
    upscaler.upscale(np.stack(frames[: upscaler.batch_frames]), scale)  # warm-up: autotuning, compilation
    warmup_s = time.perf_counter() - started

    if args.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    ours_out = workdir / f"ours_{name}_x{scale}.mp4"
    encoder = EncoderSettings(settings.x264_preset, settings.x264_crf, settings.audio_bitrate, args.ffmpeg)
    started = time.perf_counter()
    result = upscale_video(source, ours_out, scale=scale, device=engine_device, get_upscaler=lambda: upscaler,
                           encoder=encoder, ffprobe=args.ffprobe)
    ours_s = time.perf_counter() - started
    peak_gb = torch.cuda.max_memory_allocated() / 1024**3 if args.device == "cuda" else None
    log(f"  ours: {ours_s:.1f}s ({result.metadata.frame_count / ours_s:.2f} frames/s)")

    model_fps = time_model(upscaler, frames, scale, args.device, args.model_repeats)
    model_tflops = flops_px * w * h * model_fps / 1e12
    log(f"  model only: {model_fps:.2f} frames/s, {model_tflops:.1f} TFLOP/s")

    seed_out = workdir / f"seed_{name}_x{scale}.mp4"
    seed_dir = workdir / f"seed_{name}_x{scale}"
    seed_dir.mkdir(exist_ok=True)  # the same case in a later round
    if args.skip_seed:
        seed_s, seed_frames = float("nan"), 0
    else:
        seed_s, seed_frames = run_seed(seed, source, seed_out, scale, args.ffmpeg, seed_dir)
        log(f"  seed: {seed_s:.1f}s ({seed_frames / seed_s:.2f} frames/s)")

    sample = frames[: args.psnr_frames]
    reference = reference_frames(weights, sample, scale, args.device)
    ours_frames = upscaler.upscale(np.stack(sample), scale)
    decoded = decode(ours_out, len(sample))
    case = {
        "clip": f"{name}@30fps, {len(frames)} frames, with audio",
        "size": name,
        "scale": scale,
        "engine": upscaler.engine,
        "frames": len(frames),
        "seed_fps": round(seed_frames / seed_s, 3) if seed_frames else None,
        "ours_fps": round(result.metadata.frame_count / ours_s, 3),
        "ratio": round((result.metadata.frame_count / ours_s) / (seed_frames / seed_s), 2) if seed_frames else None,
        "model_fps": round(model_fps, 2),
        "model_tflops": round(model_tflops, 1),
        "model_pct_of_bf16_peak": round(100 * model_tflops / peak_tflops, 1) if peak_tflops else None,
        "warmup_s": round(warmup_s, 2),
        "peak_gpu_memory_gb": round(peak_gb, 2) if peak_gb is not None else None,
        "psnr_db": round(statistics.mean(psnr(o, r) for o, r in zip(ours_frames, reference)), 2),
        "psnr_decoded_db": round(statistics.mean(psnr(o, r) for o, r in zip(decoded, reference)), 2),
        "psnr_seed_decoded_db": round(statistics.mean(psnr(o, r) for o, r in zip(decode(seed_out, len(sample)), reference)), 2)
        if seed_frames else None,
        "gpu_memory_limit_gb": settings.gpu_memory_limit_gb or None,
        "output_frames_match": result.metadata.frame_count == len(frames),
    }
    log(f"  psnr {case['psnr_db']} dB before H.264, {case['psnr_decoded_db']} dB decoded")
    if args.device == "cuda":
        torch.cuda.empty_cache()
    return case


def machine(device: str) -> dict:
    info = {"date": datetime.now(timezone.utc).strftime("%Y-%m-%d"), "torch": torch.__version__,
            "python": platform.python_version(), "cpu_threads": torch.get_num_threads()}
    if device == "cuda":
        info["card"] = torch.cuda.get_device_name(0)
        try:
            info["driver"] = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                            capture_output=True, text=True).stdout.strip()
        except FileNotFoundError:
            info["driver"] = None
    else:
        info["card"] = f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"
    return info


def markdown(report: dict) -> str:
    lines = [
        f"{report['machine']['card']}, driver {report['machine'].get('driver', '-')}, torch {report['machine']['torch']}, "
        f"{report['machine']['date']}; weights: {report['weights']}; "
        f"bf16 matrix rate measured: {report['bf16_tflops'] or '-'} TFLOP/s; model cost {report['mflop_per_pixel']} MFLOP/input pixel",
        "",
        "| clip | scale | engine | seed fps | ours fps | ours/seed | model fps | model TFLOP/s (% bf16) | warm-up s | peak GPU GB | PSNR dB (pre-H.264 / decoded / seed decoded) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for c in report["cases"]:
        pct = f" ({c['model_pct_of_bf16_peak']} %)" if c["model_pct_of_bf16_peak"] is not None else ""
        lines.append(
            f"| {c['size']} | x{c['scale']} | {c['engine']} | {c['seed_fps']} | {c['ours_fps']} | **{c['ratio']}x** | {c['model_fps']} | "
            f"{c['model_tflops']}{pct} | {c['warmup_s']} | {c['peak_gpu_memory_gb'] if c['peak_gpu_memory_gb'] is not None else '-'} | "
            f"{c['psnr_db']} / {c['psnr_decoded_db']} / {c['psnr_seed_decoded_db']} |"
        )
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=("cpu", "cuda"), required=True)
    parser.add_argument("--quick", action="store_true", help="tiny clips (CPU: under two minutes)")
    parser.add_argument("--json", type=Path, required=True, help="where to write the results")
    parser.add_argument("--weights", default=None, help="a .pth file, or 'random' (default: WEIGHTS_DIR's, else random)")
    parser.add_argument("--ffmpeg", default="ffmpeg")
    parser.add_argument("--ffprobe", default="ffprobe")
    parser.add_argument("--seconds", type=float, default=None, help="clip length (default 2, quick 1)")
    parser.add_argument("--cases", default=None, help="e.g. 640x480x4,1280x720x2")
    parser.add_argument("--psnr-frames", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=1, help="run every case this many times (seed and ours "
                        "alternate within each); the summary takes the median ratio")
    parser.add_argument("--skip-seed", action="store_true", help="ours only (e.g. a memory-limit check)")
    parser.add_argument("--model-repeats", type=int, default=None)
    parser.add_argument("--engine", choices=("auto", "fused", "compile", "eager"), default="auto",
                        help="the GPU engine of 'ours' (default: as the worker chooses)")
    args = parser.parse_args()
    global FFMPEG, FFPROBE
    FFMPEG, FFPROBE = args.ffmpeg, args.ffprobe
    args.seconds = args.seconds or (0.4 if args.quick else 2.0)
    args.model_repeats = args.model_repeats or (2 if args.quick else 10)
    if args.weights is None:
        default = Settings().weights_dir / X4PLUS.weights_file
        args.weights = str(default) if default.is_file() else "random"
    cases = QUICK_CASES if args.quick else FULL_CASES
    if args.cases:
        cases = [((int(w), int(h)), int(s)) for w, h, s in (c.split("x") for c in args.cases.split(","))]

    with tempfile.TemporaryDirectory(prefix="echoshot-bench-") as tmp:
        workdir = Path(tmp)
        weights, weights_label = weights_file(args.weights, workdir)
        flops_px = flops_per_input_pixel(build_model(X4PLUS.arch))
        peak = round(matmul_tflops(), 1) if args.device == "cuda" else None
        log(f"model: {flops_px / 1e6:.2f} MFLOP per input pixel; bf16 matrix rate: {peak} TFLOP/s")
        seed = None if args.skip_seed else seed_enhancer(weights, args.device)
        report = {"machine": machine(args.device), "weights": weights_label, "bf16_tflops": peak,
                  "mflop_per_pixel": round(flops_px / 1e6, 2), "quick": args.quick, "cases": []}
        for _ in range(args.rounds):
            for size, scale in cases:
                report["cases"].append(bench_case(size, scale, args, weights, workdir, seed, flops_px, peak))
                args.json.write_text(json.dumps(report, indent=2))  # partial results survive a timeout
        if args.rounds > 1:
            report["median_ratio"] = {
                f"{w}x{h}x{s}": statistics.median(c["ratio"] for c in report["cases"]
                                                  if c["size"] == f"{w}x{h}" and c["scale"] == s and c["ratio"])
                for (w, h), s in cases}
            args.json.write_text(json.dumps(report, indent=2))
    print(markdown(report))
    if "median_ratio" in report:
        print("median ours/seed over", args.rounds, "rounds:", report["median_ratio"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
