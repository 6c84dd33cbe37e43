"""Real-ESRGAN inference: a batch of frames in, a batch of upscaled frames out.

The model is RRDBNet (engine/archs.py). Tiling follows realesrgan's RealESRGANer exactly (tile / tile_pad /
pre_pad, same windows, same rounding), so the pixels are Real-ESRGAN's; outputs at scale 2 are the
x4 result resized with Lanczos, as RealESRGANer does for `outscale=2`.

Loading (`load_upscalers`) is separate from the call (`Upscaler.upscale`), whose contract is in its
docstring. Nothing here knows about files, videos, S3 or jobs.
"""

import logging
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from echoshot_ai_server.engine.colour import rgb_to_i420
from echoshot_ai_server.engine.device import DeviceOutOfMemory, gpu_memory_budget, is_out_of_memory
from echoshot_ai_server.engine.graphs import GRAPH_MAX_PIXELS, GraphedForward
from echoshot_ai_server.engine.models import check_digest, load_model, read_state_dict
from echoshot_ai_server.engine.resize import half_levels, levels
from echoshot_ai_server.engine.specs import Device, Engine, ModelSpec, TailCompile, scale_problem
from echoshot_ai_server.engine.tiling import BYTES_PER_INPUT_PIXEL, plan_forward, tile_windows

log = logging.getLogger(__name__)

# What a worker tunes and compiles at start-up: frame sizes that, in a full batch of 4, meet every
# convolution of the fused engine in each size class it can fall in (fused_trunk.SIZE_CLASS_ROWS;
# the tail's convolutions always take the larger class).
WARM_UP_SIZES = ((640, 480), (1280, 720))


@dataclass(frozen=True)
class RunProfile:
    """How the upscaler runs on one kind of device."""

    tile: int  # 0: whole frames, or the largest tiles that fit the memory budget
    tile_pad: int
    fallback_tile: int  # tiles to redo a batch with after running out of memory
    half: bool = False  # fp16 (on the GPU only)
    bf16: bool = False  # bfloat16 (on the CPU only: AVX-512 BF16 or AMX multiply it at up to twice the fp32 rate)
    batch_frames: int = 1
    engine: Engine = "eager"
    # The fused engine's tail: its own Triton kernels, no compiler at all ("never", the fastest);
    # RRDBNet's own tail compiled on a thread once the worker is ready, taking over from them
    # ("background"); head and tail under torch.compile before it is ready ("start"). BENCHMARKS.md.
    tail_compile: TailCompile = "never"
    # The fused engine's small batches replayed as CUDA graphs (engine/graphs.py; its own tail only)
    cuda_graphs: bool = False
    memory_budget_bytes: int | None = None  # None: no plan (the CPU)
    pre_pad: int = 0
    # None: as suits the device (channels-last and the x2 resize on the GPU); tests force them on the CPU
    channels_last: bool | None = None
    resize_on_device: bool | None = None
    yuv_on_device: bool | None = None  # whether jobs take frames converted to YUV 4:2:0 here (8-bit sources)


def resolve_engine(requested: Engine, model: nn.Module, device: torch.device) -> Engine:
    """The engine that will run: `auto` is the fused one where it can run, else `torch.compile`."""
    if requested in ("eager", "compile"):
        return requested
    from echoshot_ai_server.engine.fused_trunk import fused_unsupported_reason

    reason = fused_unsupported_reason(model, device)
    if reason is None:
        return "fused"
    if requested == "fused":
        log.warning("%s: torch.compile 엔진으로 대체합니다", reason)
    return "compile"


def build_forward(engine: Engine, model: nn.Module, tail_compile: TailCompile = "never"):
    """The callable that runs whole frames through `model` with the given engine."""
    if engine == "compile":
        # torch.compile fuses the element-wise work between the convolutions; symbolic sizes, so
        # that one compilation serves every frame size.
        return torch.compile(model, dynamic=True)
    if engine == "fused":
        from echoshot_ai_server.engine.fused_trunk import FusedRRDBNet

        return FusedRRDBNet(model, compile_head_tail=tail_compile == "start")
    return model


def budget_with_graphs(budget: int | None, wanted: bool) -> tuple[bool, int | None]:
    """Whether small batches run as CUDA graphs, and the memory left for the plan of every batch:
    the graphs' shared pool (up to GRAPH_MAX_PIXELS pixels' worth) is kept aside; a budget under
    four times that has no room for graphs."""
    reserve = GRAPH_MAX_PIXELS * BYTES_PER_INPUT_PIXEL
    if not wanted or (budget is not None and budget < 4 * reserve):
        return False, budget
    return True, None if budget is None else budget - reserve


class Upscaler:
    """A loaded Real-ESRGAN model and the way it is run (device, precision, tiles).

    On the GPU the whole job of a batch stays on the device: uint8 frames go up, the model runs in
    fp16 with channels-last memory, and clamping, rounding, the x2 resize and the colour order are
    done there too, so that only the final uint8 frames come back.
    """

    def __init__(self, model: nn.Module, *, device: Device, profile: RunProfile, model_scale: int = 4):
        self.device = device
        self.profile = profile
        self.torch_device = torch.device("cuda" if device == "gpu" else "cpu")
        self.half = profile.half and device == "gpu"
        self.dtype = torch.float16 if self.half else torch.bfloat16 if profile.bf16 and device == "cpu" else torch.float32
        on_gpu = device == "gpu"
        channels_last = on_gpu if profile.channels_last is None else profile.channels_last
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        # On the CPU the x2 resize is OpenCV's own, to the bit; on the GPU the same filter in float.
        self.resize_on_device = on_gpu if profile.resize_on_device is None else profile.resize_on_device
        # On the GPU the encoder's colour conversion too: half the bytes back to the host and to ffmpeg.
        self.yuv_on_device = on_gpu if profile.yuv_on_device is None else profile.yuv_on_device
        self.model = model.eval().to(self.torch_device, self.dtype, memory_format=self.memory_format)
        self.engine = resolve_engine(profile.engine, self.model, self.torch_device)
        self.forward = build_forward(self.engine, self.model, profile.tail_compile)
        # Compiled and fused engines are tuned and compiled for the shapes they meet, once per size
        # class, not per frame size (symbolic sizes, tile shapes tuned per class); batches stay
        # padded to full size, so the batch dimension never changes.
        self.fixed_shapes = self.engine != "eager"
        self.batch_frames = profile.batch_frames
        self.model_scale = model_scale
        self.graphs = None
        graphs = self.engine == "fused" and on_gpu and profile.cuda_graphs and profile.tail_compile == "never"
        graphs, self.plan_budget = budget_with_graphs(profile.memory_budget_bytes, graphs)
        if graphs:
            from echoshot_ai_server.engine.fused_trunk import recording

            self.graphs = GraphedForward(lambda x: self.forward(x), bypass=recording)

    def warm_up(self, sizes=WARM_UP_SIZES, tuned: Path | None = None) -> float:
        """Tune and compile the engine before the first job: one full batch of each (width, height),
        sizes that meet every kernel in every size class (the fused engine's kernels compiled side by
        side before, from a dry pass that records their launches). `tuned`: a file that keeps the fused
        engine's tuned tile shapes between processes (read first, written after). Nothing to do for
        the plain PyTorch engine. Returns the seconds spent. With GPU_TAIL_COMPILE=background, RRDBNet's
        tail is compiled afterwards (`compile_tail`)."""
        if self.engine == "eager":
            return 0.0
        started = time.monotonic()
        if self.engine == "fused":
            from echoshot_ai_server.engine.fused_trunk import load_tuned, measured_defaults

            # The shapes measured on this GPU architecture that ship with the package, replaced by
            # those tuned here before (this GPU, driver and versions, this kernel); the autotuner tunes
            # the rest now.
            if self.torch_device.type == "cuda" and (count := load_tuned(measured_defaults(), any_kernel=True)):
                log.info("tile shapes measured for this GPU architecture: %d", count)
            if tuned is not None and (count := load_tuned(tuned)):
                log.info("tile shapes tuned earlier on this GPU: %d", count)
        rng = np.random.default_rng(0)
        batches = [rng.integers(0, 256, (self.batch_frames, h, w, 3), dtype=np.uint8) for w, h in sizes]
        if self.engine == "fused" and self.torch_device.type == "cuda":
            self._compile_side_by_side(batches)
        for batch in batches:
            self.upscale(batch, self.model_scale)
        if self.torch_device.type == "cuda":
            torch.cuda.synchronize()
        if self.engine == "fused" and tuned is not None:
            from echoshot_ai_server.engine.fused_trunk import save_tuned

            save_tuned(tuned)
        return time.monotonic() - started

    def _compile_side_by_side(self, batches: list[np.ndarray]) -> None:
        """Compile the fused engine's kernels on threads before anything runs: a dry pass over
        `batches` records their launches (with a prepared kernel cache they load from it either
        way). Only a shortcut: if it fails, the warm-up's batches compile them one by one."""
        from echoshot_ai_server.engine.fused_trunk import compile_launches, launches_recorded

        started = time.monotonic()
        try:
            with launches_recorded() as launches:
                for batch in batches:
                    self.upscale(batch, self.model_scale)
            compiled = compile_launches(launches, workers=os.cpu_count() or 1)
        except Exception:
            log.warning("compiling the fused kernels side by side failed; the warm-up compiles them one by one",
                        exc_info=True)
            return
        log.info("fused kernels compiled side by side: %d in %.1fs", compiled, time.monotonic() - started)

    def compile_tail(self, sizes=WARM_UP_SIZES) -> threading.Thread | None:
        """The fused engine only: compile the model's tail for these sizes' classes on a thread of
        its own; it serves once compiled, the eager tail until then (start it once the warm-up and
        the speed measurement are done: it takes the CPU while it runs). Returns the thread."""
        if self.engine != "fused" or self.profile.tail_compile != "background":
            return None
        return self.forward.compile_tail_in_background(self.batch_frames, sizes)

    def work_pixels(self, height: int, width: int) -> int:
        """Pixels the model takes in per frame of this size: the frame's, or its padded tiles'."""
        height, width = height + self.profile.pre_pad, width + self.profile.pre_pad
        if self.profile.tile <= 0:
            return height * width
        return sum((w.in_y1 - w.in_y0) * (w.in_x1 - w.in_x0)
                   for w in tile_windows(height, width, self.profile.tile, self.profile.tile_pad, self.model_scale))

    def measure_speed(self, size: tuple[int, int] | None = None) -> float:
        """The model's speed on this device in pixels taken in per second: a full batch of frames of
        `size` (width, height) timed, after an untimed one on the GPU. Default sizes: 640x480 on the
        GPU, 64x48 on the CPU (a second's work there)."""
        on_gpu = self.torch_device.type == "cuda"
        width, height = size or ((640, 480) if on_gpu else (64, 48))
        frames = np.random.default_rng(0).integers(0, 256, (self.batch_frames, height, width, 3), dtype=np.uint8)
        if on_gpu:
            self.upscale(frames, self.model_scale)
            torch.cuda.synchronize()
        started = time.perf_counter()
        self.upscale(frames, self.model_scale)
        if on_gpu:
            torch.cuda.synchronize()
        return len(frames) * self.work_pixels(height, width) / (time.perf_counter() - started)

    def describe(self) -> str:
        tile = self.profile.tile if self.profile.tile > 0 else "auto"
        bf16 = ", bfloat16" if self.dtype == torch.bfloat16 else ""
        return f"Device: {self.device.upper()}, Tile: {tile}, Half Precision: {self.half}{bf16}"

    @torch.inference_mode()
    def upscale(self, frames: np.ndarray, outscale: int, yuv_matrix: str | None = None) -> np.ndarray:
        """Upscale a batch of frames.

        frames: uint8 (or, from sources deeper than 8 bits, uint16) array (N, H, W, 3), BGR, on the host.
        outscale: 2 or 4.
        yuv_matrix: a colour matrix (`colour.LUMA_WEIGHTS`) to return uint8 frames as YUV 4:2:0 planes
        (N, H * outscale * 3 / 2, W * outscale), limited range; 8-bit frames only.
        Returns the same dtype, (N, H * outscale, W * outscale, 3), BGR, on the host (or the planes).
        If the device runs out of memory, the batch is run again with the fallback tile size;
        DeviceOutOfMemory if that fails too. ValueError for frames or a scale it cannot take.
        """
        if frames.ndim != 4 or frames.shape[3] != 3 or frames.dtype not in (np.uint8, np.uint16):
            raise ValueError(f"expected uint8 or uint16 frames of shape (N, H, W, 3), got {frames.dtype} {frames.shape}")
        deep = frames.dtype == np.uint16  # torch has no arithmetic on uint16: carried as int32
        if yuv_matrix is not None and (deep or (outscale != self.model_scale and not self.resize_on_device)):
            raise ValueError("YUV output needs 8-bit frames and the resize on the device")
        tensor = torch.from_numpy(frames.astype(np.int32) if deep else frames).to(self.torch_device)
        out = self.upscale_tensor(tensor, outscale, max_value=65535 if deep else 255, yuv_matrix=yuv_matrix)
        if self.torch_device.type == "cuda" and not deep:
            host = torch.empty(out.shape, dtype=torch.uint8, pin_memory=True)
            host.copy_(out)
            out = host
        out = out.cpu().numpy().astype(frames.dtype, copy=False)
        if outscale != self.model_scale and not self.resize_on_device:
            height, width = frames.shape[1] * outscale, frames.shape[2] * outscale
            out = np.stack([cv2.resize(f, (width, height), interpolation=cv2.INTER_LANCZOS4) for f in out])
        return out

    @torch.inference_mode()
    def upscale_tensor(self, frames: torch.Tensor, outscale: int, max_value: int = 255,
                       yuv_matrix: str | None = None) -> torch.Tensor:
        """The engine on device-resident frames: (N, H, W, 3) BGR integers up to `max_value` (uint8
        for 255) in, the same out (uint8 for 255, else int32), or with `yuv_matrix` uint8 YUV 4:2:0
        planes (N, H' * 3 / 2, W').

        The output is at `outscale` when the resize runs on the device, else at the model's scale.
        """
        if (problem := scale_problem(outscale)) is not None:
            raise ValueError(problem)
        per_pass, tile = len(frames), self.profile.tile
        if tile <= 0:
            per_pass, tile = plan_forward(self.batch_frames, frames.shape[1], frames.shape[2],
                                          tile_pad=self.profile.tile_pad, budget_bytes=self.plan_budget)
        try:
            out = self._run_passes(frames, tile, per_pass, max_value)
        except Exception as exc:
            if not is_out_of_memory(exc):
                raise
            out = self._retry_with_fallback_tile(frames, tile, exc, max_value)
        return self._to_frames(out, outscale, max_value, yuv_matrix)

    def _run_passes(self, frames: torch.Tensor, tile: int, per_pass: int, max_value: int) -> torch.Tensor:
        outputs = []
        for start in range(0, len(frames), per_pass):
            chunk = frames[start:start + per_pass]
            count = len(chunk)
            if self.fixed_shapes and tile == 0 and count < per_pass:
                # keep the compiled shape: pad with copies of the last frame, drop their outputs
                chunk = torch.cat([chunk, chunk[-1:].expand(per_pass - count, *chunk.shape[1:])])
            outputs.append(self._run_model(chunk, tile, max_value)[:count])
        return outputs[0] if len(outputs) == 1 else torch.cat(outputs)

    def _retry_with_fallback_tile(self, frames: torch.Tensor, tile: int, error: BaseException,
                                  max_value: int) -> torch.Tensor:
        fallback = self.profile.fallback_tile
        if 0 < fallback and (tile == 0 or fallback < tile):
            log.warning(
                "메모리 부족 - 타일 %s → %d로 줄여 다시 처리합니다 (%s)",
                tile or "전체 프레임", fallback, str(error).splitlines()[0],
            )
            if self.torch_device.type == "cuda":
                torch.cuda.empty_cache()
            try:
                return self._run_passes(frames, fallback, 1, max_value)
            except Exception as exc:
                if not is_out_of_memory(exc):
                    raise
                error = exc
        raise DeviceOutOfMemory(f"out of memory even with tile {fallback}: {error}") from error

    def _run_model(self, frames: torch.Tensor, tile: int, max_value: int) -> torch.Tensor:
        """NHWC BGR integers -> the model's output, (N, 3, H * scale, W * scale) RGB in its dtype."""
        scale, pre_pad = self.model_scale, self.profile.pre_pad
        # -> NCHW RGB in [0, 1], rounded to the model's dtype as RealESRGANer does.
        x = frames.permute(0, 3, 1, 2).flip(1).float().div_(float(max_value)).to(self.dtype)
        x = x.contiguous(memory_format=self.memory_format)
        if pre_pad:
            x = F.pad(x, (0, pre_pad, 0, pre_pad), mode="reflect")
        n, c, h, w = x.shape
        windows = tile_windows(h, w, tile, self.profile.tile_pad, scale)
        if len(windows) == 1:
            # the engine runs whole frames (small batches as CUDA graphs); tiles (edge tiles vary in shape) run eagerly
            out = self.graphs(x) if self.graphs is not None else self.forward(x)
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

    def _to_frames(self, out: torch.Tensor, outscale: int, max_value: int,
                   yuv_matrix: str | None = None) -> torch.Tensor:
        """Model output -> NHWC BGR integers, as RealESRGANer rounds it (then resized, when on the
        device), or those levels as YUV 4:2:0 planes."""
        if outscale != self.model_scale and self.resize_on_device:
            assert outscale * 2 == self.model_scale, "only x2 from the x4 model"
            out = half_levels(out, max_value)
        else:
            out = levels(out, max_value)
        if yuv_matrix is not None:
            return rgb_to_i420(out, yuv_matrix)
        out = out.to(torch.uint8 if max_value == 255 else torch.int32)
        return out.flip(1).permute(0, 2, 3, 1).contiguous()


def load_upscalers(weights_dir: Path, spec: ModelSpec, device: Device, profile: RunProfile, *, count: int = 1,
                   memory_limit_gb: float = 0) -> list[Upscaler]:
    """`count` upscalers (one per worker slot) of the model `spec`, its weights read once from `weights_dir`.

    On the GPU the memory below `memory_limit_gb` (0: the whole card) is shared out between them.
    Raises FileNotFoundError (no weights file) or ValueError (an unknown file, or weights that do not
    fit the model)."""
    path = weights_dir / spec.weights_file
    check_digest(path, spec.sha256)
    state_dict = read_state_dict(path)
    if device == "gpu":
        # cuDNN's heuristics, not its benchmark: timing its algorithms for every new frame size cost
        # up to 3 s on the first batch of a 1080p video, for no gain in speed (measured, BENCHMARKS.md).
        torch.backends.cudnn.benchmark = False
        budget = gpu_memory_budget(memory_limit_gb) // count
        profile = RunProfile(**{**profile.__dict__, "memory_budget_bytes": budget})
    upscalers = [
        Upscaler(load_model(path, spec.arch, state_dict), device=device, profile=profile, model_scale=spec.scale)
        for _ in range(count)
    ]
    if device == "gpu":
        log.info("GPU engine for %s: %s (requested: %s)", spec.name, upscalers[0].engine, profile.engine)
    return upscalers
