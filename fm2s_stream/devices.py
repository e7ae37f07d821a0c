"""Explicit compute-device selection: CUDA only when asked for or when `auto` finds one."""

from __future__ import annotations

import torch

__all__ = ["fast_inference_dtype", "resolve_device"]


def resolve_device(device: str | torch.device | None = "auto") -> torch.device:
    """`auto`/None -> cuda:0 if available else cpu; anything else is validated and returned."""
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} requested but CUDA is not available on this machine")
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"unsupported device {device!r}: use cpu, cuda, cuda:N or auto")
    return dev


def fast_inference_dtype(device: torch.device) -> torch.dtype:
    """bfloat16 where the hardware runs it natively (CUDA, or x86 CPUs with AMX / AVX512-BF16), else float32.

    On such CPUs oneDNN runs the 3.5k network ~4x faster in bfloat16; elsewhere bfloat16 is emulated
    and slower than float32.
    """
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith("flags")), "")
    except OSError:
        return torch.float32
    return torch.bfloat16 if (" amx_bf16" in flags or " avx512_bf16" in flags) else torch.float32
