"""The models the engine runs, as data, and the scale rule. No torch here: the job contract and the
command line read these without loading PyTorch."""

from dataclasses import dataclass
from typing import Literal

Device = Literal["gpu", "cpu"]
# How whole frames run on the GPU: fused Triton trunk (Hopper and later), torch.compile, or plain PyTorch.
Engine = Literal["auto", "fused", "compile", "eager"]

# The scale rule, once: the x4 network's own scale, and 2 (its result resized with Lanczos, as
# RealESRGANer does for outscale=2).
SUPPORTED_SCALES = (2, 4)


def scale_problem(scale: object) -> str | None:
    """Why `scale` cannot be asked for, or None when it can."""
    return None if scale in SUPPORTED_SCALES else f"scale must be 2 or 4, got {scale}"


@dataclass(frozen=True)
class RRDBNetArch:
    """basicsr's RRDBNet hyper-parameters (3 colour channels in and out)."""

    num_feat: int = 64
    num_block: int = 23
    num_grow_ch: int = 32
    scale: int = 4


@dataclass(frozen=True)
class ModelSpec:
    """A model as data: its architecture, the file its weights are in, and where that file comes from."""

    name: str
    arch: RRDBNetArch
    weights_file: str
    url: str

    @property
    def scale(self) -> int:
        return self.arch.scale


X4PLUS = ModelSpec(
    "RealESRGAN_x4plus", RRDBNetArch(), "RealESRGAN_x4plus.pth",
    "https://github.com/xinntao/Real-ESRGAN/releases/download/v0.1.0/RealESRGAN_x4plus.pth",
)
