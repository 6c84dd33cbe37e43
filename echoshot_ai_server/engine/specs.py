"""The models the engine runs, as data, and the scale rule. No torch here: the job contract and the
command line read these without loading PyTorch."""

from dataclasses import dataclass
from typing import Literal

Device = Literal["gpu", "cpu"]
# How whole frames run on the GPU: fused Triton trunk (Hopper and later), torch.compile, or plain PyTorch.
Engine = Literal["auto", "fused", "compile", "eager"]
# Whether RRDBNet's tail is compiled to replace the fused engine's Triton tail: on a thread after
# start-up (the Triton tail serves until then), before the worker is ready, or never (the Triton tail)
TailCompile = Literal["background", "start", "never"]

# The scale rule, once: the x4 network's own scale, and 2 (its result resized with Lanczos, as
# RealESRGANer does for outscale=2).
SUPPORTED_SCALES = (2, 4)


def scale_problem(scale: object) -> str | None:
    """Why `scale` cannot be asked for, or None when it can."""
    return None if scale in SUPPORTED_SCALES else f"scale must be 2 or 4, got {scale}"


@dataclass(frozen=True)
class RRDBNetArch:
    """RRDBNet's hyper-parameters (3 colour channels in and out)."""

    num_feat: int = 64
    num_block: int = 23
    num_grow_ch: int = 32
    scale: int = 4


@dataclass(frozen=True)
class SRVGGNetArch:
    """Real-ESRGAN's SRVGGNetCompact hyper-parameters (3 colour channels in and out)."""

    num_feat: int = 64
    num_conv: int = 16
    scale: int = 4
    act_type: str = "prelu"


@dataclass(frozen=True)
class ModelSpec:
    """A model as data: its architecture, the file its weights are in, where that file comes from,
    the files known to hold its weights (sha256), and its cost in MFLOP per input pixel (counted over
    its convolutions, 2 FLOP per multiply-add)."""

    name: str
    arch: RRDBNetArch | SRVGGNetArch
    weights_file: str
    url: str
    sha256: tuple[str, ...]  # the official release's file, then its half-precision copy
    mflop_per_pixel: float

    @property
    def scale(self) -> int:
        return self.arch.scale


X4PLUS = ModelSpec(
    "RealESRGAN_x4plus", RRDBNetArch(), "RealESRGAN_x4plus.pth",
    "https://github.com/xinntao/Real-ESRGAN/releases/download/v0.1.0/RealESRGAN_x4plus.pth",
    ("4fa0d38905f75ac06eb49a7951b426670021be3018265fd191d2125df9d682f1",
     "d7b343dc8e2abb63f87d1b46928bd68fdf2f8504dab9725d17292e43fae716d0"),
    35.85,
)
ANIME_VIDEO_V3 = ModelSpec(
    "realesr-animevideov3", SRVGGNetArch(), "realesr-animevideov3.pth",
    "https://github.com/xinntao/Real-ESRGAN/releases/download/v0.2.5.0/realesr-animevideov3.pth",
    ("3a5ca263a93b5c827d6e4a482b8857df6cc8a5c78a9a6065b5e72d4f60b0c7d6",
     "2ae99a3683ee21a0c79c6bc8d7dd69201121a5654f10e7eb0682ae7e2a30f013"),
    1.24,
)
X4PLUS_ANIME_6B = ModelSpec(
    "RealESRGAN_x4plus_anime_6B", RRDBNetArch(num_block=6), "RealESRGAN_x4plus_anime_6B.pth",
    "https://github.com/xinntao/Real-ESRGAN/releases/download/v0.2.2.4/RealESRGAN_x4plus_anime_6B.pth",
    ("f872d837d3c90ed2e05227bed711af5671a6fd1c9f7d7e91c911a61f155e99da",
     "3d274ffe46bbaf1818cc6e373ec5138d3a0b801b27448e57e0e8bef56907912d"),
    11.41,
)
MODELS = {spec.name: spec for spec in (X4PLUS, ANIME_VIDEO_V3, X4PLUS_ANIME_6B)}
DEFAULT_MODEL = X4PLUS.name


def model_problem(name: object) -> str | None:
    """Why the model `name` cannot be asked for, or None when it can."""
    return None if name in MODELS else f"model must be one of {', '.join(MODELS)}, got {name!r}"
