"""Decoded frames of a video, in batches."""

from pathlib import Path
from typing import Iterator

import cv2
import numpy as np

from echoshot_ai_server.errors import ErrorCode, PermanentError
from echoshot_ai_server.media.tools import file_arg


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
        self._capture = cv2.VideoCapture(file_arg(self.path), cv2.CAP_FFMPEG)
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
