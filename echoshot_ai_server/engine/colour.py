"""Upscaled RGB frames -> the YUV 4:2:0 that H.264 stores, computed where the frames already are.

On the GPU this saves the encoder's own conversion (one CPU thread in ffmpeg) and halves the bytes
that go back to the host and through the encoder's pipe (1.5 bytes a pixel instead of 3).
"""

from functools import lru_cache

import torch
from torch.nn import functional as F

# (Kr, Kb) of each colour matrix, by the names of ffmpeg's scale filter (media.reader.scale_matrix)
LUMA_WEIGHTS = {
    "bt709": (0.2126, 0.0722), "smpte170m": (0.299, 0.114), "bt470": (0.299, 0.114),
    "bt2020": (0.2627, 0.0593), "fcc": (0.30, 0.11), "smpte240m": (0.212, 0.087),
}


def rgb_to_i420(rgb: torch.Tensor, matrix: str) -> torch.Tensor:
    """(N, 3, H, W) RGB, float levels in [0, 255], H and W even -> (N, H * 3 // 2, W) uint8 planes
    Y, U, V one after the other (I420), limited range ("tv"), with the given matrix.

    The chroma is what ffmpeg's own conversion (`scale` with its default filter) makes of the same
    frame, within a level or two: each pair of columns averaged, then a bicubic 2:1 filter down the
    rows, both centred between the pixels they take.
    """
    n, _, height, width = rgb.shape
    if height % 2 or width % 2:
        raise ValueError(f"4:2:0 needs an even size, not {width}x{height}")
    kr, kb = LUMA_WEIGHTS[matrix]
    r, g, b = rgb.float().unbind(1)
    luma = kr * r + (1 - kr - kb) * g + kb * b
    out = torch.empty((n, height * 3 // 2, width), dtype=torch.uint8, device=rgb.device)
    out[:, :height] = (luma * (219 / 255) + 16).round_().clamp_(0, 255)
    chroma = torch.stack([(b - luma) / (2 * (1 - kb)), (r - luma) / (2 * (1 - kr))], dim=1)
    chroma = _subsample(chroma) * (224 / 255) + 128
    out[:, height:] = chroma.round_().clamp_(0, 255).reshape(n, height // 2, width)
    return out


@lru_cache
def _cubic_taps(device: torch.device) -> torch.Tensor:
    """swscale's default bicubic (B = 0, C = 0.6) stretched for a 2:1 reduction: source rows 0.25,
    0.75 and 1.25 output rows from the centre, normalised; kept on the device (not copied per batch)."""
    taps = torch.tensor([-0.084375, 0.240625, 0.871875, 0.871875, 0.240625, -0.084375]) / 2.05625
    return taps.view(1, 1, 6, 1).to(device)


def _subsample(planes: torch.Tensor) -> torch.Tensor:
    """(N, 2, H, W) -> (N, 2, H / 2, W / 2): columns averaged in pairs, then rows by the bicubic filter
    (edge rows repeated)."""
    n, c, height, width = planes.shape
    columns = (planes[..., 0::2] + planes[..., 1::2]) * 0.5
    padded = F.pad(columns.reshape(n * c, 1, height, width // 2), (0, 0, 2, 2), mode="replicate")
    return F.conv2d(padded, _cubic_taps(planes.device), stride=(2, 1)).reshape(n, c, height // 2, width // 2)
