"""Real-ESRGAN inference: a batch of frames in, a batch of upscaled frames out.

The model is basicsr's RRDBNet with the RealESRGAN_x4plus weights. Tiling follows
realesrgan's RealESRGANer exactly (tile / tile_pad / pre_pad, same windows, same rounding), so
the pixels are Real-ESRGAN's; outputs at scale 2 are the x4 result resized with Lanczos, as
RealESRGANer does for `outscale=2`.

Loading (`load_upscaler`) is separate from inference (`Upscaler.upscale`). Nothing here knows
about files, videos, S3 or jobs.
"""

import logging
import math
import sys
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from echoshot_ai_server.config import WEIGHTS_URL, Device, DeviceProfile, Engine
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


# Peak device memory of an fp16 RealESRGAN_x4plus forward pass per input pixel (4743 B measured on
# a whole 640x480 frame, rounded up for the output buffers around it).
BYTES_PER_INPUT_PIXEL = 5200
MIN_AUTO_TILE = 64
GPU_MEMORY_RESERVE_BYTES = 3 * 2**30 // 2


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


# The guide's warning, logged wherever a GPU was asked for and the CPU does the work.
GPU_FALLBACK_WARNING = "GPU가 요청되었지만 사용 불가능합니다. CPU로 대체합니다."


def resolve_device(requested: Device) -> Device:
    """The device that will really be used: the GPU only when CUDA is there."""
    return "cpu" if requested == "gpu" and not torch.cuda.is_available() else requested


def _is_out_of_memory(exc: BaseException) -> bool:
    if isinstance(exc, (torch.OutOfMemoryError, MemoryError)):
        return True
    message = str(exc).lower()
    return isinstance(exc, RuntimeError) and ("out of memory" in message or "can't allocate memory" in message)


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
    taps = torch.tensor(lanczos4_weights(0.5), dtype=images.dtype, device=images.device)
    x = images.reshape(n * c, 1, h, w)
    x = F.conv2d(F.pad(x, (3, 4, 0, 0), mode="replicate"), taps.view(1, 1, 1, 8), stride=(1, 2))
    x = F.conv2d(F.pad(x, (0, 0, 3, 4), mode="replicate"), taps.view(1, 1, 8, 1), stride=(2, 1))
    return x.reshape(n, c, h // 2, w // 2)


def resolve_engine(requested: Engine, model: nn.Module, device: torch.device) -> Engine:
    """The engine that will run: `auto` is the fused one where it can run, else `torch.compile`."""
    if requested in ("eager", "compile"):
        return requested
    from .fused_trunk import fused_unsupported_reason

    reason = fused_unsupported_reason(model, device)
    if reason is None:
        return "fused"
    if requested == "fused":
        log.warning("%s: torch.compile 엔진으로 대체합니다", reason)
    return "compile"


def build_forward(engine: Engine, model: nn.Module):
    """The callable that runs whole frames through `model` with the given engine."""
    if engine == "compile":
        # torch.compile fuses the element-wise work between the convolutions.
        return torch.compile(model)
    if engine == "fused":
        from .fused_trunk import FusedRRDBNet

        return FusedRRDBNet(model, compile_head_tail=True)
    return model


class Upscaler:
    """A loaded Real-ESRGAN model and the way it is run (device, precision, tiles).

    On the GPU the whole job of a batch stays on the device: uint8 frames go up, the model runs in
    fp16 with channels-last memory, and clamping, rounding, the x2 resize and the colour order are
    done there too, so that only the final uint8 frames come back.
    """

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
        channels_last: bool | None = None,
        resize_on_device: bool | None = None,
        engine: Engine = "eager",
        memory_budget_bytes: int | None = None,
    ):
        self.device = device
        self.torch_device = torch.device("cuda" if device == "gpu" else "cpu")
        self.half = half and device == "gpu"
        self.dtype = torch.float16 if self.half else torch.float32
        on_gpu = device == "gpu"
        self.memory_format = torch.channels_last if (on_gpu if channels_last is None else channels_last) else torch.contiguous_format
        # On the CPU the x2 resize is OpenCV's own, to the bit; on the GPU the same filter in float.
        self.resize_on_device = on_gpu if resize_on_device is None else resize_on_device
        self.model = model.eval().to(self.torch_device, self.dtype, memory_format=self.memory_format)
        self.engine = resolve_engine(engine, self.model, self.torch_device)
        self.forward = build_forward(self.engine, self.model)
        # Compiled and fused engines are specialised to their input shape (compilation, autotuning):
        # shapes stay fixed per video (whole frames, batches padded to full size), so a worker pays
        # that once per frame size.
        self.fixed_shapes = self.engine != "eager"
        self.memory_budget_bytes = memory_budget_bytes
        self.tile = tile
        self.tile_pad = tile_pad
        self.fallback_tile = fallback_tile
        self.pre_pad = pre_pad
        self.batch_frames = batch_frames
        self.model_scale = model_scale
        if on_gpu:
            torch.backends.cudnn.benchmark = True

    def describe(self) -> str:
        tile = self.tile if self.tile > 0 else "auto"
        return f"Device: {self.device.upper()}, Tile: {tile}, Half Precision: {self.half}"

    @torch.inference_mode()
    def upscale(self, frames: np.ndarray, outscale: int) -> np.ndarray:
        """Upscale a batch of frames.

        frames: uint8 array (N, H, W, 3), BGR as OpenCV decodes it, on the host.
        Returns uint8 (N, H * outscale, W * outscale, 3), BGR, on the host.
        If the device runs out of memory, the batch is run again with the fallback tile size.
        """
        if frames.ndim != 4 or frames.shape[3] != 3 or frames.dtype != np.uint8:
            raise ValueError(f"expected uint8 frames of shape (N, H, W, 3), got {frames.dtype} {frames.shape}")
        out = self.upscale_tensor(torch.from_numpy(frames).to(self.torch_device), outscale)
        if self.torch_device.type == "cuda":
            host = torch.empty(out.shape, dtype=torch.uint8, pin_memory=True)
            host.copy_(out)
            out = host
        out = out.cpu().numpy()
        if outscale != self.model_scale and not self.resize_on_device:
            height, width = frames.shape[1] * outscale, frames.shape[2] * outscale
            out = np.stack([cv2.resize(f, (width, height), interpolation=cv2.INTER_LANCZOS4) for f in out])
        return out

    @torch.inference_mode()
    def upscale_tensor(self, frames: torch.Tensor, outscale: int) -> torch.Tensor:
        """The engine on device-resident frames: uint8 (N, H, W, 3) BGR in, uint8 NHWC BGR out.

        The output is at `outscale` when the resize runs on the device, else at the model's scale.
        """
        if outscale not in SUPPORTED_SCALES:
            raise PermanentError(ErrorCode.INVALID_PARAMETERS, f"scale must be 2 or 4, got {outscale}")
        per_pass, tile = len(frames), self.tile
        if tile <= 0:
            per_pass, tile = plan_forward(self.batch_frames, frames.shape[1], frames.shape[2], tile_pad=self.tile_pad,
                                          budget_bytes=self.memory_budget_bytes)
        try:
            out = self._run_passes(frames, tile, per_pass)
        except Exception as exc:
            if not _is_out_of_memory(exc):
                raise
            out = self._retry_with_fallback_tile(frames, tile, exc)
        return self._to_frames(out, outscale)

    def _run_passes(self, frames: torch.Tensor, tile: int, per_pass: int) -> torch.Tensor:
        outputs = []
        for start in range(0, len(frames), per_pass):
            chunk = frames[start:start + per_pass]
            count = len(chunk)
            if self.fixed_shapes and tile == 0 and count < per_pass:
                # keep the compiled shape: pad with copies of the last frame, drop their outputs
                chunk = torch.cat([chunk, chunk[-1:].expand(per_pass - count, *chunk.shape[1:])])
            outputs.append(self._run_model(chunk, tile)[:count])
        return outputs[0] if len(outputs) == 1 else torch.cat(outputs)

    def _retry_with_fallback_tile(self, frames: torch.Tensor, tile: int, error: BaseException) -> torch.Tensor:
        if 0 < self.fallback_tile and (tile == 0 or self.fallback_tile < tile):
            log.warning(
                "메모리 부족 - 타일 %s → %d로 줄여 다시 처리합니다 (%s)",
                tile or "전체 프레임", self.fallback_tile, str(error).splitlines()[0],
            )
            self._release_cached_memory()
            try:
                return self._run_passes(frames, self.fallback_tile, 1)
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

    def _run_model(self, frames: torch.Tensor, tile: int) -> torch.Tensor:
        """uint8 NHWC BGR -> the model's output, (N, 3, H * scale, W * scale) RGB in its dtype."""
        scale, pre_pad = self.model_scale, self.pre_pad
        # -> NCHW RGB in [0, 1], rounded to the model's dtype as RealESRGANer does.
        x = frames.permute(0, 3, 1, 2).flip(1).float().div_(255.0).to(self.dtype)
        x = x.contiguous(memory_format=self.memory_format)
        if pre_pad:
            x = F.pad(x, (0, pre_pad, 0, pre_pad), mode="reflect")
        n, c, h, w = x.shape
        windows = tile_windows(h, w, tile, self.tile_pad, scale)
        if len(windows) == 1:
            out = self.forward(x)  # the engine runs whole frames; tiles (edge tiles vary in shape) run eagerly
        else:
            out = x.new_zeros((n, c, h * scale, w * scale)).contiguous(memory_format=self.memory_format)
            for win in windows:
                y = self.model(x[:, :, win.in_y0:win.in_y1, win.in_x0:win.in_x1].contiguous(memory_format=self.memory_format))
                out[:, :, win.out_y0:win.out_y1, win.out_x0:win.out_x1] = y[
                    :, :,
                    win.crop_y0:win.crop_y0 + win.out_y1 - win.out_y0,
                    win.crop_x0:win.crop_x0 + win.out_x1 - win.out_x0,
                ]
        return out[:, :, : (h - pre_pad) * scale, : (w - pre_pad) * scale]

    def _to_frames(self, out: torch.Tensor, outscale: int) -> torch.Tensor:
        """Model output -> uint8 NHWC BGR, as RealESRGANer rounds it (then resized, when on the device)."""
        out = out.float().clamp_(0, 1).mul_(255.0).round_()
        if outscale != self.model_scale and self.resize_on_device:
            assert outscale * 2 == self.model_scale, "only x2 from the x4 model"
            out = lanczos_half(out).round_().clamp_(0, 255)
        return out.to(torch.uint8).flip(1).permute(0, 2, 3, 1).contiguous()


def gpu_memory_budget(limit_gb: float) -> int:
    """Bytes the engine may plan with on the GPU; a non-zero limit is also enforced on the allocator."""
    total = torch.cuda.get_device_properties(0).total_memory
    limit = min(total, int(limit_gb * 2**30)) if limit_gb > 0 else total
    if limit < total:
        torch.cuda.set_per_process_memory_fraction(limit / total)
    # CUDA context, cuDNN workspaces and the weights live outside the plan.
    return max(limit - GPU_MEMORY_RESERVE_BYTES, limit // 2)


def load_upscalers(weights_path: Path, device: Device, profile: DeviceProfile, pre_pad: int = 0, count: int = 1) -> list[Upscaler]:
    """`count` production upscalers (one per worker slot): RealESRGAN_x4plus on `device`, as `profile` says."""
    state_dict = read_state_dict(weights_path)
    on_gpu = device == "gpu"
    budget = gpu_memory_budget(profile.memory_limit_gb) // count if on_gpu else None
    upscalers = [
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
            engine=profile.engine,
            memory_budget_bytes=budget,
        )
        for _ in range(count)
    ]
    if on_gpu:
        log.info("GPU engine: %s (requested: %s)", upscalers[0].engine, profile.engine)
    return upscalers


def load_upscaler(weights_path: Path, device: Device, profile: DeviceProfile, pre_pad: int = 0) -> Upscaler:
    return load_upscalers(weights_path, device, profile, pre_pad)[0]


def gpu_memory_stats() -> dict[str, int]:
    return {"allocated": torch.cuda.memory_allocated(), "reserved": torch.cuda.memory_reserved()}


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
