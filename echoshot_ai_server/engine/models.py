"""Building the networks (RRDBNet, Real-ESRGAN's SRVGGNetCompact: engine/archs.py) and loading their
weights strictly from a local file whose digest is known."""

import hashlib
import sys
from pathlib import Path

import torch
from torch import nn

from echoshot_ai_server.engine.archs import RRDBNet, SRVGGNetCompact
from echoshot_ai_server.engine.specs import RRDBNetArch, SRVGGNetArch


def build_model(arch: RRDBNetArch | SRVGGNetArch) -> nn.Module:
    """The network of this shape with random weights."""
    return _network(arch, RRDBNet, SRVGGNetCompact)


def reference_model(arch: RRDBNetArch | SRVGGNetArch) -> nn.Module:
    """basicsr's RRDBNet or realesrgan's SRVGGNetCompact of this shape, random weights: the guide's
    design and the references that tests and benchmarks compare with (the worker never imports
    them). realesrgan is importable afterwards: basicsr 1.4.2 imports a torchvision module that was
    removed in torchvision 0.17, which this puts back."""
    try:
        import torchvision.transforms.functional_tensor  # noqa: F401
    except ImportError:
        import torchvision.transforms.functional as functional

        sys.modules["torchvision.transforms.functional_tensor"] = functional
    from basicsr.archs.rrdbnet_arch import RRDBNet as ReferenceRRDBNet
    from realesrgan.archs.srvgg_arch import SRVGGNetCompact as ReferenceSRVGGNetCompact

    return _network(arch, ReferenceRRDBNet, ReferenceSRVGGNetCompact)


def _network(arch: RRDBNetArch | SRVGGNetArch, rrdbnet: type[nn.Module], srvgg: type[nn.Module]) -> nn.Module:
    # ours and the references take the same arguments
    if isinstance(arch, SRVGGNetArch):
        return srvgg(num_in_ch=3, num_out_ch=3, num_feat=arch.num_feat, num_conv=arch.num_conv,
                     upscale=arch.scale, act_type=arch.act_type)
    return rrdbnet(num_in_ch=3, num_out_ch=3, num_feat=arch.num_feat, num_block=arch.num_block,
                   num_grow_ch=arch.num_grow_ch, scale=arch.scale)


def check_digest(path: Path, known: tuple[str, ...]) -> None:
    """The file is one of the known files of its model (a checkpoint is a pickle: an unknown one is
    never loaded). Raises FileNotFoundError when there is no file, ValueError when it is unknown."""
    if not path.is_file():
        raise FileNotFoundError(f"model weights not found: {path}")
    digest = hashlib.sha256()
    with path.open("rb") as file:
        while chunk := file.read(1 << 20):
            digest.update(chunk)
    if digest.hexdigest() not in known:
        raise ValueError(f"{path} is not a known file of this model: sha256 {digest.hexdigest()}, "
                         f"expected {' or '.join(known)}")


def read_state_dict(path: Path) -> dict:
    """A checkpoint saved as {'params_ema': ...}, {'params': ...} or a bare state dict.

    Raises FileNotFoundError when there is no file, ValueError when it holds no usable state dict."""
    if not path.is_file():
        raise FileNotFoundError(f"model weights not found: {path}")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ValueError(f"cannot read model weights {path}: {exc}") from exc
    if not isinstance(checkpoint, dict):
        raise ValueError(f"{path} does not hold a state dict")
    for key in ("params_ema", "params"):
        if key in checkpoint:
            return checkpoint[key]
    return checkpoint


def load_model(path: Path, arch: RRDBNetArch | SRVGGNetArch, state_dict: dict | None = None) -> nn.Module:
    """The network with the weights of `path` (or of `state_dict`, read from it before), loaded strictly.

    Raises FileNotFoundError / ValueError as `read_state_dict`, ValueError when the weights do not fit."""
    model = build_model(arch)
    try:
        model.load_state_dict(read_state_dict(path) if state_dict is None else state_dict, strict=True)
    except RuntimeError as exc:
        raise ValueError(f"{path} does not match {arch}: {str(exc).splitlines()[0]}") from exc
    return model
