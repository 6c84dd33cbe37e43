"""The encoder alone, one x264 process against parts encoded by several at once (ENCODE_PART_S).

A clip (bench/run.py's Mandelbrot with film grain) is decoded and enlarged (bicubic, as a stand-in
for the model's output) into memory once; then the same frames go through the pipeline's writer
(same pipe, colour conversion and x264 settings) as fast as it takes them, for each part length
(0: one encoder). Reports frames/s, the encoder's CPU seconds (how many cores it kept busy) and
what was left to encode once the last frame was handed over. No GPU needed.

    python bench/encoder_parts.py --json PATH [--size 640x480] [--scale 4] [--seconds 10]
        [--part-seconds 0,2,1] [--preset medium] [--ffmpeg ffmpeg] [--ffprobe ffprobe]
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "bench")]

from echoshot_ai_server.media.parted_writer import open_writer  # noqa: E402
from echoshot_ai_server.media.probe import probe  # noqa: E402
from echoshot_ai_server.media.rawstream import TimedFrames  # noqa: E402
from echoshot_ai_server.media.reader import FrameReader  # noqa: E402
from echoshot_ai_server.media.writer import EncoderSettings  # noqa: E402
from run import children_cpu_s, clip_arguments, make_clip  # noqa: E402


def psnr_against(output: Path, batches: list[TimedFrames], ffmpeg: str) -> float:
    """The encoded video against the frames it was given (what x264's settings cost in quality)."""
    sent = np.concatenate([b.frames for b in batches])
    raw = subprocess.run([ffmpeg, "-nostdin", "-loglevel", "error", "-i", str(output), "-f", "rawvideo", "-pix_fmt",
                          "bgr24", "-"], check=True, capture_output=True).stdout
    got = np.frombuffer(raw, np.uint8).reshape(sent.shape)
    mse = np.mean((got.astype(np.float32) - sent.astype(np.float32)) ** 2)
    return float(10 * np.log10(255.0**2 / mse))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    clip_arguments(parser)
    parser.add_argument("--part-seconds", default="0,2,1")
    parser.add_argument("--preset", default="medium")
    args = parser.parse_args()
    w, h = (int(v) for v in args.size.split("x"))
    report = {"size": args.size, "scale": args.scale, "preset": args.preset, "cpus": os.cpu_count(), "runs": []}
    with tempfile.TemporaryDirectory() as tmp:
        clip = make_clip(args.ffmpeg, Path(tmp) / "clip.mp4", (w, h), args.seconds)
        info = probe(clip, args.ffprobe)
        batches = []
        with FrameReader(clip, info, ffmpeg=args.ffmpeg) as reader:
            timescale = reader.track.timescale
            for batch in reader.batches(4):
                big = np.stack([cv2.resize(f, (w * args.scale, h * args.scale), interpolation=cv2.INTER_CUBIC)
                                for f in batch.frames])
                batches.append(TimedFrames(big, batch.pts, batch.durations))
        writer_args = dict(width=w * args.scale, height=h * args.scale, timescale=timescale, colour=info.colour,
                           bits=info.bits, sample_aspect=info.display_sample_aspect, streams_from=clip, audio=True,
                           subtitles=(), video_start_s=info.video_start_s,
                           end_s=info.video_start_s + info.video_duration_s)
        for part_s in (float(v) for v in args.part_seconds.split(",")):
            encoder = EncoderSettings(preset=args.preset, ffmpeg=args.ffmpeg, part_s=part_s)
            report["runs"].append(encode(batches, Path(tmp) / f"out-{part_s}.mp4", encoder, writer_args))
            print(json.dumps(report["runs"][-1]), flush=True)
    args.json.write_text(json.dumps(report, indent=2))
    return 0


def encode(batches: list[TimedFrames], output: Path, encoder: EncoderSettings, writer_args: dict) -> dict:
    """The frames through the job's writer as fast as it takes them, timed."""
    frames = sum(len(b) for b in batches)
    started, cpu_before = time.monotonic(), children_cpu_s()
    with open_writer(output, encoder, lambda: False, **writer_args) as writer:
        for batch in batches:
            writer.write(batch)
        handed_over = time.monotonic()
    seconds, after_last = time.monotonic() - started, time.monotonic() - handed_over
    cpu = children_cpu_s() - cpu_before
    return {"part_s": encoder.part_s, "frames": frames, "fps": round(frames / seconds, 2),
            "after_last_frame_s": round(after_last, 2), "encoder_cpu_s": round(cpu, 1),
            "cores_busy": round(cpu / seconds, 1), "bytes": output.stat().st_size,
            "psnr_db": round(psnr_against(output, batches, encoder.ffmpeg), 2)}


if __name__ == "__main__":
    sys.exit(main())
