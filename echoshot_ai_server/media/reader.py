"""Decoded frames of a video as a player shows them, in batches, each frame with its time.

One ffmpeg process decodes (every codec and container that ffmpeg reads, edit lists and rotation
applied), turns YUV into RGB with the source's own matrix and range (see `probe.colour_of`), and
hands the frames over with their timestamps (`rawstream`): variable frame rates survive, and so does
the time the first frame is shown.
"""

import subprocess
import tempfile
from pathlib import Path
from typing import Iterator

import numpy as np

from echoshot_ai_server.errors import ErrorCode, PermanentError, RetryableError
from echoshot_ai_server.media.probe import VideoInfo
from echoshot_ai_server.media.rawstream import RawStreamReader, TimedFrames, Track
from echoshot_ai_server.media.tools import file_arg

STDERR_TAIL_CHARS = 1000
# ffmpeg's colour matrix names (ffprobe's, as in the source's tags) in its scale filter's words
SCALE_MATRICES = {"bt709": "bt709", "smpte170m": "smpte170m", "bt470bg": "bt470", "bt2020nc": "bt2020",
                  "bt2020c": "bt2020", "fcc": "fcc", "smpte240m": "smpte240m"}


# Exact rounding and full chroma resolution in the YUV <-> RGB conversions: without them colours
# drift by a few levels (mostly darker) through the two conversions of a job.
SCALE_FLAGS = "accurate_rnd+full_chroma_int"


def scale_matrix(matrix: str) -> str:
    return SCALE_MATRICES.get(matrix, "bt709")


def raw_format(bits: int) -> str:
    """The raw layout frames travel in: 8-bit BGR, or 16-bit RGB for sources deeper than 8 bits."""
    return "rgb48be" if bits > 8 else "bgr24"


class FrameReader:
    """Batches of uint8 (or, for sources deeper than 8 bits, uint16) BGR frames (N, H, W, 3) with times."""

    def __init__(self, path: Path, info: VideoInfo, *, ffmpeg: str = "ffmpeg", part: tuple[float, int] | None = None,
                 size: tuple[int, int] | None = None):
        """`part`: (start, count) to decode only `count` frames from the one shown at `start` seconds
        on the file's clock (see probe's frame times); the first frame's time is then 0. `size`:
        (width, height) to scale the frames to (Lanczos), when not the size they are shown at."""
        self.path = path
        self.info = info
        self.size = size or info.display_size
        self.frames_read = 0
        colour = info.colour
        resize = "" if self.size == info.display_size else f"w={self.size[0]}:h={self.size[1]}:"
        convert = (f"scale={resize}in_color_matrix={scale_matrix(colour.matrix)}:in_range={'pc' if colour.full_range else 'tv'}"
                   f":flags={'lanczos+' if resize else ''}{SCALE_FLAGS},format={raw_format(info.bits)}")
        seek, limit = [], []
        if part is not None:
            # Accurate seeking: decoded from the keyframe before, frames shown before `start` dropped.
            # A third of a frame early, so that rounding never drops the first frame of the part.
            start, count = part
            seek = ["-ss", f"{max(0.0, start - float(1 / info.fps) / 3):.6f}"]
            limit = ["-frames:v", str(count)]
        self.args = [
            ffmpeg, "-nostdin", "-hide_banner", "-loglevel", "error", *seek, "-i", file_arg(path), "-map", "0:v:0",
            "-vf", convert, *limit, "-fps_mode", "passthrough", "-c:v", "rawvideo", "-f", "mov",
            "-movflags", "frag_keyframe+empty_moov", "pipe:1",
        ]
        self._process: subprocess.Popen | None = None
        self._stderr = None
        self.stream: RawStreamReader | None = None

    @property
    def track(self) -> Track:
        return self.stream.track

    def __enter__(self) -> "FrameReader":
        self._stderr = tempfile.TemporaryFile()
        try:
            self._process = subprocess.Popen(self.args, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                             stderr=self._stderr)
        except FileNotFoundError as exc:
            self._stderr.close()
            raise PermanentError(ErrorCode.TOOL_MISSING, f"{self.args[0]} not found: install ffmpeg") from exc
        try:
            self.stream = RawStreamReader(self._process.stdout)
            width, height = self.size
            if (self.track.width, self.track.height) != (width, height):
                raise PermanentError(ErrorCode.DECODE_FAILED, f"{self.path.name} decodes as {self.track.width}x"
                                     f"{self.track.height}, expected {width}x{height}")
        except ValueError:  # the stream ended (or broke) before its first frame
            self._process.wait()
            error = self._failure("no frame could be decoded", ErrorCode.NO_FRAMES)
            self.__exit__(None)
            raise error from None
        except BaseException:
            self.__exit__(None)
            raise
        return self

    def __exit__(self, *exc) -> None:
        if self._process.poll() is None:
            self._process.kill()
        self._process.stdout.close()
        self._process.wait()
        self._stderr.close()

    def batches(self, size: int) -> Iterator[TimedFrames]:
        frames: list[np.ndarray] = []
        pts: list[int] = []
        durations: list[int] = []
        try:
            for fragment in self.stream.fragments():
                frames.append(fragment.frames)
                pts += fragment.pts
                durations += fragment.durations
                while len(pts) >= size:
                    joined = np.concatenate(frames)  # also a writable copy of the pipe's bytes
                    yield self._counted(TimedFrames(joined[:size], pts[:size], durations[:size]))
                    frames, pts, durations = [joined[size:]], pts[size:], durations[size:]
        except ValueError as exc:  # a stream that does not parse: ffmpeg died, or the frame size changed
            raise self._failure(str(exc)) from None
        if self._process.wait() != 0:
            raise self._failure(f"ffmpeg exited with {self._process.returncode}")
        if pts:
            yield self._counted(TimedFrames(np.concatenate(frames), pts, durations))

    def _counted(self, batch: TimedFrames) -> TimedFrames:
        self.frames_read += len(batch)
        return batch

    def _failure(self, what: str, code: ErrorCode = ErrorCode.DECODE_FAILED) -> PermanentError | RetryableError:
        self._stderr.seek(0)
        tail = self._stderr.read().decode(errors="replace").strip()[-STDERR_TAIL_CHARS:]
        if self._process.poll() is not None and self._process.returncode < 0:  # killed: not the file's fault
            return RetryableError(ErrorCode.DECODE_FAILED, f"the decoder was killed ({what})")
        return PermanentError(code, f"cannot decode {self.path.name}: {what}: {tail or 'no message'}")
