"""The frame pipeline on local files: probe -> upscaler -> audio -> frames -> one encode -> check.

Used by a queued job (app/task.py) and by `echoshot upscale`; knows nothing of S3, SQS or Spring.
"""

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from echoshot_ai_server.app.segments import Segment
from echoshot_ai_server.engine.device import DeviceOutOfMemory
from echoshot_ai_server.engine.specs import Device, scale_problem
from echoshot_ai_server.engine.upscaler import Upscaler
from echoshot_ai_server.errors import ErrorCode, JobCancelled, PermanentError, RetryableError
from echoshot_ai_server.job import ResultMetadata
from echoshot_ai_server.media.parted_writer import open_writer
from echoshot_ai_server.media.prefetch import Prefetch
from echoshot_ai_server.media.probe import VideoInfo, audio_problem, probe
from echoshot_ai_server.media.rawstream import TimedFrames
from echoshot_ai_server.media.reader import FrameReader, scale_matrix
from echoshot_ai_server.media.writer import EncoderSettings, join_parts

# The guide's log lines of a job carry this logger name (its module before the package had wings).
log = logging.getLogger("echoshot_ai_server.tasks.upscale_task")

ProgressFn = Callable[[int, int], None]
PROGRESS_LOG_STEP_PERCENT = 5.0
# Containers' frame counts can be a little off (AVI counts a trailing packet, for one); a file that
# decodes clearly fewer frames than it declares is truncated or corrupt.
MISSING_FRAMES_TOLERATED = 2
MISSING_SHARE_TOLERATED = 0.02
# The guide's warning, logged wherever a GPU was asked for and the CPU does the work.
GPU_FALLBACK_WARNING = "GPU가 요청되었지만 사용 불가능합니다. CPU로 대체합니다."


@dataclass(frozen=True)
class InputLimits:
    """What a job may ask for, checked before any heavy work (0 = no limit)."""

    max_width: int = 0
    max_height: int = 0
    max_pixels: int = 0
    max_duration_s: float = 0
    max_frame_count: int = 0
    max_output_pixels: int = 0
    max_download_bytes: int = 0


@dataclass(frozen=True)
class UpscaleResult:
    metadata: ResultMetadata  # what Spring is told, in the one form it has from here to the callback
    has_audio: bool
    elapsed_s: float
    stages_s: dict[str, float] = field(default_factory=dict)  # where the time went


def input_size(info: VideoInfo, max_height: int = 0) -> tuple[int, int]:
    """The size the model takes the frames at: as shown, or, when taller than `max_height` (0: no
    limit), that height with the width that keeps the aspect, both even (the guide's "pre-resize")."""
    width, height = info.display_size
    if not max_height or height <= max_height:
        return width, height
    new_height = max(2, max_height // 2 * 2)
    return max(2, round(width * new_height / height / 2) * 2), new_height


def check_limits(info: VideoInfo, scale: int, limits: InputLimits, size: tuple[int, int] | None = None) -> None:
    """Refuse, before any heavy work, what the settings do not allow. `size`: what the model takes the
    frames at, when the source is pre-resized."""
    problems = []
    if limits.max_width and info.width > limits.max_width:
        problems.append(f"width {info.width} > {limits.max_width}")
    if limits.max_height and info.height > limits.max_height:
        problems.append(f"height {info.height} > {limits.max_height}")
    if limits.max_pixels and info.width * info.height > limits.max_pixels:
        problems.append(f"{info.width}x{info.height} is more than {limits.max_pixels} pixels")
    if limits.max_duration_s and info.duration_s > limits.max_duration_s:
        problems.append(f"duration {info.duration_s:.1f}s > {limits.max_duration_s:g}s")
    if limits.max_frame_count and info.frame_count > limits.max_frame_count:
        problems.append(f"{info.frame_count} frames > {limits.max_frame_count}")
    if problems:
        raise PermanentError(ErrorCode.INPUT_TOO_LARGE, "input over the limits: " + "; ".join(problems))
    width, height = size or (info.width, info.height)
    if limits.max_output_pixels and width * scale * height * scale > limits.max_output_pixels:
        raise PermanentError(
            ErrorCode.OUTPUT_TOO_LARGE,
            f"{scale}x of {width}x{height} would be {width * scale}x{height * scale}, "
            f"more than {limits.max_output_pixels} pixels",
        )


def validate_scale(scale: int) -> None:
    if (problem := scale_problem(scale)) is not None:
        raise PermanentError(ErrorCode.INVALID_PARAMETERS, problem)


class _ProgressLog:
    """One log line each time another 5 % of the frames is done."""

    def __init__(self, total: int):
        self.total = max(total, 1)
        self.next_percent = PROGRESS_LOG_STEP_PERCENT

    def update(self, done: int) -> None:
        percent = 100.0 * done / self.total
        if percent < self.next_percent or done >= self.total:
            return
        log.info("업스케일 진행률: %.1f%% (%d/%d)", percent, done, self.total)
        while self.next_percent <= percent:
            self.next_percent += PROGRESS_LOG_STEP_PERCENT


def _streams_to_keep(source: Path, info: VideoInfo, ffmpeg: str, should_stop) -> tuple[bool, tuple[int, ...]]:
    """Whether the audio goes along (all of it, when it decodes) and which subtitle streams do."""
    audio = False
    if info.audio is None:
        log.info("오디오 트랙이 없습니다")
    elif (problem := audio_problem(source, ffmpeg, should_stop)) is not None:
        log.warning("오디오 추출 실패 - 오디오 없이 진행합니다: %s", problem)
    else:
        log.info("오디오 트랙 발견 - 코덱: %s", ", ".join(a.codec for a in info.audio_streams))
        audio = True
    subtitles = tuple(sub.stream_index for sub in info.subtitles if sub.is_text)
    if len(subtitles) < len(info.subtitles):
        log.warning("bitmap subtitles cannot go into MP4 and are left out: %s",
                    ", ".join(sub.codec for sub in info.subtitles if not sub.is_text))
    return audio, subtitles


def _check_every_frame_decoded(done: int, declared: int) -> None:
    if declared - done > max(MISSING_FRAMES_TOLERATED, declared * MISSING_SHARE_TOLERATED):
        raise PermanentError(
            ErrorCode.DECODE_FAILED, f"only {done} of {declared} frames could be decoded: truncated or corrupt"
        )
    if done != declared:
        log.warning("decoded %d frames where the container declares %d", done, declared)


def upscale_video(
    source: Path,
    output: Path,
    *,
    scale: int,
    device: Device,
    get_upscaler: Callable[[], Upscaler],
    encoder: EncoderSettings,
    ffprobe: str = "ffprobe",
    on_progress: ProgressFn | None = None,
    should_stop: Callable[[], bool] = lambda: False,
    limits: InputLimits = InputLimits(),
    segment: Segment | None = None,
    max_input_height: int = 0,
    before_frames: Callable[[int, int, int], None] | None = None,
    frames_done: Callable[[], None] = lambda: None,
) -> UpscaleResult:
    """Upscale `source` into an H.264 MP4 at `output`, keeping its audio. With `segment`, only
    that segment's frames, timed from its start, without audio (join_segments adds it).
    `max_input_height`: taller sources are scaled down to it first (0: never).
    `before_frames(frames, width, height)`: called once the work is known and before the model
    runs (the frames to upscale and the size the model takes them at); it may refuse the job.
    `frames_done()`: called once the model has had every frame, before the encoder finishes.

    Raises JobError, or JobCancelled when `should_stop()` turns true between two batches.
    """
    started = time.monotonic()
    validate_scale(scale)
    log.info("업스케일 작업 시작 - Scale: %dx, Device: %s", scale, device.upper())

    clock = _Stages()
    info = probe(source, ffprobe, should_stop)
    clock.mark("probe")
    width, height = info.display_size
    log.info("비디오 정보 - 해상도: %dx%d, FPS: %.1f, 프레임: %d", width, height, float(info.fps), info.frame_count)
    if info.is_still_image:
        raise PermanentError(ErrorCode.INVALID_VIDEO, f"{source.name} is a still image ({info.format_name}), not a video")
    if info.frame_count <= 0:
        raise PermanentError(ErrorCode.NO_FRAMES, f"{source.name} has no video frames")
    in_width, in_height = input_size(info, max_input_height)
    if (in_width, in_height) != (width, height):
        log.info("pre-resized to %dx%d (max input height %d)", in_width, in_height, max_input_height)
    check_limits(info, scale, limits, (in_width, in_height))

    upscaler = get_upscaler()
    clock.mark("model")
    if device == "gpu" and upscaler.device != "gpu":
        log.warning(GPU_FALLBACK_WARNING)
    log.info("업스케일러 초기화 완료 - %s", upscaler.describe())

    if segment is None:
        audio, subtitles = _streams_to_keep(source, info, encoder.ffmpeg, should_stop)
        clock.mark("audio check")
        expected, video_start_s, end_s = info.frame_count, info.video_start_s, info.video_start_s + info.video_duration_s
    else:
        log.info("segment %d: frames %d-%d", segment.index, segment.first_frame, segment.first_frame + segment.frames - 1)
        audio, subtitles = False, ()
        expected, video_start_s, end_s = segment.frames, 0.0, segment.span_s
    if before_frames is not None:
        before_frames(expected, in_width, in_height)
    out_w, out_h = in_width * scale, in_height * scale
    # Where the frames are on the GPU, they go to the encoder already in YUV 4:2:0 (8-bit sources).
    yuv = {"yuv_matrix": scale_matrix(info.colour.matrix)} if upscaler.yuv_on_device and info.bits == 8 else {}
    log.info("비디오 인코딩 중 (%s)...", "오디오 포함" if audio else "오디오 없음")
    progress = _ProgressLog(expected)
    done = 0
    # Three stages overlap: decoding (ffmpeg, read by a thread), the model (here), encoding (ffmpeg, fed by a thread).
    with FrameReader(source, info, ffmpeg=encoder.ffmpeg, size=(in_width, in_height),
                     part=None if segment is None else (segment.start_s, segment.frames)) as reader, open_writer(
        output,
        encoder,
        should_stop,
        width=out_w,
        height=out_h,
        timescale=reader.track.timescale,
        colour=info.colour,
        bits=info.bits,
        sample_aspect=info.display_sample_aspect,
        streams_from=source,
        audio=audio,
        subtitles=subtitles,
        video_start_s=video_start_s,
        end_s=end_s,
        yuv_in=bool(yuv),
    ) as writer, Prefetch(reader.batches(upscaler.batch_frames)) as batches:
        for batch in batches:
            if should_stop():
                raise JobCancelled()
            if segment is not None and batch.pts[-1] >= segment.span_s * reader.track.timescale:
                raise PermanentError(ErrorCode.DECODE_FAILED, f"segment {segment.index} decodes a frame beyond its end: "
                                     "a frame in it cannot be decoded")
            try:
                frames = upscaler.upscale(batch.frames, scale, **yuv)
            except DeviceOutOfMemory as exc:
                raise RetryableError(ErrorCode.OUT_OF_MEMORY, str(exc)) from exc
            writer.write(TimedFrames(frames, batch.pts, batch.durations))
            done += len(batch)
            progress.update(done)
            if on_progress:
                on_progress(done, expected)
        if done == 0:
            raise PermanentError(ErrorCode.NO_FRAMES, f"{source.name}: no frame could be decoded")
        log.info("프레임 업스케일 완료: %d/%d 프레임 처리", done, expected)
        clock.mark("frames")
        frames_done()
    clock.mark("encoder finish")  # the encoder's last frames (x264's look-ahead), the audio, faststart
    _check_every_frame_decoded(done, expected)
    result_info = _probe_result(output, ffprobe, should_stop)
    _check_result(result_info, (out_w, out_h, writer.frames_written), len(info.audio_streams) if audio else 0,
                  len(subtitles))
    clock.mark("result check")
    log.info("최종 비디오 생성 완료")
    log.info("시간: %s", ", ".join(f"{name} {seconds:.2f}s" for name, seconds in clock.stages.items()))
    metadata = ResultMetadata(width=out_w, height=out_h, fps=round(float(info.fps), 3),
                              frame_count=writer.frames_written, duration=round(result_info.duration_s, 3),
                              **_pre_resized(info, (in_width, in_height)))
    return UpscaleResult(metadata, result_info.has_audio, time.monotonic() - started, clock.stages)


def _pre_resized(info: VideoInfo, size: tuple[int, int]) -> dict:
    """The metadata's account of a pre-resize: the source's size as shown, when the model took another."""
    return {} if size == info.display_size else {"source_width": info.display_size[0], "source_height": info.display_size[1]}


def join_segments(
    source: Path,
    parts: list[Path],
    segments: tuple[Segment, ...],
    output: Path,
    *,
    scale: int,
    encoder: EncoderSettings,
    ffprobe: str = "ffprobe",
    should_stop: Callable[[], bool] = lambda: False,
    max_input_height: int = 0,
) -> UpscaleResult:
    """One MP4 from the upscaled segments of `source` (without encoding the video again) and the
    source's audio, checked like a result made in one piece."""
    started = time.monotonic()
    info = probe(source, ffprobe, should_stop)
    audio, subtitles = _streams_to_keep(source, info, encoder.ffmpeg, should_stop)
    width, height = input_size(info, max_input_height)
    frames = 0
    for part, segment in zip(parts, segments):
        part_info = _probe_result(part, ffprobe, should_stop)
        if (part_info.width, part_info.height) != (width * scale, height * scale) or part_info.frame_count > segment.frames:
            raise RetryableError(ErrorCode.OUTPUT_MISMATCH, f"segment {segment.index} holds {part_info.frame_count} "
                                 f"frames of {part_info.width}x{part_info.height}, not what its plan says")
        frames += part_info.frame_count
    join_parts(list(zip(parts, (segment.span_s for segment in segments))), output, encoder=encoder,
               streams_from=source, audio=audio, subtitles=subtitles, video_start_s=info.video_start_s,
               end_s=info.video_start_s + info.video_duration_s, should_stop=should_stop)
    result_info = _probe_result(output, ffprobe, should_stop)
    _check_result(result_info, (width * scale, height * scale, frames), len(info.audio_streams) if audio else 0,
                  len(subtitles))
    log.info("%d segments joined: %d frames", len(segments), frames)
    metadata = ResultMetadata(width=width * scale, height=height * scale, fps=round(float(info.fps), 3),
                              frame_count=frames, duration=round(result_info.duration_s, 3),
                              **_pre_resized(info, (width, height)))
    return UpscaleResult(metadata, result_info.has_audio, time.monotonic() - started)


class _Stages:
    """How long each stage of the pipeline took."""

    def __init__(self):
        self.stages: dict[str, float] = {}
        self._last = time.monotonic()

    def mark(self, stage: str) -> None:
        now = time.monotonic()
        self.stages[stage] = now - self._last
        self._last = now


def _check_result(result: VideoInfo, video: tuple[int, int, int], audio_streams: int, subtitle_streams: int) -> None:
    """The encoded file holds what was written: its size, every frame, every stream that was kept."""
    got = (result.width, result.height, result.frame_count, len(result.audio_streams), len(result.subtitles))
    wanted = (*video, audio_streams, subtitle_streams)
    if got != wanted:
        raise PermanentError(
            ErrorCode.OUTPUT_MISMATCH,
            "the encoded file holds {}x{} with {} frames, {} audio and {} subtitle streams; "
            "expected {}x{} with {} frames, {} audio and {} subtitle streams".format(*got, *wanted),
        )


def _probe_result(output: Path, ffprobe: str, should_stop) -> VideoInfo:
    """The encoded file's facts. The file is of our own making: if it is missing or unreadable,
    something happened to the disk or the encoder, which is worth another attempt."""
    try:
        return probe(output, ffprobe, should_stop)
    except PermanentError as exc:
        raise RetryableError(ErrorCode.ENCODE_FAILED, f"the encoded file cannot be read back: {exc.message}") from exc
