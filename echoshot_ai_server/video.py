"""The video tools: ffprobe for facts, OpenCV for decoding, one ffmpeg process for encoding.

`probe()` returns a typed VideoInfo. `FrameReader` yields batches of decoded frames.
`FrameWriter` streams frames into a single ffmpeg process that encodes H.264 and maps the
source's audio in the same pass: no intermediate video file, no second encode.
"""

import json
import logging
import os
import queue
import signal
import subprocess
import tempfile
import threading
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Callable, Iterator

import cv2
import numpy as np

from echoshot_ai_server.errors import ErrorCode, JobCancelled, PermanentError, RetryableError

log = logging.getLogger(__name__)

STDERR_TAIL_CHARS = 2000
# ffmpeg reports a full disk and still exits 0 when it happens while the trailer is written.
DISK_FULL_MESSAGES = ("No space left on device", "Disk quota exceeded")
StopCheck = Callable[[], bool]


# Subtitle codecs that MP4 can carry once converted to mov_text; bitmap subtitles cannot be.
TEXT_SUBTITLE_CODECS = {"subrip", "srt", "ass", "ssa", "mov_text", "webvtt", "text"}
# Demuxers of still images: ffprobe reads them as one-frame "videos".
IMAGE_FORMATS = {"image2", "png_pipe", "jpeg_pipe", "webp_pipe", "bmp_pipe", "gif", "tiff_pipe", "jpegxl_pipe"}


@dataclass(frozen=True)
class AudioInfo:
    stream_index: int
    codec: str
    duration_s: float | None


@dataclass(frozen=True)
class SubtitleInfo:
    stream_index: int
    codec: str

    @property
    def is_text(self) -> bool:
        return self.codec in TEXT_SUBTITLE_CODECS


@dataclass(frozen=True)
class VideoInfo:
    width: int  # as stored
    height: int
    fps: Fraction
    frame_count: int
    duration_s: float
    codec: str
    audio: AudioInfo | None
    audio_streams: tuple[AudioInfo, ...] = ()
    subtitles: tuple[SubtitleInfo, ...] = ()
    rotation: int = 0  # degrees the picture is turned for display
    format_name: str = ""

    @property
    def has_audio(self) -> bool:
        return self.audio is not None

    @property
    def display_size(self) -> tuple[int, int]:
        """Width and height as the video is shown (and decoded: OpenCV applies the rotation)."""
        return (self.height, self.width) if self.rotation % 180 == 90 else (self.width, self.height)

    @property
    def is_still_image(self) -> bool:
        return bool(IMAGE_FORMATS & set(self.format_name.split(",")))


def _arg(path: Path) -> str:
    """A file argument for ffmpeg/ffprobe: absolute, so that a name starting with '-' is never an option."""
    return str(path.absolute())


def _run_tool(args: list[str], what: str, should_stop: StopCheck | None = None) -> subprocess.CompletedProcess:
    """Run ffprobe/ffmpeg to the end; JobCancelled (the tool killed) as soon as `should_stop()` turns true."""
    try:
        # A session of its own, so that a stop ends the tool and anything it started (a wrapper's children)
        process = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                   text=True, errors="replace", start_new_session=True)
    except FileNotFoundError as exc:
        raise PermanentError(ErrorCode.TOOL_MISSING, f"{args[0]} not found: install ffmpeg ({what})") from exc
    with process:
        while True:
            try:
                stdout, stderr = process.communicate(timeout=0.2)
                return subprocess.CompletedProcess(args, process.returncode, stdout, stderr)
            except subprocess.TimeoutExpired:
                if should_stop is not None and should_stop():
                    os.killpg(process.pid, signal.SIGKILL)
                    process.communicate()
                    raise JobCancelled() from None


def _fraction(text: str | None) -> Fraction | None:
    try:
        value = Fraction(text)
    except (TypeError, ValueError, ZeroDivisionError):
        return None
    return value if value > 0 else None


def _float(text) -> float | None:
    try:
        return float(text)
    except (TypeError, ValueError):
        return None


def probe(path: Path, ffprobe: str = "ffprobe", should_stop: StopCheck | None = None) -> VideoInfo:
    """Size, frame rate, frame count, duration and audio of a video file, as ffprobe reads them."""
    if not path.is_file():
        raise PermanentError(ErrorCode.INPUT_NOT_FOUND, f"input file not found: {path}")
    result = _run_tool(
        [ffprobe, "-v", "error", "-print_format", "json", "-show_format", "-show_streams", "-i", _arg(path)], "probe",
        should_stop,
    )
    if result.returncode != 0:
        reason = result.stderr.strip().splitlines()[-1] if result.stderr.strip() else "unreadable"
        raise PermanentError(ErrorCode.INVALID_VIDEO, f"{path.name} is not a readable video: {reason}")
    data = json.loads(result.stdout or "{}")
    streams = data.get("streams", [])
    video = next(
        (s for s in streams if s.get("codec_type") == "video" and not s.get("disposition", {}).get("attached_pic")),
        None,
    )
    if video is None:
        raise PermanentError(ErrorCode.INVALID_VIDEO, f"{path.name} has no video stream")
    width, height = int(video.get("width") or 0), int(video.get("height") or 0)
    duration = _float(data.get("format", {}).get("duration")) or _float(video.get("duration")) or 0.0
    frame_count = int(video.get("nb_frames") or 0) or _count_frames(path, ffprobe, should_stop)
    fps = _fraction(video.get("avg_frame_rate"))
    if fps is None and frame_count and duration:
        # Matroska stores no average rate; for variable-rate video r_frame_rate is only the fastest
        # rate. Frames over duration keeps the length right when every frame is kept.
        video_s = _duration_tag(video.get("tags", {}).get("DURATION")) or duration
        fps = Fraction(frame_count / video_s).limit_denominator(1001)
    fps = fps or _fraction(video.get("r_frame_rate"))
    if width <= 0 or height <= 0 or fps is None:
        raise PermanentError(ErrorCode.INVALID_VIDEO, f"{path.name}: video stream has no usable size or frame rate")
    audio_streams = tuple(
        AudioInfo(int(st["index"]), st.get("codec_name", "unknown"), _float(st.get("duration")))
        for st in streams if st.get("codec_type") == "audio"
    )
    subtitles = tuple(
        SubtitleInfo(int(st["index"]), st.get("codec_name", "unknown"))
        for st in streams if st.get("codec_type") == "subtitle"
    )
    return VideoInfo(
        width, height, fps, frame_count, duration, video.get("codec_name", "unknown"),
        audio_streams[0] if audio_streams else None, audio_streams, subtitles, _rotation(video),
        data.get("format", {}).get("format_name", ""),
    )


def _duration_tag(text: str | None) -> float | None:
    """Matroska's DURATION tag, "HH:MM:SS.fraction"."""
    try:
        hours, minutes, seconds = (text or "").split(":")
        return int(hours) * 3600 + int(minutes) * 60 + float(seconds)
    except ValueError:
        return None


def _rotation(stream: dict) -> int:
    for side_data in stream.get("side_data_list", []):
        if "rotation" in side_data:
            return int(round(float(side_data["rotation"]))) % 360
    return int(float(stream.get("tags", {}).get("rotate", 0) or 0)) % 360


def _count_frames(path: Path, ffprobe: str, should_stop: StopCheck | None) -> int:
    # Containers such as mkv and webm do not store a frame count: count the packets instead.
    result = _run_tool(
        [ffprobe, "-v", "error", "-select_streams", "v:0", "-count_packets",
         "-show_entries", "stream=nb_read_packets", "-of", "csv=p=0", "-i", _arg(path)],
        "count frames", should_stop,
    )
    try:
        return int(result.stdout.strip().split(",")[0])
    except ValueError:
        return 0


def audio_problem(path: Path, ffmpeg: str = "ffmpeg", should_stop: StopCheck | None = None) -> str | None:
    """None when every audio stream decodes, else why the audio cannot be used."""
    result = _run_tool(
        [ffmpeg, "-nostdin", "-v", "error", "-i", _arg(path), "-map", "0:a", "-f", "null", "-"], "audio check",
        should_stop,
    )
    if result.returncode == 0:
        return None
    return result.stderr.strip().splitlines()[-1] if result.stderr.strip() else f"ffmpeg exit {result.returncode}"


def ffmpeg_version(ffmpeg: str = "ffmpeg") -> str:
    return _run_tool([ffmpeg, "-version"], "version").stdout.splitlines()[0]


class FrameReader:
    """Decoded frames of a video, in batches of uint8 BGR arrays (N, H, W, 3)."""

    def __init__(self, path: Path, width: int, height: int):
        self.path = path
        self.width = width
        self.height = height
        self.frames_read = 0
        self._capture = None

    def __enter__(self) -> "FrameReader":
        # OpenCV applies the container's rotation: frames come out upright, as players show them.
        self._capture = cv2.VideoCapture(_arg(self.path), cv2.CAP_FFMPEG)
        if not self._capture.isOpened():
            raise PermanentError(ErrorCode.DECODE_FAILED, f"cannot decode {self.path.name}")
        return self

    def __exit__(self, *exc) -> None:
        self._capture.release()

    def batches(self, size: int) -> Iterator[np.ndarray]:
        batch = []
        while True:
            ok, frame = self._capture.read()
            if not ok:
                break
            if frame.shape != (self.height, self.width, 3):
                raise PermanentError(
                    ErrorCode.DECODE_FAILED,
                    f"frame {self.frames_read} decodes as {frame.shape[1]}x{frame.shape[0]}, "
                    f"expected {self.width}x{self.height}",
                )
            self.frames_read += 1
            batch.append(frame)
            if len(batch) == size:
                yield np.stack(batch)
                batch = []
        if batch:
            yield np.stack(batch)


@dataclass(frozen=True)
class EncoderSettings:
    preset: str = "medium"
    crf: int = 23
    audio_bitrate: str = "128k"
    ffmpeg: str = "ffmpeg"


class FrameWriter:
    """One ffmpeg process: raw BGR frames on stdin -> H.264 (+ the source's audio as AAC) in an MP4.

    Frames are handed to ffmpeg by a thread of its own, `queue_depth` batches deep, so that the
    caller can go on with the next batch while ffmpeg encodes.
    """

    def __init__(
        self,
        output: Path,
        *,
        width: int,
        height: int,
        fps: Fraction,
        encoder: EncoderSettings,
        streams_from: Path | None = None,
        audio: bool = False,
        subtitles: tuple[int, ...] = (),
        duration_s: float | None = None,
        queue_depth: int = 2,
    ):
        """`streams_from`: the source whose audio streams (all, as AAC) and text subtitle streams
        (these stream indices, as mov_text) go into the output beside the frames."""
        self.output = output
        self.frame_shape = (height, width, 3)
        self.frames_written = 0
        self.args = [
            encoder.ffmpeg, "-hide_banner", "-loglevel", "error", "-y",
            "-f", "rawvideo", "-pix_fmt", "bgr24", "-video_size", f"{width}x{height}",
            "-framerate", f"{fps.numerator}/{fps.denominator}", "-i", "pipe:0",
        ]
        extra = streams_from is not None and (audio or subtitles)
        if extra:
            # Reading the source only as long as the video lasts trims its audio to the video's
            # length; unlike -shortest this never drops frames when the audio is shorter.
            if duration_s:
                self.args += ["-t", f"{duration_s:.6f}"]
            self.args += ["-i", _arg(streams_from)]
        self.args += ["-map", "0:v:0"]
        if extra and audio:
            self.args += ["-map", "1:a", "-c:a", "aac", "-b:a", encoder.audio_bitrate]
        if extra:
            for index in subtitles:
                self.args += ["-map", f"1:{index}"]
            if subtitles:
                self.args += ["-c:s", "mov_text"]
        self.args += [
            "-c:v", "libx264", "-preset", encoder.preset, "-crf", str(encoder.crf), "-pix_fmt", "yuv420p",
            "-movflags", "+faststart", "-f", "mp4", _arg(output),
        ]
        self._queue: queue.Queue = queue.Queue(maxsize=queue_depth)
        self._pipe_error: OSError | None = None
        self._process = None
        self._stderr = None
        self._thread = None

    def __enter__(self) -> "FrameWriter":
        self._stderr = tempfile.TemporaryFile()
        try:
            self._process = subprocess.Popen(self.args, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=self._stderr)
        except FileNotFoundError as exc:
            self._stderr.close()
            raise PermanentError(ErrorCode.TOOL_MISSING, f"{self.args[0]} not found: install ffmpeg") from exc
        self._thread = threading.Thread(target=self._feed, name="ffmpeg-feed", daemon=True)
        self._thread.start()
        return self

    def write(self, frames: np.ndarray) -> None:
        if frames.shape[1:] != self.frame_shape or frames.dtype != np.uint8:
            raise ValueError(f"expected uint8 frames (N, {self.frame_shape}), got {frames.dtype} {frames.shape}")
        if self._pipe_error is not None:
            self._process.wait()
            raise self._failure()
        self._queue.put(np.ascontiguousarray(frames))

    def _feed(self) -> None:
        while (frames := self._queue.get()) is not None:
            if self._pipe_error is not None:
                continue  # ffmpeg is gone: drop frames until told to stop, so the producer never blocks
            try:
                self._process.stdin.write(frames.data)
                self.frames_written += len(frames)
            except OSError as exc:
                self._pipe_error = exc

    def __exit__(self, exc_type, *exc) -> None:
        try:
            if exc_type is not None:
                self._process.kill()
            self._queue.put(None)
            self._thread.join()
            if exc_type is not None:
                self._process.wait()
                return
            try:
                self._process.stdin.close()
            except OSError:
                pass
            if self._process.wait() != 0 or self._pipe_error is not None or self._disk_full():
                raise self._failure()
        finally:
            self._stderr.close()

    def _messages(self) -> str:
        self._stderr.seek(0)
        return self._stderr.read().decode(errors="replace").strip()

    def _disk_full(self) -> bool:
        return any(message in self._messages() for message in DISK_FULL_MESSAGES)

    def _failure(self) -> RetryableError:
        tail = self._messages()[-STDERR_TAIL_CHARS:]
        if self._disk_full():
            return RetryableError(ErrorCode.INSUFFICIENT_DISK, f"the disk filled up while encoding: {tail}")
        return RetryableError(
            ErrorCode.ENCODE_FAILED, f"ffmpeg exited with {self._process.returncode}: {tail or 'no message'}"
        )
