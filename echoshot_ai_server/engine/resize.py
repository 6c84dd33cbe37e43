"""OpenCV's Lanczos-4 downscale by two, on the device: as two strided convolutions (any device), or
fused with the model output's rounding to levels in one Triton kernel (the GPU's x2 path)."""

import functools
import math

import torch
import triton
import triton.language as tl
from torch.nn import functional as F


def lanczos4_weights(offset: float) -> list[float]:
    """OpenCV's INTER_LANCZOS4 coefficients for a sample `offset` (0..1) past the 4th of 8 taps."""
    if offset < 1e-7:
        return [0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0]
    weights = []
    for i in range(8):
        y = (offset + 3 - i) * math.pi / 4
        weights.append(math.sin(4 * y) * math.sin(y) / (y * y) if y else 1.0)
    total = sum(weights)
    return [w / total for w in weights]


def lanczos_half(images: torch.Tensor) -> torch.Tensor:
    """cv2.resize(..., INTER_LANCZOS4) to half the size, on whatever device `images` (N, C, H, W) is.

    A 2x downscale samples every source position 2k + 0.5: one separable 8-tap filter with a
    stride of 2, edges replicated as OpenCV does. Float arithmetic: within 1 of OpenCV's uint8 result.
    """
    n, c, h, w = images.shape
    taps = _half_taps(images.device, images.dtype)
    x = images.reshape(n * c, 1, h, w)
    x = F.conv2d(F.pad(x, (3, 4, 0, 0), mode="replicate"), taps.view(1, 1, 1, 8), stride=(1, 2))
    x = F.conv2d(F.pad(x, (0, 0, 3, 4), mode="replicate"), taps.view(1, 1, 8, 1), stride=(2, 1))
    return x.reshape(n, c, h // 2, w // 2)


@functools.cache
def _half_taps(device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """The 8 taps of a 2x downscale (made and copied to the device once)."""
    return torch.tensor(lanczos4_weights(0.5), dtype=dtype, device=device)


def levels(images: torch.Tensor, max_value: int) -> torch.Tensor:
    """The model's output in [0, 1] as levels 0..max_value, float32, rounded as RealESRGANer rounds them
    (a float32 `images` is made the levels in place)."""
    return images.float().clamp_(0, 1).mul_(float(max_value)).round_()


@triton.jit
def round_half_even(v):
    """torch.round's rounding (half to even) of fp32 values below 2 ** 23 (v - floor(v) is then exact)."""
    r = tl.floor(v)
    fraction = v - r
    odd = r - 2.0 * tl.floor(r * 0.5) != 0.0
    return tl.where((fraction > 0.5) | ((fraction == 0.5) & odd), r + 1.0, r)


@triton.jit(do_not_specialize=["h", "w", "half_h", "half_w", "s_n", "s_c", "s_h", "s_w"])
def half_levels_kernel(src_ptr, out_ptr, taps_ptr, h, w, half_h, half_w, s_n, s_c, s_h, s_w, max_value,
                       BLOCK: tl.constexpr):
    """One output row of one channel of one frame, BLOCK columns a program: each source sample made a
    level (clamped to [0, 1], times max_value, rounded), then the 8 x 8 taps of `lanczos_half` in its
    order (across each row, then down), rounded and clamped."""
    row = tl.program_id(0)  # (frame * 3 + channel) * half_h + y
    y = row % half_h
    plane = row // half_h
    base = src_ptr + (plane // 3).to(tl.int64) * s_n + (plane % 3) * s_c
    x = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    live = x < half_w
    total = tl.zeros([BLOCK], tl.float32)
    for i in tl.static_range(8):
        source_row = tl.minimum(tl.maximum(2 * y - 3 + i, 0), h - 1)  # edges replicated
        across = tl.zeros([BLOCK], tl.float32)
        for j in tl.static_range(8):
            column = tl.minimum(tl.maximum(2 * x - 3 + j, 0), w - 1)
            value = tl.load(base + source_row.to(tl.int64) * s_h + column * s_w, mask=live, other=0.0).to(tl.float32)
            level = round_half_even(tl.minimum(tl.maximum(value, 0.0), 1.0) * max_value)
            across += tl.load(taps_ptr + j) * level
        total += tl.load(taps_ptr + i) * across
    total = tl.minimum(tl.maximum(round_half_even(total), 0.0), max_value)
    tl.store(out_ptr + row.to(tl.int64) * half_w + x, total, mask=live)


HALF_BLOCK = 256  # output columns a program of `half_levels_kernel`


def half_levels(images: torch.Tensor, max_value: int) -> torch.Tensor:
    """The model's output (N, 3, H, W) in [0, 1], any memory format, as levels (0..max_value, rounded,
    as RealESRGANer makes them) resized to half its size as `lanczos_half` does, rounded and clamped:
    float32 (N, 3, H / 2, W / 2). On the GPU in one kernel that reads the output once
    (`half_levels_in_kernel`); elsewhere in torch's operations."""
    if images.is_cuda:
        return half_levels_in_kernel(images, max_value)
    return lanczos_half(levels(images, max_value)).round_().clamp_(0, max_value)


def half_levels_in_kernel(images: torch.Tensor, max_value: int) -> torch.Tensor:
    """`half_levels` in `half_levels_kernel` (on the GPU, or on the CPU in Triton's interpreter)."""
    n, c, h, w = images.shape
    out = torch.empty((n, c, h // 2, w // 2), dtype=torch.float32, device=images.device)
    taps = _half_taps(images.device, torch.float32)
    grid = (n * c * (h // 2), triton.cdiv(w // 2, HALF_BLOCK))
    half_levels_kernel[grid](images, out, taps, h, w, h // 2, w // 2, *images.stride(), float(max_value),
                             BLOCK=HALF_BLOCK)
    return out
