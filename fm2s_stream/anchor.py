"""Photometric anchoring: the denoised frame keeps the raw frame's low spatial frequencies.

A denoiser should only remove noise. Networks that keep learning on every frame can shift the
frame's brightness by a few percent from one frame to the next (measured: +-5 % of the signal with
fine-tuning on a static field), and a median-like target biases dim regions. Adding back the
low-pass (Gaussian, `sigma` pixels) of raw - denoised makes every region larger than ~2 sigma carry
exactly the raw frame's mean, which is an unbiased estimate of the true one; the raw noise that
comes back with it is tiny (its standard deviation shrinks by ~1 / (2 sqrt(pi) sigma), 0.02x at 16).
For speed the low-pass runs on a block-averaged copy (blocks of sigma / 4, twice that from 1024x1024 on)
and is interpolated back. Torch tensors on
any device; numpy arrays (the offline path) go through the same code on the CPU.
"""

from __future__ import annotations

import numba
import numpy as np
import torch
import torch.nn.functional as F

from .ops import gaussian, host_kernels, to_host

__all__ = ["anchor", "low_pass"]

LARGE_FRAME = 1024 * 1024  # from this many pixels on the low-pass runs on blocks twice as large (cost bounded)


def _block(shape: tuple[int, int] | torch.Size, sigma: float) -> int:
    """Side of the blocks the low-pass is computed on (1: full resolution)."""
    return max(1, int(sigma // 4)) * (2 if shape[0] * shape[1] >= LARGE_FRAME else 1)


def low_pass(image: torch.Tensor, sigma: float) -> torch.Tensor:
    """Gaussian low-pass of a 2D float tensor, computed at reduced resolution (same shape out)."""
    h, w = image.shape
    f = _block(image.shape, sigma)
    if f == 1:
        return gaussian(image, sigma)
    x = image.float()[None, None]
    ph, pw = -h % f, -w % f
    if ph or pw:
        x = F.pad(x, (0, pw, 0, ph), mode="replicate")
    small = gaussian(F.avg_pool2d(x, f)[0, 0].contiguous(), sigma / f)
    # bilinear with half-pixel centres: block i's mean sits at full-resolution (i + 0.5) f - 0.5
    up = F.interpolate(small[None, None], scale_factor=f, mode="bilinear", align_corners=False)
    return up[0, 0, :h, :w]


def anchor(denoised: torch.Tensor | np.ndarray, raw: torch.Tensor | np.ndarray, sigma: float,
           torch_only: bool = False) -> torch.Tensor:
    """`denoised` (float camera units) with the low frequencies of `raw` (sigma <= 0: unchanged).

    On the CPU the block means of the difference and the interpolation back are two fused passes
    (`torch_only` True: the torch operations there too, which tests compare with them).
    """
    out = torch.as_tensor(denoised).float()
    if sigma <= 0:
        return out
    diff_source = torch.as_tensor(raw).float()
    f = _block(out.shape, sigma)
    if f == 1 or not host_kernels(out, torch_only):
        return out + low_pass(diff_source - out, sigma)
    small = _block_means_of_difference(to_host(diff_source), to_host(out), f)
    smooth = to_host(gaussian(torch.from_numpy(small), sigma / f))
    return torch.from_numpy(_plus_upsampled(to_host(out), smooth, f))


@numba.njit(parallel=True, cache=True)
def _block_means_of_difference(raw: np.ndarray, out: np.ndarray, f: int) -> np.ndarray:  # pragma: no cover
    """Means of raw - out over f x f blocks, edge blocks completed by repeating the last row/column.

    Each block row's f image rows are summed into one row first (a vectorised pass), then reduced by f.
    """
    h, w = raw.shape
    bh, bw = -(-h // f), -(-w // f)
    small = np.empty((bh, bw), np.float32)
    for bi in numba.prange(bh):
        acc = np.zeros(bw * f, np.float32)
        for k in range(f):
            i = min(bi * f + k, h - 1)
            for j in range(w):
                acc[j] += raw[i, j] - out[i, j]
            for j in range(w, bw * f):
                acc[j] += raw[i, w - 1] - out[i, w - 1]
        for bj in range(bw):
            total = np.float32(0.0)
            for k in range(f):
                total += acc[bj * f + k]
            small[bi, bj] = total / (f * f)
    return small


@numba.njit(parallel=True, cache=True)
def _plus_upsampled(out: np.ndarray, small: np.ndarray, f: int) -> np.ndarray:  # pragma: no cover - compiled
    """out + bilinear upsampling of `small` by f (half-pixel centres, torch's align_corners=False).

    Rows of `small` are interpolated to full width first (a quarter of the work at f = 4); the full
    frame is then one vectorised pass of vertical interpolation plus the addition.
    """
    h, w = out.shape
    bh, bw = small.shape
    scale = np.float32(1.0 / f)
    x0 = np.empty(w, np.int64)
    x1 = np.empty(w, np.int64)
    lx = np.empty(w, np.float32)
    for j in range(w):
        src = max((j + np.float32(0.5)) * scale - np.float32(0.5), np.float32(0.0))
        x0[j] = min(int(src), bw - 1)
        x1[j] = min(x0[j] + 1, bw - 1)
        lx[j] = src - x0[j]
    wide = np.empty((bh, w), np.float32)
    for bi in numba.prange(bh):
        for j in range(w):
            wide[bi, j] = small[bi, x0[j]] + lx[j] * (small[bi, x1[j]] - small[bi, x0[j]])
    result = np.empty((h, w), np.float32)
    for i in numba.prange(h):
        src = max((i + np.float32(0.5)) * scale - np.float32(0.5), np.float32(0.0))
        y0 = min(int(src), bh - 1)
        y1 = min(y0 + 1, bh - 1)
        ly = src - y0
        for j in range(w):
            result[i, j] = out[i, j] + wide[y0, j] + ly * (wide[y1, j] - wide[y0, j])
    return result
