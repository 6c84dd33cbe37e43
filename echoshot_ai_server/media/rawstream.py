"""Raw frames and their timestamps over a pipe, as fragmented QuickTime (MOV).

A plain rawvideo pipe carries pixels only: every frame would be given the same duration, so a
variable frame rate, or a video that starts after its audio, would be lost between the decoder and
the encoder. ffmpeg writes this format as the decoder's output and reads it as the encoder's
input: an init segment (`ftyp` + `moov`) describing the track, then one fragment (`moof` + `mdat`)
per frame or batch, whose `tfdt` and `trun` boxes hold each frame's time and duration. Frames are
BGR 8-bit (`24BG`) or RGB 16-bit big-endian (`b48r`), the two raw layouts both ends understand, or,
towards the encoder only, YUV 4:2:0 planes (`I420`) already converted on the GPU.
"""

import struct
from dataclasses import dataclass
from typing import BinaryIO, Iterator

import numpy as np

# pixel format -> (sample entry tag, bits per pixel, numpy dtype of one channel value)
LAYOUTS = {"bgr24": (b"24BG", 24, np.dtype(np.uint8)), "rgb48be": (b"b48r", 48, np.dtype(">u2")),
           "yuv420p": (b"I420", 12, np.dtype(np.uint8))}
CONTAINERS = {b"moov", b"trak", b"mdia", b"minf", b"stbl", b"mvex", b"moof", b"traf", b"dinf", b"edts"}


@dataclass(frozen=True)
class Track:
    width: int
    height: int
    pix_fmt: str  # "bgr24", "rgb48be" or "yuv420p"
    timescale: int  # ticks per second of the timestamps

    @property
    def frame_bytes(self) -> int:
        return self.width * self.height * LAYOUTS[self.pix_fmt][1] // 8

    @property
    def frame_shape(self) -> tuple[int, ...]:
        """One frame as an array: (H, W, 3) pixels, or for YUV 4:2:0 the planes one under the other."""
        if self.pix_fmt == "yuv420p":
            return (self.height * 3 // 2, self.width)
        return (self.height, self.width, 3)


@dataclass
class TimedFrames:
    """A batch of frames, uint8 BGR or (from 16-bit sources) native uint16 BGR, (N, H, W, 3), or uint8
    YUV 4:2:0 planes (N, H * 3 / 2, W), with each frame's presentation time and duration in the
    track's timescale."""

    frames: np.ndarray
    pts: list[int]
    durations: list[int]

    def __len__(self) -> int:
        return len(self.pts)


def _box(kind: bytes, *parts: bytes) -> bytes:
    body = b"".join(parts)
    return struct.pack(">I4s", 8 + len(body), kind) + body


def _full_box(kind: bytes, version: int, flags: int, *parts: bytes) -> bytes:
    return _box(kind, struct.pack(">I", (version << 24) | flags), *parts)


def _to_wire(frames: np.ndarray, pix_fmt: str) -> memoryview:
    if pix_fmt != "rgb48be":
        return np.ascontiguousarray(frames, dtype=np.uint8).data
    return np.ascontiguousarray(frames[..., ::-1], dtype=">u2").data  # BGR -> RGB, big-endian


def _from_wire(data: bytes | memoryview, track: Track, count: int) -> np.ndarray:
    dtype = LAYOUTS[track.pix_fmt][2]
    frames = np.frombuffer(data, dtype=dtype).reshape(count, *track.frame_shape)
    if track.pix_fmt != "rgb48be":
        return frames
    return frames[..., ::-1].astype(np.uint16)  # RGB big-endian -> BGR native


class RawStreamWriter:
    """Writes frames with their times as fragmented MOV to `sink` (an encoder's stdin)."""

    def __init__(self, sink: BinaryIO, track: Track, sample_aspect: tuple[int, int] = (1, 1)):
        self.sink, self.track, self.sample_aspect = sink, track, sample_aspect
        self._sequence = 0
        self._held: tuple[np.ndarray, int, int] | None = None  # the last frame, until its duration is known

    def write_header(self) -> None:
        t = self.track
        tag, depth, _ = LAYOUTS[t.pix_fmt]
        identity = struct.pack(">9I", 0x10000, 0, 0, 0, 0x10000, 0, 0, 0, 0x40000000)
        visual_entry = (
            b"\0" * 6 + struct.pack(">H", 1)  # reserved, data reference index
            + b"\0" * 16  # version, revision, vendor, temporal and spatial quality
            + struct.pack(">HHIIIH", t.width, t.height, 0x480000, 0x480000, 0, 1)
            + bytes(32)  # compressor name
            + struct.pack(">Hh", depth, -1)
            + _box(b"pasp", struct.pack(">II", *self.sample_aspect))
        )
        stbl = _box(b"stbl", _full_box(b"stsd", 0, 0, struct.pack(">I", 1), _box(tag, visual_entry)),
                    _full_box(b"stts", 0, 0, b"\0" * 4), _full_box(b"stsc", 0, 0, b"\0" * 4),
                    _full_box(b"stsz", 0, 0, b"\0" * 8), _full_box(b"stco", 0, 0, b"\0" * 4))
        minf = _box(b"minf", _full_box(b"vmhd", 0, 1, b"\0" * 8),
                    _box(b"dinf", _full_box(b"dref", 0, 0, struct.pack(">I", 1), _full_box(b"url ", 0, 1))), stbl)
        mdia = _box(b"mdia", _full_box(b"mdhd", 0, 0, struct.pack(">IIIIHH", 0, 0, t.timescale, 0, 0x55C4, 0)),
                    _full_box(b"hdlr", 0, 0, b"\0" * 4 + b"vide" + b"\0" * 12 + b"video\0"), minf)
        tkhd = _full_box(b"tkhd", 0, 3, struct.pack(">IIIII", 0, 0, 1, 0, 0), b"\0" * 8,
                         struct.pack(">hhhH", 0, 0, 0, 0), identity, struct.pack(">II", t.width << 16, t.height << 16))
        mvhd = _full_box(b"mvhd", 0, 0, struct.pack(">IIII", 0, 0, 1000, 0), struct.pack(">IH", 0x10000, 0x100),
                         b"\0" * 10, identity, b"\0" * 24, struct.pack(">I", 2))
        mvex = _box(b"mvex", _full_box(b"trex", 0, 0, struct.pack(">IIIII", 1, 1, 0, 0, 0)))
        self.sink.write(_box(b"ftyp", b"qt  ", struct.pack(">I", 0x200), b"qt  ")
                        + _box(b"moov", mvhd, _box(b"trak", tkhd, mdia), mvex))

    def write(self, batch: TimedFrames) -> None:
        """Queue the batch's frames. Each frame goes out in a fragment of its own, so that its time is
        exact (`tfdt`) whatever the durations say, once the next frame's time gives its duration."""
        for i, pts in enumerate(batch.pts):
            if self._held is not None:
                held_frame, held_pts, _ = self._held
                self._fragment(held_frame, held_pts, duration=pts - held_pts)
            self._held = (batch.frames[i:i + 1], pts, batch.durations[i])

    def finish(self, last_duration: int | None = None) -> None:
        """Send the last frame, lasting `last_duration` ticks (else as long as its own duration said)."""
        if self._held is not None:
            frame, pts, duration = self._held
            self._fragment(frame, pts, duration=last_duration if last_duration and last_duration > 0 else duration)
            self._held = None

    def _fragment(self, frame: np.ndarray, pts: int, duration: int) -> None:
        self._sequence += 1
        tfhd = _full_box(b"tfhd", 0, 0x020000, struct.pack(">I", 1))  # data offsets count from the moof
        tfdt = _full_box(b"tfdt", 1, 0, struct.pack(">Q", pts))
        moof_size = 8 + 16 + 8 + len(tfhd) + len(tfdt) + 28
        trun = _full_box(b"trun", 0, 0x000301, struct.pack(">IiII", 1, moof_size + 8, max(duration, 1),
                                                           self.track.frame_bytes))
        moof = _box(b"moof", _full_box(b"mfhd", 0, 0, struct.pack(">I", self._sequence)), _box(b"traf", tfhd, tfdt, trun))
        payload = _to_wire(frame, self.track.pix_fmt)
        self.sink.write(moof + struct.pack(">I4s", 8 + payload.nbytes, b"mdat"))
        self.sink.write(payload)


class RawStreamReader:
    """Reads what ffmpeg writes (see the module): the track first, then its frames fragment by fragment."""

    def __init__(self, source: BinaryIO):
        self.source = source
        self._defaults = {"duration": 0, "size": 0}
        self.track = self._read_track()

    def _read_track(self) -> Track:
        for kind, body in self._boxes():
            if kind == b"moov":
                trex = _find(body, [b"mvex", b"trex"])
                if trex is not None:
                    self._defaults = {"duration": struct.unpack(">I", trex[12:16])[0],
                                      "size": struct.unpack(">I", trex[16:20])[0]}
                return _track(body)
        raise ValueError("the raw stream ended before describing its frames")

    def fragments(self) -> Iterator[TimedFrames]:
        pending = None  # base time, durations, sizes of the next mdat's frames
        for kind, body in self._boxes(stream_mdat=True):
            if kind == b"moof":
                pending = _fragment(body, self._defaults)
            elif kind == b"mdat":
                if pending is None:
                    raise ValueError("frames without their times in the raw stream")
                base, durations, sizes = pending
                if len(body) != sum(sizes) or any(size != self.track.frame_bytes for size in sizes):
                    raise ValueError("a frame of the wrong size in the raw stream")
                pts = [base + sum(durations[:i]) for i in range(len(durations))]
                yield TimedFrames(_from_wire(body, self.track, len(sizes)), pts, durations)
                pending = None

    def _boxes(self, stream_mdat: bool = False) -> Iterator[tuple[bytes, bytes]]:
        while True:
            header = _read_exactly(self.source, 8)
            if header is None:
                return
            size, kind = struct.unpack(">I4s", header)
            if size == 1:
                size = struct.unpack(">Q", _read_exactly(self.source, 8) or bytes(8))[0] - 8
            body = _read_exactly(self.source, size - 8) or b""
            if len(body) != size - 8:
                raise ValueError("the raw stream was cut off in the middle of a box")
            yield kind, body


def _read_exactly(source: BinaryIO, count: int) -> bytes | None:
    chunks, left = [], count
    while left:
        chunk = source.read(left)
        if not chunk:
            if left == count:
                return None
            break
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


def _children(body: bytes) -> Iterator[tuple[bytes, bytes]]:
    i = 0
    while i + 8 <= len(body):
        size, kind = struct.unpack(">I4s", body[i:i + 8])
        start = i + 8
        if size == 1:
            size = struct.unpack(">Q", body[i + 8:i + 16])[0]
            start = i + 16
        if size < 8:
            return
        yield kind, body[start:i + size]
        i += size


def _find(body: bytes, path: list[bytes]) -> bytes | None:
    for kind, child in _children(body):
        if kind == path[0]:
            return child if len(path) == 1 else _find(child, path[1:])
    return None


def _track(moov: bytes) -> Track:
    mdia = _find(moov, [b"trak", b"mdia"])
    mdhd = _find(mdia, [b"mdhd"])
    timescale = struct.unpack(">I", mdhd[12:16] if mdhd[0] == 0 else mdhd[20:24])[0]
    stsd = _find(mdia, [b"minf", b"stbl", b"stsd"])
    (tag, entry), = list(_children(stsd[8:]))
    pix_fmt = next((name for name, layout in LAYOUTS.items() if layout[0] == tag), None)
    if pix_fmt is None:
        raise ValueError(f"unexpected raw layout {tag!r}")
    width, height = struct.unpack(">HH", entry[24:28])
    return Track(width, height, pix_fmt, timescale)


def _fragment(moof: bytes, defaults: dict) -> tuple[int, list[int], list[int]]:
    """(base time, durations, sizes) of a fragment's samples."""
    traf = _find(moof, [b"traf"])
    tfhd = _find(traf, [b"tfhd"])
    flags = struct.unpack(">I", tfhd[:4])[0] & 0xFFFFFF
    offset = 8 + (8 if flags & 0x1 else 0) + (4 if flags & 0x2 else 0)  # track id, base data offset, sample description
    duration, size = defaults["duration"], defaults["size"]
    if flags & 0x8:
        duration = struct.unpack(">I", tfhd[offset:offset + 4])[0]
        offset += 4
    if flags & 0x10:
        size = struct.unpack(">I", tfhd[offset:offset + 4])[0]
    tfdt = _find(traf, [b"tfdt"])
    base = 0
    if tfdt is not None:
        base = struct.unpack(">Q", tfdt[4:12])[0] if tfdt[0] == 1 else struct.unpack(">I", tfdt[4:8])[0]
    trun = _find(traf, [b"trun"])
    run_flags = struct.unpack(">I", trun[:4])[0] & 0xFFFFFF
    count = struct.unpack(">I", trun[4:8])[0]
    i = 8 + (4 if run_flags & 0x1 else 0) + (4 if run_flags & 0x4 else 0)
    durations, sizes = [], []
    for _ in range(count):
        sample_duration, sample_size = duration, size
        if run_flags & 0x100:
            sample_duration = struct.unpack(">I", trun[i:i + 4])[0]
            i += 4
        if run_flags & 0x200:
            sample_size = struct.unpack(">I", trun[i:i + 4])[0]
            i += 4
        i += (4 if run_flags & 0x400 else 0) + (4 if run_flags & 0x800 else 0)
        durations.append(sample_duration)
        sizes.append(sample_size)
    return base, durations, sizes
