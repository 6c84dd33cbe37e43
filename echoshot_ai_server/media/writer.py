"""One ffmpeg process that encodes H.264 from timed raw frames and maps the source's audio in the same
pass: no intermediate video file, no second encode."""

import queue
import subprocess
import tempfile
import threading
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import numpy as np

from echoshot_ai_server.errors import ErrorCode, PermanentError, RetryableError
from echoshot_ai_server.media.probe import Colour
from echoshot_ai_server.media.rawstream import RawStreamWriter, TimedFrames, Track
from echoshot_ai_server.media.reader import SCALE_FLAGS, raw_format, scale_matrix
from echoshot_ai_server.media.tools import file_arg, run_tool


STDERR_TAIL_CHARS = 2000
# ffmpeg reports a full disk and still exits 0 when it happens while the trailer is written.
DISK_FULL_MESSAGES = ("No space left on device", "Disk quota exceeded")


@dataclass(frozen=True)
class EncoderSettings:
    preset: str = "medium"
    crf: int = 23
    audio_bitrate: str = "128k"
    ffmpeg: str = "ffmpeg"
    deep_codec: str = "h264"  # results of sources deeper than 8 bits: "h264" (High 10) or "hevc" (Main 10)
    part_s: float = 0.0  # longer videos encoded in parts of this length at once (media/parted_writer.py); 0: never


class FrameWriter:
    """One ffmpeg process: timed raw frames on stdin -> H.264 (+ the source's audio as AAC) in an MP4.

    The frames keep their times (a variable frame rate, and when the first one is shown next to the
    audio), their sample aspect ratio and the source's colour: converted to YUV with its matrix (by
    ffmpeg, unless they come converted) and tagged with all four of matrix, primaries, transfer and
    (limited) range, 10-bit when the source is deeper than 8 bits. Frames are handed to ffmpeg by a
    thread of its own, `queue_depth` batches deep, so that the caller can go on with the next batch
    while ffmpeg encodes.
    """

    def __init__(
        self,
        output: Path,
        *,
        width: int,
        height: int,
        timescale: int,
        encoder: EncoderSettings,
        colour: Colour,
        bits: int = 8,
        sample_aspect: Fraction = Fraction(1),
        streams_from: Path | None = None,
        audio: bool = False,
        subtitles: tuple[int, ...] = (),
        video_start_s: float = 0.0,
        end_s: float | None = None,
        queue_depth: int = 2,
        yuv_in: bool = False,
    ):
        """`yuv_in`: frames come as 8-bit YUV 4:2:0 planes already converted with the colour's matrix
        (limited range), as `engine.colour.rgb_to_i420` makes them, instead of BGR.
        `streams_from`: the source whose audio streams (all, as AAC) and text subtitle streams
        (these stream indices, as mov_text) go into the output beside the frames, read up to `end_s`
        (when the video ends); `video_start_s`: when the first frame is shown, on the source's clock."""
        deep = bits > 8
        if yuv_in and deep:
            raise ValueError("frames converted to YUV come from 8-bit sources only")
        self.output = output
        self.track = Track(width, height, "yuv420p" if yuv_in else raw_format(bits), timescale)
        self.sample_aspect = sample_aspect
        self.dtype = np.uint16 if deep else np.uint8
        self.frames_written = 0
        self.args = [
            encoder.ffmpeg, "-hide_banner", "-loglevel", "error", "-y",
            "-itsoffset", f"{video_start_s:.6f}", "-f", "mov", "-i", "pipe:0",
            *source_streams(encoder, streams_from if audio or subtitles else None, audio, subtitles, end_s),
        ]
        if not yuv_in:
            self.args += ["-vf", f"scale=out_color_matrix={scale_matrix(colour.matrix)}:out_range=tv:"
                                 f"flags={SCALE_FLAGS},format={'yuv420p10le' if deep else 'yuv420p'}"]
        self.args += [
            *_video_codec(encoder, deep),
            "-colorspace", colour.matrix, "-color_primaries", colour.primaries, "-color_trc", colour.transfer,
            "-color_range", "tv", "-fps_mode", "passthrough", "-enc_time_base:v", "-1",  # the frames' own clock
            "-movflags", "+faststart", "-f", "mp4", file_arg(output),
        ]
        self.video_start_s, self.end_s = video_start_s, end_s
        self._last_pts: int | None = None
        self._finishing = False
        self._queue: queue.Queue = queue.Queue(maxsize=queue_depth)
        self._pipe_error: BaseException | None = None
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

    def write(self, batch: TimedFrames) -> None:
        frames = batch.frames
        if frames.shape[1:] != self.track.frame_shape or frames.dtype != self.dtype:
            raise ValueError(f"expected {self.dtype.__name__} frames (N, {self.track.frame_shape}), "
                             f"got {frames.dtype} {frames.shape}")
        if self._pipe_error is not None:
            self._process.wait()
            raise self._failure()
        self._queue.put(batch)

    def _feed(self) -> None:
        stream = RawStreamWriter(self._process.stdin, self.track, (self.sample_aspect.numerator,
                                                                   self.sample_aspect.denominator))
        told_to_stop = False
        try:
            stream.write_header()
            while (batch := self._queue.get()) is not None:
                stream.write(batch)
                self.frames_written += len(batch)
                self._last_pts = batch.pts[-1]
            told_to_stop = True
            if self._finishing:
                stream.finish(self._last_duration())
        except BaseException as exc:  # ffmpeg gone (OSError), or a bug: kept for the producer
            self._pipe_error = exc
            while not told_to_stop and self._queue.get() is not None:
                pass  # drop frames until told to stop, so that the producer never blocks

    def _last_duration(self) -> int | None:
        """The last frame lasts until the video's end on the source's clock, where that is known."""
        if self.end_s is None or self._last_pts is None:
            return None
        return round((self.end_s - self.video_start_s) * self.track.timescale) - self._last_pts

    def __exit__(self, exc_type, *exc) -> None:
        try:
            if exc_type is not None:
                self.abort()
            self._finishing = exc_type is None
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

    def abort(self) -> None:
        """Stop encoding now (the job failed or was cancelled), also while another thread waits in __exit__."""
        if self._process is not None and self._process.poll() is None:
            self._process.kill()

    def _messages(self) -> str:
        self._stderr.seek(0)
        return self._stderr.read().decode(errors="replace").strip()

    def _disk_full(self) -> bool:
        return any(message in self._messages() for message in DISK_FULL_MESSAGES)

    def _failure(self) -> BaseException:
        if self._pipe_error is not None and not isinstance(self._pipe_error, OSError):
            return self._pipe_error  # not ffmpeg's doing
        tail = self._messages()[-STDERR_TAIL_CHARS:]
        if self._disk_full():
            return RetryableError(ErrorCode.INSUFFICIENT_DISK, f"the disk filled up while encoding: {tail}")
        return RetryableError(
            ErrorCode.ENCODE_FAILED, f"ffmpeg exited with {self._process.returncode}: {tail or 'no message'}"
        )


def source_streams(encoder: EncoderSettings, source: Path | None, audio: bool, subtitles: tuple[int, ...],
                   end_s: float | None) -> list[str]:
    """ffmpeg arguments that take input 1 from `source` and map the video of input 0 and, from the
    source, every audio stream (as AAC) and these text subtitle streams (as mov_text)."""
    args = []
    if source is not None:
        # Reading the source only as long as the video lasts trims its audio to the video's
        # length; unlike -shortest this never drops frames when the audio is shorter.
        args += (["-t", f"{end_s:.6f}"] if end_s else []) + ["-i", file_arg(source)]
    args += ["-map", "0:v:0"]
    if source is not None and audio:
        args += ["-map", "1:a", "-c:a", "aac", "-b:a", encoder.audio_bitrate]
    if source is not None and subtitles:
        args += [arg for index in subtitles for arg in ("-map", f"1:{index}")] + ["-c:s", "mov_text"]
    return args


def join_parts(parts: list[tuple[Path, float]], output: Path, *, encoder: EncoderSettings, streams_from: Path | None,
               audio: bool, subtitles: tuple[int, ...], video_start_s: float, end_s: float,
               should_stop=None) -> None:
    """One MP4 from video parts encoded apart (each starting at 0), without encoding them again, with
    the source's audio and subtitles. Each part lasts exactly its given seconds, so that every frame
    keeps its place on the source's clock; the first is shown at `video_start_s`."""
    listing = output.with_suffix(".parts.txt")
    args = [encoder.ffmpeg, "-nostdin", "-hide_banner", "-loglevel", "error", "-y", "-itsoffset", f"{video_start_s:.6f}",
            "-f", "concat", "-safe", "0", "-i", file_arg(listing),
            *source_streams(encoder, streams_from if audio or subtitles else None, audio, subtitles, end_s),
            "-c:v", "copy", "-movflags", "+faststart", "-f", "mp4", file_arg(output)]
    try:
        listing.write_text("ffconcat version 1.0\n" + "".join(
            f"file '{file_arg(path)}'\nduration {seconds:.6f}\n" for path, seconds in parts))
        result = run_tool(args, "join parts", should_stop)
    finally:
        listing.unlink(missing_ok=True)  # also when the disk is too full to write it whole
    messages = result.stderr.strip()
    if any(message in messages for message in DISK_FULL_MESSAGES):
        raise RetryableError(ErrorCode.INSUFFICIENT_DISK, f"the disk filled up while joining: {messages[-STDERR_TAIL_CHARS:]}")
    if result.returncode != 0:
        raise RetryableError(ErrorCode.ENCODE_FAILED, f"joining the parts failed: {messages[-STDERR_TAIL_CHARS:]}")


def _video_codec(encoder: EncoderSettings, deep: bool) -> list[str]:
    if deep and encoder.deep_codec == "hevc":  # Main 10; hvc1 is the tag Apple's players want
        return ["-c:v", "libx265", "-preset", encoder.preset, "-crf", str(encoder.crf), "-tag:v", "hvc1",
                "-x265-params", "log-level=error"]
    return ["-c:v", "libx264", "-preset", encoder.preset, "-crf", str(encoder.crf)]  # High 10 when deep
