"""A job's frames encoded as consecutive parts by several x264 processes at once, then joined without
encoding again (with the source's audio and subtitles), for machines where one x264 process cannot
keep every core busy.

One x264 process holds its look-ahead and frame threads in flight (about 70 frames with `medium` on
16 cores) and leaves cores idle: at 2560x1920 it encodes 16-21 frames/s with 11-12 of 16 cores busy
(BENCHMARKS.md), below the model's 26, and once the last frame is in, it still has its whole
look-ahead to encode (2-3 s). Where x264 needs every core anyway (2560x1920 `medium` on 16 vCPUs,
measured), parts do not make a job faster; they pay where cores stay idle. Here each part of `part_s` seconds goes to an encoder of its own, and a
finished part drains while the next ones take frames (up to `finishing_at_once` finished parts beside
the one taking frames). The last `part_s` is cut into halving parts, so that little is left to encode
after the last frame. Every part starts with a keyframe; the encoder settings are the job's; frames
keep their times, as segments joined by `join_parts` do.
"""

import bisect
import logging
import threading
from pathlib import Path

from echoshot_ai_server.media.rawstream import TimedFrames
from echoshot_ai_server.media.writer import EncoderSettings, FrameWriter, join_parts

log = logging.getLogger(__name__)

SHORTEST_PART_S = 0.25


def part_starts(duration_s: float, part_s: float, shortest_s: float = SHORTEST_PART_S) -> list[float]:
    """When each part starts, in seconds from the first frame: every `part_s` up to the last `part_s`,
    which is cut in halves (1 s, 0.5 s, 0.25 s, ... for part_s = 2) down to `shortest_s`."""
    if part_s <= 0 or duration_s <= part_s:
        return [0.0]
    starts = [k * part_s for k in range(int((duration_s - part_s) / part_s) + 1)]
    last = duration_s - part_s
    if last - starts[-1] > 1e-9:
        starts.append(last)
    step = part_s / 2
    while step >= shortest_s:
        starts.append(duration_s - step)
        step /= 2
    return starts


class PartedWriter:
    """FrameWriter's contract (`write` timed frames, `frames_written`), with the video encoded in parts
    by concurrent encoders and joined into `output` when the frames are done.

    `duration_s`: how long the video lasts from its first frame (where the parts are cut);
    `streams_from`, `audio`, `subtitles`, `video_start_s`, `end_s`: as FrameWriter's, applied when
    the parts are joined; the other keyword arguments go to each part's FrameWriter."""

    def __init__(self, output: Path, *, part_s: float, duration_s: float, finishing_at_once: int = 3,
                 streams_from: Path | None = None, audio: bool = False, subtitles: tuple[int, ...] = (),
                 video_start_s: float = 0.0, end_s: float | None = None, should_stop=None, **part_args):
        self.output = output
        self.part_args = part_args
        self.timescale = part_args["timescale"]
        self.starts = [round(s * self.timescale) for s in part_starts(duration_s, part_s)]
        self.join_args = dict(encoder=part_args["encoder"], streams_from=streams_from, audio=audio,
                              subtitles=subtitles, end_s=end_s, should_stop=should_stop)
        self.video_start_s, self.end_s = video_start_s, end_s
        self._slots = threading.Semaphore(finishing_at_once)
        self._parts: list[tuple[Path, int]] = []  # (file, first frame's time)
        self._spans: list[float] = []
        self._draining: list[tuple[threading.Thread, FrameWriter]] = []  # finished parts, encoding their last frames
        self._errors: list[BaseException] = []
        self._current: FrameWriter | None = None
        self._current_index = -1
        self._origin: int | None = None  # the first frame's time: parts are cut from there
        self._end_pts: int | None = None
        self.frames_written = 0  # handed to the parts' encoders (all of them encoded, once joined)

    def __enter__(self) -> "PartedWriter":
        return self

    def write(self, batch: TimedFrames) -> None:
        if self._errors:
            raise self._errors[0]
        if self._origin is None:
            self._origin = batch.pts[0]
        first = 0
        while first < len(batch):
            index = self._part_of(batch.pts[first])
            last = first + 1
            while last < len(batch) and self._part_of(batch.pts[last]) == index:
                last += 1
            writer = self._writer_for(index, batch.pts[first])
            start = self._parts[-1][1]
            writer.write(TimedFrames(batch.frames[first:last], [p - start for p in batch.pts[first:last]],
                                     batch.durations[first:last]))
            self._end_pts = batch.pts[last - 1] + batch.durations[last - 1]
            self.frames_written += last - first
            first = last

    def _part_of(self, pts: int) -> int:
        return max(bisect.bisect_right(self.starts, pts - self._origin) - 1, self._current_index)

    def _writer_for(self, index: int, pts: int) -> FrameWriter:
        if index == self._current_index:
            return self._current
        if self._current is not None:
            self._finish_current(pts)
        path = self.output.with_name(f".{self.output.stem}.part{len(self._parts):03d}.mp4")
        self._current = FrameWriter(path, **self.part_args).__enter__()
        self._current_index = index
        self._parts.append((path, pts))
        return self._current

    def _finish_current(self, next_pts: int) -> None:
        """The current part ends where the next one's first frame starts; it drains on a thread."""
        writer, start = self._current, self._parts[-1][1]
        writer.end_s = (next_pts - start) / self.timescale  # its last frame lasts until then
        self._spans.append(writer.end_s)
        self._current = None
        self._slots.acquire()  # at most finishing_at_once parts draining: wait for one to finish

        def drain() -> None:
            try:
                writer.__exit__(None, None, None)
            except BaseException as exc:
                self._errors.append(exc)
            finally:
                self._slots.release()

        thread = threading.Thread(target=drain, name="ffmpeg-part-drain", daemon=True)
        thread.start()
        self._draining.append((thread, writer))

    def __exit__(self, exc_type, *exc) -> None:
        try:
            if exc_type is not None or self._current is None:
                for _, writer in self._draining:
                    writer.abort()
                if self._current is not None:
                    self._current.__exit__(exc_type, *exc)
                self._wait()
                return
            writer, start = self._current, self._parts[-1][1]
            if self.end_s is not None:
                writer.end_s = self.end_s - self.video_start_s - (start - self._origin) / self.timescale
            self._spans.append(writer.end_s if writer.end_s is not None else (self._end_pts - start) / self.timescale)
            self._current = None
            writer.__exit__(None, None, None)
            self._wait()
            if self._errors:
                raise self._errors[0]
            join_parts([(path, span) for (path, _), span in zip(self._parts, self._spans)], self.output,
                       video_start_s=self.video_start_s + self._origin / self.timescale, **self.join_args)
            log.info("video encoded in %d parts and joined", len(self._parts))
        finally:
            for path, _ in self._parts:
                path.unlink(missing_ok=True)

    def _wait(self) -> None:
        for thread, _ in self._draining:
            thread.join()


def open_writer(output: Path, encoder: EncoderSettings, should_stop=None, **args) -> "FrameWriter | PartedWriter":
    """A job's encoder: one FrameWriter, or for a video longer than two parts (`encoder.part_s`) a
    PartedWriter. `args`: FrameWriter's keyword arguments (`video_start_s` and `end_s` among them)."""
    duration_s = args["end_s"] - args["video_start_s"]
    if encoder.part_s > 0 and duration_s > 2 * encoder.part_s:
        return PartedWriter(output, part_s=encoder.part_s, duration_s=duration_s, should_stop=should_stop,
                            encoder=encoder, **args)
    return FrameWriter(output, encoder=encoder, **args)
