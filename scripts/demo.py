"""`make demo`: upscale a small generated sample clip with the real model and say where the result is."""

import subprocess
import sys
import time
from pathlib import Path

import torch

from echoshot_ai_server.cli import main as echoshot

OUT_DIR = Path("demo-output")
SAMPLE = OUT_DIR / "sample.mp4"


def make_sample() -> None:
    """Two seconds of moving test pattern with a tone, 128x72 at 12 fps: small enough for 2 CPU cores."""
    OUT_DIR.mkdir(exist_ok=True)
    subprocess.run(
        ["ffmpeg", "-nostdin", "-loglevel", "error", "-y",
         "-f", "lavfi", "-i", "testsrc2=size=128x72:rate=12:duration=2",
         "-f", "lavfi", "-i", "sine=frequency=440:duration=2",
         "-c:v", "libx264", "-pix_fmt", "yuv420p", "-c:a", "aac", str(SAMPLE)],
        check=True,
    )


def main() -> int:
    make_sample()
    device = "gpu" if torch.cuda.is_available() else "cpu"
    started = time.monotonic()
    status = echoshot(["upscale", "--input", str(SAMPLE), "--scale", "2", "--device", device, "--output", str(OUT_DIR)])
    if status == 0:
        results = sorted(OUT_DIR.glob("*_upscaled.mp4"), key=lambda p: p.stat().st_mtime)
        print(f"\nDemo finished in {time.monotonic() - started:.0f}s on {device.upper()}.")
        print(f"Input:  {SAMPLE.resolve()}")
        print(f"Result: {results[-1].resolve()}")
    return status


if __name__ == "__main__":
    sys.exit(main())
