"""What a video file holds, as ffprobe reads it: a typed VideoInfo, and whether its audio decodes."""

import json
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

from echoshot_ai_server.errors import ErrorCode, PermanentError
from echoshot_ai_server.media.tools import StopCheck, file_arg, run_tool

# Subtitle codecs that MP4 can carry once converted to mov_text; bitmap subtitles cannot be.
TEXT_SUBTITLE_CODECS = {"subrip", "srt", "ass", "ssa", "mov_text", "webvtt", "text"}
# Demuxers of still images: ffprobe reads them as one-frame "videos".
IMAGE_FORMATS = {"image2", "png_pipe", "jpeg_pipe", "webp_pipe", "bmp_pipe", "gif", "tiff_pipe", "jpegxl_pipe"}


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
        AudioInfo(int(st["index"]), st.get("codec_name", "unknown"))
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
    result = run_tool(
        [ffprobe, "-v", "error", "-select_streams", "v:0", "-count_packets",
         "-show_entries", "stream=nb_read_packets", "-of", "csv=p=0", "-i", file_arg(path)],
        "count frames", should_stop,
    )
    try:
        return int(result.stdout.strip().split(",")[0])
    except ValueError:
        return 0


def audio_problem(path: Path, ffmpeg: str = "ffmpeg", should_stop: StopCheck | None = None) -> str | None:
    """None when every audio stream decodes, else why the audio cannot be used."""
    result = run_tool(
        [ffmpeg, "-nostdin", "-v", "error", "-i", file_arg(path), "-map", "0:a", "-f", "null", "-"], "audio check",
        should_stop,
    )
    if result.returncode == 0:
        return None
    return result.stderr.strip().splitlines()[-1] if result.stderr.strip() else f"ffmpeg exit {result.returncode}"
