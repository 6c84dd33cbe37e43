"""A long job cut into segments: which frames each one holds, and where its pieces live in S3.

A segment is a range of the source's frames in display order, decoded exactly (an accurate seek to
the first frame's time, then a frame count), so that any keyframe layout, B-frames or edit list
cuts the same way. Each segment is encoded as its own short video whose frames keep their times
from the segment's start, and it lasts until the next segment's first frame: joined by stream copy,
every frame is back at its place on the source's clock. A plan is named by a random `run`, so that
a job planned again (after it failed, say) never mixes with the pieces of an earlier plan.
"""

import bisect
import math
import secrets
from dataclasses import asdict, dataclass

from echoshot_ai_server.app.records import RECORD_PREFIX
from echoshot_ai_server.media.probe import VideoInfo

# Transient objects carry this tag, so that one lifecycle rule can expire whatever a crash leaves.
SEGMENT_TAG = ("echoshotx", "segment")


@dataclass(frozen=True)
class Segment:
    index: int
    first_frame: int
    frames: int
    start_s: float  # when its first frame is shown, on the source file's clock
    span_s: float  # until the next segment's first frame (the last one: until the video ends)

    @property
    def name(self) -> str:
        return f"{self.index:04d}"


@dataclass(frozen=True)
class SourceVersion:
    """The one version of the source every segment decodes (the object may be replaced meanwhile)."""

    key: str
    size: int
    etag: str
    version_id: str | None = None


@dataclass(frozen=True)
class SegmentPlan:
    run: str
    segments: tuple[Segment, ...]
    source: SourceVersion
    started_at: float  # wall clock, when the job was planned: the ETA counts from here
    max_input_height: int = 0  # the pre-resize every segment and the assembly use (0: none)

    @property
    def total_frames(self) -> int:
        return sum(segment.frames for segment in self.segments)

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> "SegmentPlan":
        return cls(data["run"], tuple(Segment(**s) for s in data["segments"]), SourceVersion(**data["source"]),
                   data["started_at"], data.get("max_input_height", 0))


def cut(info: VideoInfo, segment_s: float) -> list[Segment] | None:
    """Segments of about `segment_s` seconds each (cut at frames), or None
    when the video is not longer than one segment or its frames' times are not known exactly."""
    times = info.frame_times
    end_s = info.video_start_s + info.video_duration_s
    if segment_s <= 0 or info.video_duration_s <= segment_s or len(times) != info.frame_count:
        return None
    if any(later <= earlier for earlier, later in zip(times, times[1:])):
        return None
    count = min(math.ceil(info.video_duration_s / segment_s), len(times))
    first_frames = [0]
    for k in range(1, count):
        boundary = times[0] + k * info.video_duration_s / count
        first = bisect.bisect_left(times, boundary - 1e-9)
        if first_frames[-1] < first < len(times):
            first_frames.append(first)
    if len(first_frames) < 2:
        return None
    bounds = first_frames + [len(times)]
    return [
        Segment(index, a, b - a, times[a], (times[b] if b < len(times) else end_s) - times[a])
        for index, (a, b) in enumerate(zip(bounds, bounds[1:]))
    ]


def new_run() -> str:
    return secrets.token_hex(6)


def part_records_prefix(job_id: str, run: str) -> str:
    """Under the job records: one claim record per segment, and the shared progress ledger."""
    return f"{RECORD_PREFIX}{job_id}/{run}/"


def part_record_name(job_id: str, run: str, segment: Segment) -> str:
    return f"{job_id}/{run}/{segment.name}"


def progress_key(job_id: str, run: str) -> str:
    return f"{part_records_prefix(job_id, run)}progress.json"


def parts_prefix(job_id: str, run: str) -> str:
    """Beside the job's result: each segment's upscaled video."""
    return f"processed/upscaled/{job_id}/parts/{run}/"


def part_key(job_id: str, run: str, segment: Segment) -> str:
    return f"{parts_prefix(job_id, run)}{segment.name}.mp4"
