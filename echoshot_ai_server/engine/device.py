"""Facts about the device: which one runs, its memory, running out of it, where its kernels are cached."""

import ctypes
import os
import re
from pathlib import Path

import torch

from echoshot_ai_server.engine.specs import Device

# CUDA context, cuDNN workspaces and the weights live outside the memory plan.
GPU_MEMORY_RESERVE_BYTES = 3 * 2**30 // 2


class DeviceOutOfMemory(RuntimeError):
    """The device ran out of memory even with the fallback tile size."""


def use_only_gpu(index: int) -> None:
    """Make the host's GPU `index` the only one this process sees (as its first), for one worker per
    GPU. CUDA reads the choice once, when it starts: this must come before anything touches it."""
    if torch.cuda.is_initialized():
        raise RuntimeError("CUDA started before the GPU was chosen")
    os.environ["CUDA_VISIBLE_DEVICES"] = str(index)


def resolve_device(requested: Device) -> Device:
    """The device that will really be used: the GPU only when CUDA is there."""
    return "cpu" if requested == "gpu" and not torch.cuda.is_available() else requested


def cpu_multiplies_bf16(cpuinfo: Path = Path("/proc/cpuinfo")) -> bool:
    """Whether this CPU multiplies bfloat16 in hardware (AVX-512 BF16 or AMX): there bf16 convolutions
    run at about twice the fp32 rate; elsewhere they are emulated, and slower than fp32."""
    try:
        flags = cpuinfo.read_text()
    except OSError:
        return False
    return any(flag in flags.split() for flag in ("avx512_bf16", "amx_bf16"))


def is_out_of_memory(exc: BaseException) -> bool:
    if isinstance(exc, (torch.OutOfMemoryError, MemoryError)):
        return True
    message = str(exc).lower()
    return isinstance(exc, RuntimeError) and ("out of memory" in message or "can't allocate memory" in message)


def gpu_memory_budget(limit_gb: float) -> int:
    """Bytes the engine may plan with on the GPU; a non-zero limit is also enforced on the allocator."""
    total = torch.cuda.get_device_properties(0).total_memory
    limit = min(total, int(limit_gb * 2**30)) if limit_gb > 0 else total
    if limit < total:
        torch.cuda.set_per_process_memory_fraction(limit / total)
    return max(limit - GPU_MEMORY_RESERVE_BYTES, limit // 2)


def gpu_name() -> str:
    return torch.cuda.get_device_properties(0).name


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
        info["gpu_name"] = gpu_name()
        info["gpu_memory_gb"] = torch.cuda.get_device_properties(0).total_memory / 1024**3
    return info


def kernel_cache_key() -> str:
    """Names the hardware and software a tuned, compiled kernel is valid for: the GPU, its driver's
    CUDA version, PyTorch and Triton. Kernels cached under another key are never loaded here."""
    import triton

    props = torch.cuda.get_device_properties(0)
    parts = [props.name, f"sm{props.major}{props.minor}", f"driver-cuda{_driver_cuda_version()}",
             f"torch{torch.__version__}", f"triton{triton.__version__}"]
    return re.sub(r"[^A-Za-z0-9.+-]+", "_", "_".join(parts))


def _driver_cuda_version() -> str:
    try:
        version = ctypes.c_int()
        ctypes.CDLL("libcuda.so.1").cuDriverGetVersion(ctypes.byref(version))
        return f"{version.value // 1000}.{version.value % 1000 // 10}"
    except OSError:
        return "unknown"


def kernel_cache_folder(root: Path) -> Path:
    return root / kernel_cache_key()


def use_kernel_cache(root: Path) -> Path:
    """Keep Triton's tuned kernels and torch.compile's graphs under `root`, in a folder of this
    machine's kernel_cache_key (for a worker, before the engine compiles anything). Returns it."""
    folder = kernel_cache_folder(root)
    for name, sub in (("TRITON_CACHE_DIR", "triton"), ("TORCHINDUCTOR_CACHE_DIR", "inductor")):
        (folder / sub).mkdir(parents=True, exist_ok=True)
        os.environ[name] = str(folder / sub)  # both libraries take their cache folders from these
    return folder
