"""Where tiles go, exactly as Real-ESRGAN's RealESRGANer.tile_process cuts them, and how a batch of
frames fits a memory budget."""

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class TileWindow:
    """One tile: the padded input region and where its core lands in the output."""

    in_y0: int
    in_y1: int
    in_x0: int
    in_x1: int
    out_y0: int
    out_y1: int
    out_x0: int
    out_x1: int
    crop_y0: int
    crop_x0: int


def tile_windows(height: int, width: int, tile: int, tile_pad: int, scale: int) -> list[TileWindow]:
    """The tiles RealESRGANer.tile_process visits, in the same order. tile <= 0 means one tile."""
    if tile <= 0:
        return [TileWindow(0, height, 0, width, 0, height * scale, 0, width * scale, 0, 0)]
    windows = []
    for y0 in range(0, height, tile):
        for x0 in range(0, width, tile):
            y1, x1 = min(y0 + tile, height), min(x0 + tile, width)
            py0, px0 = max(y0 - tile_pad, 0), max(x0 - tile_pad, 0)
            py1, px1 = min(y1 + tile_pad, height), min(x1 + tile_pad, width)
            windows.append(
                TileWindow(
                    py0, py1, px0, px1,
                    y0 * scale, y1 * scale, x0 * scale, x1 * scale,
                    (y0 - py0) * scale, (x0 - px0) * scale,
                )
            )
    return windows


# Peak device memory of an fp16 RealESRGAN_x4plus forward pass per input pixel (4743 B measured on
# a whole 640x480 frame, rounded up for the output buffers around it).
BYTES_PER_INPUT_PIXEL = 5200
MIN_AUTO_TILE = 64


def plan_forward(frames: int, height: int, width: int, *, tile_pad: int, budget_bytes: int | None) -> tuple[int, int]:
    """How to run a batch within a memory budget: (frames per forward pass, tile size; 0 = whole frames).

    Whole frames when one fits (as many per pass as fit, at most `frames`); otherwise one frame at
    a time in the largest square tiles that fit.
    """
    if budget_bytes is None:
        return frames, 0
    per_frame = BYTES_PER_INPUT_PIXEL * height * width
    if per_frame <= budget_bytes:
        return max(1, min(frames, budget_bytes // per_frame)), 0
    side = math.isqrt(budget_bytes // BYTES_PER_INPUT_PIXEL) - 2 * tile_pad
    return 1, max(MIN_AUTO_TILE, side // 16 * 16)
