"""What decoding through ffmpeg (frames with their timestamps, any codec) costs next to OpenCV's decoder.

Decoding only, on the host: frames per second of OpenCV's VideoCapture (what the pipeline used
before) and of the pipeline's FrameReader (one ffmpeg process, frames and timestamps over a pipe,
colour converted with the source's matrix), on the same clips. The end-to-end cost on the GPU path
is measured by running bench/run.py of both versions (see BENCHMARKS.md).

    python bench/decode_cost.py [--ffmpeg ffmpeg] [--ffprobe ffprobe] [--json PATH]
"""

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import cv2

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from echoshot_ai_server.media.probe import probe  # noqa: E402
from echoshot_ai_server.media.reader import FrameReader  # noqa: E402

CLIPS = [((640, 480), 8), ((1280, 720), 4), ((1920, 1080), 3)]  # (size, seconds) at 30 frames/s


def make_clip(ffmpeg: str, path: Path, size: tuple[int, int], seconds: float) -> Path:
    subprocess.run([ffmpeg, "-nostdin", "-loglevel", "error", "-y", "-f", "lavfi", "-i",
                    f"testsrc2=size={size[0]}x{size[1]}:rate=30:duration={seconds}", "-c:v", "libx264",
                    "-pix_fmt", "yuv420p", str(path)], check=True)
    return path


def opencv_fps(path: Path) -> tuple[float, int]:
    started = time.perf_counter()
    capture, frames = cv2.VideoCapture(str(path), cv2.CAP_FFMPEG), 0
    while capture.read()[0]:
        frames += 1
    capture.release()
    return frames / (time.perf_counter() - started), frames


def reader_fps(path: Path, ffmpeg: str, ffprobe: str) -> tuple[float, int]:
    started = time.perf_counter()
    frames = 0
    with FrameReader(path, probe(path, ffprobe), ffmpeg=ffmpeg) as reader:
        for batch in reader.batches(4):
            frames += len(batch)
    return frames / (time.perf_counter() - started), frames


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ffmpeg", default="ffmpeg")
    parser.add_argument("--ffprobe", default="ffprobe")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for size, seconds in CLIPS:
            clip = make_clip(args.ffmpeg, Path(tmp) / f"{size[0]}x{size[1]}.mp4", size, seconds)
            best = {}
            for name, measure in (("opencv", lambda: opencv_fps(clip)),
                                  ("ffmpeg_reader", lambda: reader_fps(clip, args.ffmpeg, args.ffprobe))):
                runs = [measure() for _ in range(3)]
                assert len({frames for _, frames in runs}) == 1
                best[name] = round(max(fps for fps, _ in runs), 1)
            rows.append({"size": f"{size[0]}x{size[1]}", "frames": runs[0][1], **best})
            print(json.dumps(rows[-1]), flush=True)
    print("| source | OpenCV frames/s | ffmpeg reader frames/s (incl. probe) |\n|---|---|---|")
    for row in rows:
        print(f"| {row['size']} | {row['opencv']} | {row['ffmpeg_reader']} |")
    if args.json:
        args.json.write_text(json.dumps({"rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
