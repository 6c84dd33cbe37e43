"""What users send: a sequence of clips of different sizes and lengths, timed as a user waits for them.

Three ways of working through the same sequence, each timed from the start of its process (model
loading and every warm-up included; the clips are made beforehand with --make-clips):

- `ours`: one fresh process, as a worker: load the model, tune/compile (the start-up warm-up), then
  every clip through `upscale_video`. With `--second-runs`, each clip is run a second time right
  after its first, to show what a first clip of a size costs over a warm one. With `--overlap`, as a
  GPU worker with all the clips queued (OVERLAP_FINISH): a clip hands the model to the next once its
  frames are done and finishes (encoder drain, checks) beside the next one's frames.
- `guide`: the system guide's design: one process; per clip a RealESRGANer (tile 256, fp16) and the
  guide's test pipeline (an mp4v file, the audio to .aac, a second encode).
- `script`: the method of Real-ESRGAN's own `inference_realesrgan_video.py`, one process per clip
  as users run it: RealESRGANer with tile 0 and fp16, frames decoded by one ffmpeg process and piped
  into another that encodes H.264 (here with the same preset and CRF as the others) and copies the audio.

    python bench/mixed.py --method ours|guide|script --json PATH [--ffmpeg ...] [--ffprobe ...]

Clips are Mandelbrot zooms with film grain and a tone (bench/run.py's stand-in for natural footage).
"""

import time

import argparse  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import os  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "bench")]

from echoshot_ai_server.uptime import process_started  # noqa: E402

PROCESS_STARTED = process_started()  # the interpreter's start and imports before this line count too

# (width, height, seconds, scale) at 24 frames/s: small, phone portrait and landscape, 720p, 1080p, odd
SEQUENCE = [
    (176, 144, 4, 4), (320, 240, 2, 4), (640, 360, 5, 2), (480, 854, 2, 2),
    (854, 480, 2, 2), (1280, 720, 2, 2), (1920, 1080, 1, 2), (642, 362, 2, 4),
]
FPS = 24


def clips(ffmpeg: str, folder: Path) -> list[tuple[Path, int]]:
    from run import make_clip

    folder.mkdir(parents=True, exist_ok=True)
    made = []
    for w, h, seconds, scale in SEQUENCE:
        path = folder / f"{w}x{h}_{seconds}s.mp4"
        if not path.exists():
            make_clip(ffmpeg, path, (w, h), seconds, fps=FPS)
        made.append((path, scale))
    return made


def frames_of(path: Path, ffprobe: str) -> int:
    out = subprocess.run([ffprobe, "-v", "error", "-count_packets", "-select_streams", "v:0", "-show_entries",
                          "stream=nb_read_packets", "-of", "csv=p=0", str(path)], capture_output=True, text=True)
    return int(out.stdout.strip() or 0)


def ours(args, sequence) -> dict:
    from echoshot_ai_server.app.pipeline import upscale_video
    from echoshot_ai_server.app.wiring import encoder_settings, load_engine, tuned_file
    from echoshot_ai_server.config import Settings

    # the worker's log lines, timed from the process's start (the start-up's stages, graphs captured)
    logging.basicConfig(level=logging.INFO, format="%(relativeCreated)7.0f ms %(name)s: %(message)s")
    settings = Settings(ffmpeg_bin=args.ffmpeg, ffprobe_bin=args.ffprobe)
    [upscaler] = load_engine(settings, "gpu")
    warm_up_s = upscaler.warm_up(tuned=tuned_file(settings))
    ready_s = time.monotonic() - PROCESS_STARTED
    upscaler.compile_tail()  # as a worker: in the background, once ready
    if args.overlap:
        return {"engine": upscaler.engine, "warm_up_s": round(warm_up_s, 1), "ready_s": round(ready_s, 1),
                "overlap": True, "clips": overlapped(args, sequence, upscaler, encoder_settings(settings))}
    rows = []
    for source, scale in sequence:
        runs = []
        for attempt in range(2 if args.second_runs else 1):
            started = time.monotonic()
            result = upscale_video(source, args.out / f"ours_{attempt}_{source.stem}.mp4", scale=scale, device="gpu",
                                   get_upscaler=lambda: upscaler, encoder=encoder_settings(settings),
                                   ffprobe=args.ffprobe)
            runs.append((time.monotonic() - started, result))
        seconds, result = runs[0]
        row = {"clip": source.stem, "scale": scale, "frames": result.metadata.frame_count, "seconds": round(seconds, 2),
               "stages_s": {k: round(v, 2) for k, v in result.stages_s.items()}}
        if args.second_runs:
            row["second_run_s"] = round(runs[1][0], 2)
            row["first_over_second"] = round(seconds / runs[1][0], 3)
        rows.append(row)
        print(json.dumps(row), flush=True)
    return {"engine": upscaler.engine, "warm_up_s": round(warm_up_s, 1), "ready_s": round(ready_s, 1), "clips": rows}


def overlapped(args, sequence, upscaler, encoder) -> list[dict]:
    """The clips as a worker with OVERLAP_FINISH works through its queue: each clip starts once the
    one before has handed the model on (its frames done); each is timed from then to its result."""
    import threading

    from echoshot_ai_server.app.pipeline import upscale_video

    model_free = threading.Semaphore(1)
    rows: list[dict] = []

    def one(source: Path, scale: int, started: float) -> None:
        handed_on = threading.Event()

        def frames_done():
            handed_on.set()
            model_free.release()

        try:
            result = upscale_video(source, args.out / f"ours_{source.stem}.mp4", scale=scale, device="gpu",
                                   get_upscaler=lambda: upscaler, encoder=encoder, ffprobe=args.ffprobe,
                                   frames_done=frames_done)
        finally:
            if not handed_on.is_set():
                model_free.release()
        rows.append({"clip": source.stem, "scale": scale, "frames": result.metadata.frame_count,
                     "seconds": round(time.monotonic() - started, 2), "finished_at_s": round(time.monotonic()
                                                                                               - PROCESS_STARTED, 2),
                     "stages_s": {k: round(v, 2) for k, v in result.stages_s.items()}})
        print(json.dumps(rows[-1]), flush=True)

    threads = []
    for source, scale in sequence:
        model_free.acquire()
        threads.append(threading.Thread(target=one, args=(source, scale, time.monotonic())))
        threads[-1].start()
    for thread in threads:
        thread.join()
    return sorted(rows, key=lambda row: row["finished_at_s"])


def guide(args, sequence) -> dict:
    from run import run_seed, seed_enhancer

    weights = Path(os.environ.get("WEIGHTS_DIR", "weights")) / "RealESRGAN_x4plus.pth"
    rows = []
    for source, scale in sequence:
        started = time.monotonic()
        enhancer = seed_enhancer(weights, "cuda")  # the guide's task builds its upscaler per job
        work = args.out / f"guide_{source.stem}"
        work.mkdir(exist_ok=True)
        _, frames = run_seed(enhancer, source, args.out / f"guide_{source.stem}.mp4", scale, args.ffmpeg, work)
        rows.append({"clip": source.stem, "scale": scale, "frames": frames, "seconds": round(time.monotonic() - started, 2)})
        print(json.dumps(rows[-1]), flush=True)
    return {"clips": rows}


def script(args, sequence) -> dict:
    rows = []
    for source, scale in sequence:
        started = time.monotonic()
        subprocess.run([sys.executable, __file__, "--one-clip", str(source), "--scale", str(scale), "--ffmpeg", args.ffmpeg,
                        "--out", str(args.out)], check=True)
        rows.append({"clip": source.stem, "scale": scale, "seconds": round(time.monotonic() - started, 2)})
        print(json.dumps(rows[-1]), flush=True)
    return {"clips": rows}


def script_one_clip(source: Path, scale: int, ffmpeg: str, out: Path) -> None:
    """inference_realesrgan_video.py's method on one clip (a process of its own)."""
    import numpy as np
    import torch

    from echoshot_ai_server.engine.models import reference_model
    from echoshot_ai_server.engine.specs import X4PLUS

    model = reference_model(X4PLUS.arch)  # basicsr's RRDBNet, as the script builds it
    from realesrgan import RealESRGANer

    weights = Path(os.environ.get("WEIGHTS_DIR", "weights")) / "RealESRGAN_x4plus.pth"
    enhancer = RealESRGANer(scale=4, model_path=str(weights), model=model, tile=0, tile_pad=10,
                            pre_pad=0, half=True, device=torch.device("cuda"))
    probe = json.loads(subprocess.run([ffmpeg.replace("ffmpeg", "ffprobe"), "-v", "error", "-select_streams", "v:0",
                                       "-show_entries", "stream=width,height,r_frame_rate", "-of", "json", str(source)],
                                      capture_output=True, text=True, check=True).stdout)["streams"][0]
    w, h = probe["width"], probe["height"]
    reader = subprocess.Popen([ffmpeg, "-loglevel", "error", "-i", str(source), "-f", "rawvideo", "-pix_fmt", "bgr24",
                               "pipe:1"], stdout=subprocess.PIPE)
    writer = subprocess.Popen([ffmpeg, "-loglevel", "error", "-y", "-f", "rawvideo", "-pix_fmt", "bgr24", "-s",
                               f"{w * scale}x{h * scale}", "-framerate", probe["r_frame_rate"], "-i", "pipe:0", "-i",
                               str(source), "-map", "0:v", "-map", "1:a?", "-c:v", "libx264", "-preset", "medium",
                               "-crf", "23", "-pix_fmt", "yuv420p", "-c:a", "copy", str(out / f"script_{source.stem}.mp4")],
                              stdin=subprocess.PIPE)
    while len(raw := reader.stdout.read(w * h * 3)) == w * h * 3:
        frame = np.frombuffer(raw, np.uint8).reshape(h, w, 3)
        output, _ = enhancer.enhance(frame, outscale=scale)
        writer.stdin.write(output.tobytes())
    writer.stdin.close()
    writer.wait()
    reader.wait()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--method", choices=("ours", "guide", "script"))
    parser.add_argument("--json", type=Path)
    parser.add_argument("--ffmpeg", default="ffmpeg")
    parser.add_argument("--ffprobe", default="ffprobe")
    parser.add_argument("--clips", type=Path, default=Path("/tmp/mixed-clips"))
    parser.add_argument("--out", type=Path, default=Path("/tmp/mixed-out"))
    parser.add_argument("--second-runs", action="store_true", help="ours: run each clip twice (first vs warm)")
    parser.add_argument("--overlap", action="store_true", help="ours: as a GPU worker with OVERLAP_FINISH")
    parser.add_argument("--make-clips", action="store_true", help="only make the clips (before timing anything)")
    parser.add_argument("--one-clip", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--scale", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    if args.one_clip:
        script_one_clip(args.one_clip, args.scale, args.ffmpeg, args.out)
        return 0
    sequence = clips(args.ffmpeg, args.clips)  # run with --make-clips first, so that none is made on the clock
    if args.make_clips:
        return 0
    report = {"ours": ours, "guide": guide, "script": script}[args.method](args, sequence)
    report.update(method=args.method, total_s=round(time.monotonic() - PROCESS_STARTED, 1),
                  frames=sum(frames_of(s, args.ffprobe) for s, _ in sequence))
    print(json.dumps({k: v for k, v in report.items() if k != "clips"}))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
