"""Real-ESRGAN inference: a batch of frames in, a batch of upscaled frames out.

The model is basicsr's RRDBNet with the RealESRGAN_x4plus weights. Tiling follows
realesrgan's RealESRGANer exactly (tile / tile_pad / pre_pad, same windows, same rounding), so
the pixels are Real-ESRGAN's; outputs at scale 2 are the x4 result resized with Lanczos, as
RealESRGANer does for `outscale=2`.

Loading (`load_upscaler`) is separate from inference (`Upscaler.upscale`). Nothing here knows
about files, videos, S3 or jobs.
"""

import logging
import sys
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from echoshot_ai_server.config import WEIGHTS_URL, Device, DeviceProfile
from echoshot_ai_server.errors import ErrorCode, PermanentError, RetryableError

log = logging.getLogger(__name__)

SUPPORTED_SCALES = (2, 4)


@dataclass(frozen=True)
class ModelSpec:
    """RRDBNet hyper-parameters. The default is RealESRGAN_x4plus."""

    num_feat: int = 64
    num_block: int = 23
    num_grow_ch: int = 32
    scale: int = 4


X4PLUS = ModelSpec()


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


def _import_rrdbnet():
    # basicsr 1.4.2 imports a torchvision module that was removed in torchvision 0.17.
    try:
        import torchvision.transforms.functional_tensor  # noqa: F401
    except ImportError:
        import torchvision.transforms.functional as functional

        sys.modules["torchvision.transforms.functional_tensor"] = functional
    from basicsr.archs.rrdbnet_arch import RRDBNet

    return RRDBNet


def build_model(spec: ModelSpec = X4PLUS) -> nn.Module:
    rrdbnet = _import_rrdbnet()
    return rrdbnet(
        num_in_ch=3,
        num_out_ch=3,
        num_feat=spec.num_feat,
        num_block=spec.num_block,
        num_grow_ch=spec.num_grow_ch,
        scale=spec.scale,
    )


def read_state_dict(path: Path) -> dict:
    """A checkpoint saved as {'params_ema': ...}, {'params': ...} or a bare state dict."""
    if not path.is_file():
        raise PermanentError(
            ErrorCode.WEIGHTS_MISSING,
            f"model weights not found: {path}. Download them with "
            f"'mkdir -p {path.parent} && curl -L {WEIGHTS_URL} -o {path}' or point WEIGHTS_DIR at their folder",
        )
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise PermanentError(ErrorCode.WEIGHTS_INVALID, f"cannot read model weights {path}: {exc}") from exc
    if not isinstance(checkpoint, dict):
        raise PermanentError(ErrorCode.WEIGHTS_INVALID, f"{path} does not hold a state dict")
    for key in ("params_ema", "params"):
        if key in checkpoint:
            return checkpoint[key]
    return checkpoint


def load_model(path: Path, spec: ModelSpec = X4PLUS, state_dict: dict | None = None) -> nn.Module:
    model = build_model(spec)
    try:
        model.load_state_dict(read_state_dict(path) if state_dict is None else state_dict, strict=True)
    except RuntimeError as exc:
        raise PermanentError(
            ErrorCode.WEIGHTS_INVALID, f"{path} does not match RRDBNet{spec}: {str(exc).splitlines()[0]}"
        ) from exc
    return model


def torch_cuda_available() -> bool:
    return torch.cuda.is_available()


def resolve_device(requested: Device) -> Device:
    """The device that will really be used: the GPU only when CUDA is there."""
    if requested == "gpu" and not torch.cuda.is_available():
        log.warning("GPU가 요청되었지만 사용 불가능합니다. CPU로 대체합니다.")
        return "cpu"
    return requested


def _is_out_of_memory(exc: BaseException) -> bool:
    if isinstance(exc, (torch.OutOfMemoryError, MemoryError)):
        return True
    message = str(exc).lower()
    return isinstance(exc, RuntimeError) and ("out of memory" in message or "can't allocate memory" in message)


class Upscaler:
    """A loaded Real-ESRGAN model and the way it is run (device, precision, tiles)."""

    def __init__(
        self,
        model: nn.Module,
        *,
        device: Device,
        half: bool,
        tile: int,
        tile_pad: int,
        fallback_tile: int,
        pre_pad: int = 0,
        batch_frames: int = 1,
        model_scale: int = 4,
    ):
        self.device = device
        self.torch_device = torch.device("cuda" if device == "gpu" else "cpu")
        self.half = half and device == "gpu"
        self.dtype = torch.float16 if self.half else torch.float32
        self.model = model.eval().to(self.torch_device, self.dtype)
        self.tile = tile
        self.tile_pad = tile_pad
        self.fallback_tile = fallback_tile
        self.pre_pad = pre_pad
        self.batch_frames = batch_frames
        self.model_scale = model_scale

    def describe(self) -> str:
        return f"Device: {self.device.upper()}, Tile: {self.tile}, Half Precision: {self.half}"

    @torch.inference_mode()
    def upscale(self, frames: np.ndarray, outscale: int) -> np.ndarray:
        """Upscale a batch of frames.

        frames: uint8 array (N, H, W, 3), BGR as OpenCV decodes it, on the host.
        Returns uint8 (N, H * outscale, W * outscale, 3), BGR, on the host.
        If the device runs out of memory, the batch is run again with the fallback tile size.
        """
        if outscale not in SUPPORTED_SCALES:
            raise PermanentError(ErrorCode.INVALID_PARAMETERS, f"scale must be 2 or 4, got {outscale}")
        if frames.ndim != 4 or frames.shape[3] != 3 or frames.dtype != np.uint8:
            raise ValueError(f"expected uint8 frames of shape (N, H, W, 3), got {frames.dtype} {frames.shape}")
        try:
            out = self._upscale_model_scale(frames, self.tile)
        except Exception as exc:
            if not _is_out_of_memory(exc):
                raise
            out = self._retry_with_fallback_tile(frames, exc)
        if outscale != self.model_scale:
            height, width = frames.shape[1] * outscale, frames.shape[2] * outscale
            out = np.stack([cv2.resize(f, (width, height), interpolation=cv2.INTER_LANCZOS4) for f in out])
        return out

    def _retry_with_fallback_tile(self, frames: np.ndarray, error: BaseException) -> np.ndarray:
        if self.tile > 0 and 0 < self.fallback_tile < self.tile:
            log.warning(
                "메모리 부족 - 타일 %d → %d로 줄여 다시 처리합니다 (%s)",
                self.tile, self.fallback_tile, str(error).splitlines()[0],
            )
            self._release_cached_memory()
            try:
                return self._upscale_model_scale(frames, self.fallback_tile)
            except Exception as exc:
                if not _is_out_of_memory(exc):
                    raise
                error = exc
        raise RetryableError(
            ErrorCode.OUT_OF_MEMORY, f"out of memory even with tile {self.fallback_tile}: {error}"
        ) from error

    def _release_cached_memory(self) -> None:
        if self.torch_device.type == "cuda":
            torch.cuda.empty_cache()

    def _upscale_model_scale(self, frames: np.ndarray, tile: int) -> np.ndarray:
        scale, pre_pad = self.model_scale, self.pre_pad
        x = torch.from_numpy(frames).to(self.torch_device)
        # NHWC BGR uint8 -> NCHW RGB in [0, 1], rounded to the model's dtype as RealESRGANer does.
        x = x.permute(0, 3, 1, 2).flip(1).float().div_(255.0).to(self.dtype)
        if pre_pad:
            x = F.pad(x, (0, pre_pad, 0, pre_pad), mode="reflect")
        n, c, h, w = x.shape
        out = x.new_zeros((n, c, h * scale, w * scale))
        for win in tile_windows(h, w, tile, self.tile_pad, scale):
            y = self.model(x[:, :, win.in_y0:win.in_y1, win.in_x0:win.in_x1])
            out[:, :, win.out_y0:win.out_y1, win.out_x0:win.out_x1] = y[
                :, :,
                win.crop_y0:win.crop_y0 + win.out_y1 - win.out_y0,
                win.crop_x0:win.crop_x0 + win.out_x1 - win.out_x0,
            ]
        out = out[:, :, : (h - pre_pad) * scale, : (w - pre_pad) * scale]
        out = out.float().clamp_(0, 1).mul_(255.0).round_().to(torch.uint8)
        return out.flip(1).permute(0, 2, 3, 1).contiguous().cpu().numpy()


def load_upscalers(weights_path: Path, device: Device, profile: DeviceProfile, pre_pad: int = 0, count: int = 1) -> list[Upscaler]:
    """`count` production upscalers (one per worker slot): RealESRGAN_x4plus on `device`, as `profile` says."""
    state_dict = read_state_dict(weights_path)
    return [
        Upscaler(
            load_model(weights_path, X4PLUS, state_dict),
            device=device,
            half=profile.half,
            tile=profile.tile,
            tile_pad=profile.tile_pad,
            fallback_tile=profile.fallback_tile,
            pre_pad=pre_pad,
            batch_frames=profile.batch_frames,
            model_scale=X4PLUS.scale,
        )
        for _ in range(count)
    ]


def load_upscaler(weights_path: Path, device: Device, profile: DeviceProfile, pre_pad: int = 0) -> Upscaler:
    return load_upscalers(weights_path, device, profile, pre_pad)[0]


def torch_runtime() -> dict:
    """Facts for the environment report."""
    info = {
        "torch_version": torch.__version__,
        "cuda_available": torch.cuda.is_available(),
        "cuda_version": torch.version.cuda,
        "gpu_name": None,
        "gpu_memory_gb": None,
    }
    if info["cuda_available"]:
        props = torch.cuda.get_device_properties(0)
        info["gpu_name"] = props.name
        info["gpu_memory_gb"] = props.total_memory / 1024**3
    return info
