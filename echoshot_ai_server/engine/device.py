"""Facts about the device: which one runs, its memory, running out of it."""

import torch

from echoshot_ai_server.engine.specs import Device

# CUDA context, cuDNN workspaces and the weights live outside the memory plan.
GPU_MEMORY_RESERVE_BYTES = 3 * 2**30 // 2


class DeviceOutOfMemory(RuntimeError):
    """The device ran out of memory even with the fallback tile size."""


def resolve_device(requested: Device) -> Device:
    """The device that will really be used: the GPU only when CUDA is there."""
    return "cpu" if requested == "gpu" and not torch.cuda.is_available() else requested


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
