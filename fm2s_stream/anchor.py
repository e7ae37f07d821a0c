"""Photometric anchoring: the denoised frame keeps the raw frame's low spatial frequencies.

A denoiser should only remove noise. Networks that keep learning on every frame can shift the
frame's brightness by a few percent from one frame to the next (measured: +-5 % of the signal with
fine-tuning on a static field), and a median-like target biases dim regions. Adding back the
low-pass (Gaussian, `sigma` pixels) of raw - denoised makes every region larger than ~2 sigma carry
exactly the raw frame's mean, which is an unbiased estimate of the true one; the raw noise that
comes back with it is tiny (its standard deviation shrinks by ~1 / (2 sqrt(pi) sigma), 0.02x at 16).
For speed the low-pass runs on a block-averaged copy and is interpolated back.
"""

from __future__ import annotations

import numpy as np
import torch
from scipy import ndimage

__all__ = ["anchor", "low_pass"]


def low_pass(image: np.ndarray, sigma: float) -> np.ndarray:
    """Gaussian low-pass of a 2D float image, computed at reduced resolution (same shape out)."""
    h, w = image.shape
    f = max(1, int(sigma // 4))
    if f == 1:
        return ndimage.gaussian_filter(image, sigma, mode="reflect")
    ph, pw = -h % f, -w % f
    padded = np.pad(image, ((0, ph), (0, pw)), mode="edge") if ph or pw else image
    small = padded.reshape(padded.shape[0] // f, f, padded.shape[1] // f, f).mean(axis=(1, 3))
    small = ndimage.gaussian_filter(small.astype(np.float32), sigma / f, mode="reflect")
    # bilinear with half-pixel centres: block i's mean sits at full-resolution (i + 0.5) f - 0.5
    up = torch.nn.functional.interpolate(torch.from_numpy(small)[None, None], scale_factor=f, mode="bilinear",
                                         align_corners=False)[0, 0, :h, :w]
    return up.numpy().astype(image.dtype, copy=False)


def anchor(denoised: np.ndarray, raw: np.ndarray, sigma: float) -> np.ndarray:
    """`denoised` (float camera units) with the low frequencies of `raw` (sigma <= 0: unchanged)."""
    if sigma <= 0:
        return denoised
    out = denoised.astype(np.float32, copy=False)
    return out + low_pass(raw.astype(np.float32) - out, sigma)
