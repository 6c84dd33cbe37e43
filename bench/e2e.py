"""End to end against the model alone, on one clip, for a few x264 presets (GPU).

Loads the engine as a worker does (KERNEL_CACHE_DIR, start-up warm-up), then upscales the clip with
each preset, each colour conversion (`yuv`: to YUV 4:2:0 on the GPU, as workers do; `ffmpeg`: RGB
to the encoder, which converts) and each part length (ENCODE_PART_S: 0 is one encoder), and times the
model alone on the same frames: where the pipeline loses speed to the model, and whether the encoder
is what holds it back.

    KERNEL_CACHE_DIR=... python bench/e2e.py --json PATH [--size 640x480] [--scale 4] [--seconds 10]
        [--presets medium,veryfast] [--conversions yuv,ffmpeg] [--part-seconds 0,2] [--ffmpeg ffmpeg]
        [--ffprobe ffprobe]
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
from run import children_cpu_s, clip_arguments, make_clip  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    clip_arguments(parser)
    parser.add_argument("--presets", default="medium,veryfast")
    parser.add_argument("--conversions", default="yuv,ffmpeg")
    parser.add_argument("--part-seconds", default="0", help="ENCODE_PART_S values to compare (0: one encoder)")
    args = parser.parse_args()
    w, h = (int(v) for v in args.size.split("x"))
    settings = Settings(ffmpeg_bin=args.ffmpeg, ffprobe_bin=args.ffprobe)
    [upscaler] = load_engine(settings, "gpu")
    report = {"warm_up_s": round(upscaler.warm_up(tuned=tuned_file(settings)), 1), "size": args.size, "scale": args.scale,
              "card": torch.cuda.get_device_name(0), "runs": []}
    if (compiling := upscaler.compile_tail()) is not None:
        compiling.join()  # the steady state
    with tempfile.TemporaryDirectory() as tmp:
        clip = make_clip(args.ffmpeg, Path(tmp) / "clip.mp4", (w, h), args.seconds)
        runs = [(preset, conversion, float(part_s)) for preset in args.presets.split(",")
                for conversion in args.conversions.split(",") for part_s in args.part_seconds.split(",")]
        for preset, conversion, part_s in runs:
            encoder = dataclasses.replace(encoder_settings(settings), preset=preset, part_s=part_s)
            upscaler.yuv_on_device = conversion == "yuv"
            started, ffmpeg_before = time.monotonic(), children_cpu_s()
            result = upscale_video(clip, Path(tmp) / f"out-{preset}.mp4", scale=args.scale, device="gpu",
                                   get_upscaler=lambda: upscaler, encoder=encoder, ffprobe=args.ffprobe)
            seconds = time.monotonic() - started
            run = {"preset": preset, "conversion": conversion, "part_s": part_s, "frames": result.metadata.frame_count,
                   "fps": round(result.metadata.frame_count / seconds, 2),
                   "ffmpeg_cpu_s": round(children_cpu_s() - ffmpeg_before, 1),  # decoder, encoder, probes
                   "stages_s": {k: round(v, 2) for k, v in result.stages_s.items()}}
            report["runs"].append(run)
            print(json.dumps(run), flush=True)
    frames = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (upscaler.batch_frames, h, w, 3),
                                                                  dtype=np.uint8)).cuda()
    times = []
    for _ in range(10):
        started = time.monotonic()
        upscaler.upscale_tensor(frames, args.scale)
        torch.cuda.synchronize()
        times.append(time.monotonic() - started)
    report["model_fps"] = round(len(frames) / statistics.median(times), 2)
    for run in report["runs"]:
        run["of_model"] = round(run["fps"] / report["model_fps"], 3)
    print(json.dumps({k: v for k, v in report.items() if k != "runs"}), flush=True)
    args.json.write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
