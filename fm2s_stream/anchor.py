"""Photometric anchoring: the denoised frame keeps the raw frame's low spatial frequencies.

A denoiser should only remove noise. Networks that keep learning on every frame can shift the
frame's brightness by a few percent from one frame to the next (measured: +-5 % of the signal with
fine-tuning on a static field), and a median-like target biases dim regions. Adding back the
low-pass (Gaussian, `sigma` pixels) of raw - denoised makes every region larger than ~2 sigma carry
exactly the raw frame's mean, which is an unbiased estimate of the true one; the raw noise that
comes back with it is tiny (its standard deviation shrinks by ~1 / (2 sqrt(pi) sigma), 0.02x at 16).
For speed the low-pass runs on a block-averaged copy (blocks of sigma / 4, twice that above 1024x1024)
and is interpolated back. Torch tensors on
any device; numpy arrays (the offline path) go through the same code on the CPU.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from .ops import gaussian

__all__ = ["anchor", "low_pass"]

LARGE_FRAME = 1024 * 1024  # above this many pixels the low-pass runs on blocks twice as large (cost bounded)


def low_pass(image: torch.Tensor, sigma: float) -> torch.Tensor:
    """Gaussian low-pass of a 2D float tensor, computed at reduced resolution (same shape out)."""
    h, w = image.shape
    f = max(1, int(sigma // 4)) * (2 if h * w > LARGE_FRAME else 1)
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


def anchor(denoised: torch.Tensor | np.ndarray, raw: torch.Tensor | np.ndarray, sigma: float) -> torch.Tensor:
    """`denoised` (float camera units) with the low frequencies of `raw` (sigma <= 0: unchanged)."""
    out = torch.as_tensor(denoised).float()
    if sigma <= 0:
        return out
    return out + low_pass(torch.as_tensor(raw).float() - out, sigma)
