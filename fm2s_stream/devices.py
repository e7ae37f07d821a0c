"""Compute devices: explicit selection (CUDA only when asked for or when `auto` finds one), and the
frame's two crossings between host and device (`upload`, `download`)."""

from __future__ import annotations

import ctypes

import numpy as np
import torch

from .ops import rounded

__all__ = ["download", "fast_inference_dtype", "keep_host_memory", "resolve_device", "upload"]

MMAP_THRESHOLDS = (256 << 20, 32 << 20)  # blocks below this come from the heap (the first glibc accepts)
TRIM_THRESHOLD = 1 << 30  # free heap kept before memory is returned to the system
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters (malloc.h)


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


def keep_host_memory() -> bool:
    """Keep freed frame-sized blocks in the process (glibc on Linux); False where not applicable.

    By default glibc serves every block above a few MB with a fresh mmap and unmaps it when freed, so
    each 2048x2048 float32 intermediate (16 MB) page-faults anew on every frame: measured, the
    post-processing of one 2048x2048 frame took 190 ms with that and 110 ms without. The cost is
    resident memory that stays at its peak (a few frames' worth), which a long-running stream has anyway.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
        if not any(libc.mallopt(M_MMAP_THRESHOLD, t) for t in MMAP_THRESHOLDS):
            return False
        return bool(libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))
    except (OSError, AttributeError):  # not glibc (macOS, Windows, musl)
        return False


def upload(pixels: np.ndarray, device: torch.device) -> torch.Tensor:
    """A uint8/uint16 camera frame as an integer (H, W) tensor on `device`: the frame's one trip there.

    On CUDA the bytes go through pinned host memory with a non-blocking copy (the integer frame, not
    its float32 version, crosses the bus: half or a quarter of the bytes); the float conversion runs
    on the device (`ops.float_and_affine`).
    """
    host = torch.from_numpy(np.ascontiguousarray(pixels))
    if device.type == "cuda":
        host = host.pin_memory().to(device, non_blocking=True)
    return host


def download(values: torch.Tensor, dtype: np.dtype) -> np.ndarray:
    """Float camera units on any device -> a numpy frame of `dtype` (rounded, clipped to its range only).

    Quantised on the device, so the result crosses back once, at its final size.
    """
    return rounded(values, torch.uint8 if dtype == np.uint8 else torch.uint16).cpu().numpy()
