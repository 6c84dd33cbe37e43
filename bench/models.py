"""Each model's speed, and the fast model end to end against the encoder alone (GPU; CPU figures too).

    KERNEL_CACHE_DIR=... python bench/models.py --json PATH [--seconds 10] [--presets medium,veryfast]
        [--cpu-threads 8,16] [--ffmpeg ffmpeg] [--ffprobe ffprobe]

1. Model alone, every model, 640x480 and 1280x720 (frames on the device, a full batch, median of 10).
2. realesr-animevideov3 end to end on a Mandelbrot-with-grain clip (640x480 → x4 and 1280x720 → x2),
   per x264 preset, against the encoder alone: the same upscaled frames, held in memory, written
   through the pipeline's writer (the same pipe, colour conversion and x264 settings) as fast as
   it takes them. The end-to-end figure can only approach that ceiling.
3. The CPU: each model's speed with N threads (a 160x120 frame, the CPU profile's tiles), turned
   into frames/s at 640x480 and 1280x720 by the pixels the model takes in per frame.
"""

import argparse
import dataclasses
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "bench")]

from echoshot_ai_server.app.pipeline import upscale_video  # noqa: E402
from echoshot_ai_server.app.wiring import encoder_settings, load_engine, tuned_file  # noqa: E402
from echoshot_ai_server.config import Settings  # noqa: E402
from echoshot_ai_server.engine.specs import MODELS  # noqa: E402
from echoshot_ai_server.media.probe import probe  # noqa: E402
from echoshot_ai_server.media.reader import FrameReader  # noqa: E402
from echoshot_ai_server.media.rawstream import TimedFrames  # noqa: E402
from echoshot_ai_server.media.writer import FrameWriter  # noqa: E402
from run import make_clip  # noqa: E402

SIZES = ((640, 480, 4), (1280, 720, 2))


def model_fps(upscaler, width: int, height: int, scale: int) -> float:
    frames = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (upscaler.batch_frames, height, width, 3),
                                                                  dtype=np.uint8)).to(upscaler.torch_device)
    upscaler.upscale_tensor(frames, scale)
    times = []
    for _ in range(10):
        torch.cuda.synchronize()
        started = time.perf_counter()
        upscaler.upscale_tensor(frames, scale)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - started)
    return len(frames) / statistics.median(times)


def encoder_alone(clip: Path, batches: list[TimedFrames], out: Path, encoder, timescale: int, scale: int,
                  ffprobe: str) -> float:
    info = probe(clip, ffprobe)
    width, height = info.display_size
    started = time.perf_counter()
    with FrameWriter(out, width=width * scale, height=height * scale, timescale=timescale, encoder=encoder,
                     colour=info.colour) as writer:
        for batch in batches:
            writer.write(batch)
    return sum(len(b) for b in batches) / (time.perf_counter() - started)


def fast_model_end_to_end(settings, args, report) -> None:
    spec = MODELS["realesr-animevideov3"]
    [upscaler] = load_engine(settings, "gpu", spec=spec)
    upscaler.warm_up(tuned=tuned_file(settings))
    with tempfile.TemporaryDirectory() as tmp:
        for width, height, scale in SIZES:
            clip = make_clip(args.ffmpeg, Path(tmp) / f"clip{width}.mp4", (width, height), args.seconds)
            with FrameReader(clip, probe(clip, args.ffprobe), ffmpeg=args.ffmpeg) as reader:
                timescale = reader.track.timescale
                source = list(reader.batches(upscaler.batch_frames))
            upscaled = [TimedFrames(upscaler.upscale(b.frames, scale), b.pts, b.durations) for b in source]
            frames = sum(len(b) for b in source)
            for preset in args.presets.split(","):
                encoder = dataclasses.replace(encoder_settings(settings), preset=preset)
                ceiling = encoder_alone(clip, upscaled, Path(tmp) / "alone.mp4", encoder, timescale, scale, args.ffprobe)
                started = time.perf_counter()
                result = upscale_video(clip, Path(tmp) / "e2e.mp4", scale=scale, device="gpu",
                                       get_upscaler=lambda: upscaler, encoder=encoder, ffprobe=args.ffprobe)
                e2e = result.metadata.frame_count / (time.perf_counter() - started)
                run = {"size": f"{width}x{height}", "scale": scale, "preset": preset, "frames": frames,
                       "encoder_alone_fps": round(ceiling, 2), "end_to_end_fps": round(e2e, 2),
                       "of_encoder": round(e2e / ceiling, 3),
                       "stages_s": {k: round(v, 2) for k, v in result.stages_s.items()}}
                report["fast_model_end_to_end"].append(run)
                print(json.dumps(run), flush=True)
                args.json.write_text(json.dumps(report, indent=2))


def cpu_speeds(settings, threads: int, specs) -> list[dict]:
    torch.set_num_threads(threads)
    rows = []
    for spec in specs:
        [upscaler] = load_engine(settings, "cpu", spec=spec)
        upscaler.measure_speed((64, 48))  # oneDNN's first call
        speed = upscaler.measure_speed((160, 120))
        rows.append({"model": spec.name, "threads": threads, "precision": str(upscaler.dtype).removeprefix("torch."),
                     "pixels_per_s": round(speed),
                     "tflops": round(speed * spec.mflop_per_pixel / 1e6, 3),
                     **{f"fps_{w}x{h}": round(speed / upscaler.work_pixels(h, w), 4) for w, h, _ in SIZES}})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", type=Path, required=True)
    parser.add_argument("--seconds", type=float, default=10)
    parser.add_argument("--presets", default="medium,veryfast")
    parser.add_argument("--cpu-threads", default="8,16")
    parser.add_argument("--models", default=",".join(MODELS), help="comma-separated (default: all)")
    parser.add_argument("--cpu-only", action="store_true", help="only part 3 (a machine without a GPU)")
    parser.add_argument("--cpu-precision", default="auto", choices=("auto", "fp32", "bf16"))
    parser.add_argument("--ffmpeg", default="ffmpeg")
    parser.add_argument("--ffprobe", default="ffprobe")
    args = parser.parse_args()
    settings = Settings(ffmpeg_bin=args.ffmpeg, ffprobe_bin=args.ffprobe, cpu_precision=args.cpu_precision)
    report = {"card": None if args.cpu_only else torch.cuda.get_device_name(0), "torch": torch.__version__,
              "seconds": args.seconds, "cpu_precision": args.cpu_precision,
              "model_only": [], "fast_model_end_to_end": [], "cpu": []}
    specs = [MODELS[name] for name in args.models.split(",")]
    for spec in [] if args.cpu_only else specs:
        [upscaler] = load_engine(settings, "gpu", spec=spec)
        started = time.perf_counter()
        upscaler.warm_up(tuned=tuned_file(settings))
        row = {"model": spec.name, "engine": upscaler.engine, "warm_up_s": round(time.perf_counter() - started, 1),
               **{f"fps_{w}x{h}_x{s}": round(model_fps(upscaler, w, h, s), 1) for w, h, s in SIZES}}
        row["tflops_640x480"] = round(row["fps_640x480_x4"] * 640 * 480 * spec.mflop_per_pixel / 1e6, 1)
        report["model_only"].append(row)
        print(json.dumps(row), flush=True)
        del upscaler
        torch.cuda.empty_cache()
    args.json.write_text(json.dumps(report, indent=2))
    if not args.cpu_only:
        fast_model_end_to_end(settings, args, report)
    for threads in (int(t) for t in args.cpu_threads.split(",") if t):
        report["cpu"] += cpu_speeds(settings, threads, specs)
        args.json.write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
