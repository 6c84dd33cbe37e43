"""What a video file holds, as ffprobe reads it: a typed VideoInfo, and whether its audio decodes.

Besides size and rate: the colour description a player would use (the source's tags, or for an
untagged source the convention players follow for its size), the sample aspect ratio, the bit
depth, and the frames a player shows (an edit list can hide some of the frames stored) with the
time the first of them is shown, relative to the start of the file.
"""

import json
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path

from echoshot_ai_server.errors import ErrorCode, PermanentError
from echoshot_ai_server.media.tools import StopCheck, file_arg, run_tool

# Subtitle codecs that MP4 can carry once converted to mov_text; bitmap subtitles cannot be.
TEXT_SUBTITLE_CODECS = {"subrip", "srt", "ass", "ssa", "mov_text", "webvtt", "text"}
# Demuxers of still images: ffprobe reads them as one-frame "videos".
IMAGE_FORMATS = {"image2", "png_pipe", "jpeg_pipe", "webp_pipe", "bmp_pipe", "gif", "tiff_pipe", "jpegxl_pipe"}
UNTAGGED = {None, "", "unknown", "unspecified", "reserved"}


@dataclass(frozen=True)
class Colour:
    """How a video's YUV values become colours (ffmpeg's names), as a player would read them."""

    matrix: str  # bt709, smpte170m, bt470bg, bt2020nc, ...
    primaries: str
    transfer: str
    full_range: bool = False
    tagged: bool = True  # False: the source said nothing and these are the convention for its size

    @property
    def hdr(self) -> bool:
        return self.transfer in ("smpte2084", "arib-std-b67")


def colour_of(stream: dict, width: int, height: int) -> Colour:
    """The source's colour tags, each missing one filled with what players assume for its size:
    BT.709 from 720 lines (or 1280 columns) up, BT.601 below (625-line primaries for 576 lines)."""
    hd = height >= 720 or width >= 1280
    conventional = Colour(
        matrix="bt709" if hd else "smpte170m",
        primaries="bt709" if hd else ("bt470bg" if height in (576, 288) else "smpte170m"),
        transfer="bt709" if hd else "smpte170m",
        tagged=False,
    )
    tags = {"matrix": stream.get("color_space"), "primaries": stream.get("color_primaries"),
            "transfer": stream.get("color_transfer")}
    if tags["matrix"] in ("gbr", "rgb"):  # RGB video: no matrix to honour, the output's is the convention
        tags["matrix"] = None
    known = {name: value for name, value in tags.items() if value not in UNTAGGED}
    full = stream.get("color_range") == "pc" or str(stream.get("pix_fmt", "")).startswith("yuvj")
    return Colour(**{**conventional.__dict__, **known, "full_range": full, "tagged": bool(known)})


@dataclass(frozen=True)
class AudioInfo:
    stream_index: int
    codec: str


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
    frame_count: int  # frames a player shows
    duration_s: float
    codec: str
    audio: AudioInfo | None
    audio_streams: tuple[AudioInfo, ...] = ()
    subtitles: tuple[SubtitleInfo, ...] = ()
    rotation: int = 0  # degrees the picture is turned for display
    format_name: str = ""
    colour: Colour = field(default_factory=lambda: colour_of({}, 0, 0))
    bits: int = 8  # per sample
    sample_aspect: Fraction = Fraction(1)  # of the stored pixels
    video_start_s: float = 0.0  # when the first frame is shown, from the start of the file
    video_duration_s: float = 0.0  # from the first frame shown to the end of the last
    frame_times: tuple[float, ...] = ()  # when each frame is shown, from the start of the file, in order

    @property
    def has_audio(self) -> bool:
        return self.audio is not None

    @property
    def display_size(self) -> tuple[int, int]:
        """Width and height as the video is shown (and decoded: ffmpeg applies the rotation)."""
        return (self.height, self.width) if self.rotation % 180 == 90 else (self.width, self.height)

    @property
    def display_sample_aspect(self) -> Fraction:
        """The sample aspect ratio of the upright frames (turning them a quarter inverts it)."""
        return 1 / self.sample_aspect if self.rotation % 180 == 90 else self.sample_aspect

    @property
    def is_still_image(self) -> bool:
        return bool(IMAGE_FORMATS & set(self.format_name.split(",")))


def _fraction(text: str | None, separator: str = "/") -> Fraction | None:
    try:
        value = Fraction(str(text).replace(separator, "/"))
    except (TypeError, ValueError, ZeroDivisionError):
        return None
    return value if value > 0 else None


def _float(text) -> float | None:
    try:
        return float(text)
    except (TypeError, ValueError):
        return None


def _bits(stream: dict) -> int:
    raw = int(stream.get("bits_per_raw_sample") or 0)
    if raw:
        return raw
    pix_fmt = str(stream.get("pix_fmt", ""))
    for depth in (16, 14, 12, 10, 9):
        if f"p{depth}" in pix_fmt or pix_fmt.startswith(f"p0{depth}"):
            return depth
    return 8


def probe(path: Path, ffprobe: str = "ffprobe", should_stop: StopCheck | None = None) -> VideoInfo:
    """Size, frame rate, frames shown, timing, colour and audio of a video file, as ffprobe reads them."""
    if not path.is_file():
        raise PermanentError(ErrorCode.INPUT_NOT_FOUND, f"input file not found: {path}")
    result = run_tool(
        [ffprobe, "-v", "error", "-print_format", "json", "-show_format", "-show_streams", "-i", file_arg(path)], "probe",
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
    file_start = _float(data.get("format", {}).get("start_time")) or 0.0
    shown = _shown_frames(path, ffprobe, int(video["index"]), should_stop)
    # The header's count, less what an edit list hides, where the container keeps one (a file cut
    # short still declares every frame it had); else the packets found.
    stored = int(video.get("nb_frames") or 0)
    frame_count = stored - shown.hidden if stored and shown.readable else shown.count
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
        AudioInfo(int(st["index"]), st.get("codec_name", "unknown")) for st in streams if st.get("codec_type") == "audio"
    )
    subtitles = tuple(
        SubtitleInfo(int(st["index"]), st.get("codec_name", "unknown"))
        for st in streams if st.get("codec_type") == "subtitle"
    )
    first = shown.first_s if shown.first_s is not None else (_float(video.get("start_time")) or file_start)
    # The last frame shown ends at its time plus its packet's duration (a frame's worth where the
    # container does not say); a stream's own duration counts in decoding order, which B-frames upset.
    end = shown.end_s + (0 if shown.last_has_duration else float(1 / fps)) if shown.end_s is not None else None
    video_duration = (end - first) if end is not None else float(frame_count / fps)
    return VideoInfo(
        width, height, fps, frame_count, duration, video.get("codec_name", "unknown"),
        audio_streams[0] if audio_streams else None, audio_streams, subtitles, _rotation(video),
        data.get("format", {}).get("format_name", ""), colour_of(video, width, height), _bits(video),
        _fraction(video.get("sample_aspect_ratio"), ":") or Fraction(1), max(0.0, first - file_start), video_duration,
        tuple(t - file_start for t in shown.times),
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


@dataclass(frozen=True)
class _Shown:
    count: int  # packets found that are shown
    hidden: int  # packets found that an edit list keeps out of view
    first_s: float | None  # the earliest time a frame is shown
    end_s: float | None  # the latest end of a packet shown
    readable: bool = True  # False: not even the first packet could be read
    last_has_duration: bool = True
    times: tuple[float, ...] = ()  # each shown frame's time, in order


def _shown_frames(path: Path, ffprobe: str, index: int, should_stop: StopCheck | None) -> _Shown:
    """The frames a player shows, from the video stream's packets (demuxing only, no decoding):
    those the container keeps out of view (an edit list's cut, marked D) do not count. Also counts
    where the container stores no frame count (Matroska, WebM, MPEG-TS)."""
    result = run_tool(
        [ffprobe, "-v", "error", "-select_streams", str(index), "-show_entries", "packet=pts_time,duration_time,flags",
         "-of", "json", "-i", file_arg(path)],
        "count frames", should_stop,
    )
    try:
        packets = json.loads(result.stdout or "{}").get("packets", [])
    except ValueError:
        packets = []
    kept = [p for p in packets if "D" not in p.get("flags", "")]
    hidden, readable = len(packets) - len(kept), bool(packets)
    times = [(t, _float(p.get("duration_time")) or 0.0) for p in kept if (t := _float(p.get("pts_time"))) is not None]
    if not times:
        return _Shown(len(kept), hidden, None, None, readable)
    last = max(times)
    return _Shown(len(kept), hidden, min(t for t, _ in times), max(t + d for t, d in times), readable, last[1] > 0,
                  tuple(sorted(t for t, _ in times)))


def audio_problem(path: Path, ffmpeg: str = "ffmpeg", should_stop: StopCheck | None = None) -> str | None:
    """None when every audio stream decodes, else why the audio cannot be used."""
    result = run_tool(
        [ffmpeg, "-nostdin", "-v", "error", "-i", file_arg(path), "-map", "0:a", "-f", "null", "-"], "audio check",
        should_stop,
    )
    if result.returncode == 0:
        return None
    return result.stderr.strip().splitlines()[-1] if result.stderr.strip() else f"ffmpeg exit {result.returncode}"
