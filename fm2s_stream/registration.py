"""Global translation between two frames of one stage position, to a fraction of a pixel (torch, any device).

Convention everywhere: a shift (dy, dx) means cur[y, x] ~ ref[y - dy, x - dx] (the scene moved by
+dy, +dx). `register_shift` finds the integer shift by phase correlation; `refine_shift` picks the
best integer shift around it; `subpixel_shift` refines it to ~0.05 px with Lucas-Kanade steps on
half-resolution, blurred copies (65k equations for two unknowns at 512x512, so noise averages out).
Frames larger than WORK_SIDE are block-averaged down to it first (a 2048x2048 frame is registered
on 4x4 block means, still 65k equations at half of that), so the cost stays that of a 512x512 frame
and the precision ~0.05 px of the blocks.
Sub-pixel moves themselves are `ops.shift_fraction` (Lanczos-3).
"""

from __future__ import annotations

import numba
import numpy as np
import torch

from .ops import GAUSS1, gaussian, halve, host_kernels, overlap, separable, shift_fraction

__all__ = ["WORK_SIDE", "refine_shift", "register_shift", "subpixel_shift"]

WORK_SIDE = 512  # frames are block-averaged until their shorter side is at most this before registration


def register_shift(a: torch.Tensor, b: torch.Tensor) -> tuple[int, int]:
    """Integer (dy, dx) such that a[y, x] ~ b[y - dy, x - dx], by phase correlation."""
    fa, fb = torch.fft.rfft2(a - a.mean()), torch.fft.rfft2(b - b.mean())
    cross = fa * torch.conj(fb)
    cross = cross / (cross.abs() + 1e-12)
    corr = torch.fft.irfft2(cross, s=a.shape)
    h, w = a.shape
    k = int(torch.argmax(corr))
    dy, dx = k // w, k % w
    return (dy - h if dy > h // 2 else dy, dx - w if dx > w // 2 else dx)


def refine_shift(cur: torch.Tensor, prev: torch.Tensor, dy: int, dx: int, torch_only: bool = False) -> tuple[int, int]:
    """The best integer shift within +-1 pixel of (dy, dx), by the blurred frames' squared difference."""
    h, w = cur.shape
    a, b = gaussian(cur, 1.0, torch_only), gaussian(prev, 1.0, torch_only)
    best, best_err = (dy, dx), float("inf")
    for ey in (-1, 0, 1):
        for ex in (-1, 0, 1):
            (ya, xa), (yb, xb) = overlap(h, w, dy + ey, dx + ex)
            if a[ya, xa].numel() == 0:
                continue
            if host_kernels(a, torch_only):  # one fused pass instead of three (9 per call)
                err = _mean_squared_difference(a[ya, xa].numpy(), b[yb, xb].numpy())
            else:
                err = float(((a[ya, xa] - b[yb, xb]) ** 2).mean())
            if err < best_err:
                best, best_err = (dy + ey, dx + ex), err
    return best


@numba.njit(cache=True)
def _mean_squared_difference(a: np.ndarray, b: np.ndarray) -> float:  # pragma: no cover - compiled
    """mean((a - b)^2) of two equally shaped (possibly strided) windows: float32 rows, float64 total."""
    h, w = a.shape
    total = 0.0
    for i in range(h):
        row = np.float32(0.0)
        for j in range(w):
            d = a[i, j] - b[i, j]
            row += d * d
        total += row
    return total / (h * w)


def _gradient(a: torch.Tensor, dim: int) -> torch.Tensor:
    """Central differences inside, one-sided at the edges (numpy.gradient's rule)."""
    return torch.gradient(a, dim=dim)[0]


def _lucas_kanade(a: torch.Tensor, b: torch.Tensor, torch_only: bool = False) -> tuple[float, float] | None:
    """Robust least-squares (ey, ex) with a[y] ~ b[y - e] for small e; None if the frames have no texture.

    Residuals are Cauchy-weighted (scale from their median absolute deviation), so a region that
    changed (a cell lighting up) does not pull the global shift towards itself. On the CPU the two
    passes are fused numba kernels (`_lk_difference`, `_lk_sums`) instead of ~30 torch operations,
    each a pass over the frame (a 250x250 step: 1.23 -> 0.25 ms).
    """
    if host_kernels(a, torch_only):
        diff, grad_y, grad_x, energy = _lk_difference(a.contiguous().numpy(), b.contiguous().numpy())
        sample = diff[::2, ::2]
        offset = _median(sample)  # a change in part of the field must not offset the rest
        spread = _median(np.abs(sample - offset))
        texture = (energy / diff.size) ** 0.5
        scale = max(1.4826 * spread, 0.25 * texture) * 2.385 + 1e-12
        syy, syx, sxx, ry, rx = (float(v) for v in _lk_sums(grad_y, grad_x, diff, offset, scale))
        return _solve(syy, syx, sxx, ry, rx)
    gy = 0.5 * (_gradient(a, 0) + _gradient(b, 0))
    gx = 0.5 * (_gradient(a, 1) + _gradient(b, 1))
    d = a - b
    d = d - d[::2, ::2].median()  # a change in part of the field must not offset the rest
    # Cauchy scale: the residuals' spread, but never below what a 0.25-pixel misalignment leaves
    texture = float(torch.sqrt((gy * gy + gx * gx).mean()))
    scale = max(1.4826 * float(d[::2, ::2].abs().median()), 0.25 * texture) * 2.385 + 1e-12
    wgt = 1.0 / (1.0 + (d / scale) ** 2)
    wy, wx = wgt * gy, wgt * gx
    sums = torch.stack([(wy * gy).sum(), (wy * gx).sum(), (wx * gx).sum(), (wy * d).sum(), (wx * d).sum()])
    syy, syx, sxx, ry, rx = (float(v) for v in sums.double().cpu())  # one device-to-host copy per step
    return _solve(syy, syx, sxx, ry, rx)


def _solve(syy: float, syx: float, sxx: float, ry: float, rx: float) -> tuple[float, float] | None:
    """The 2x2 normal equations' solution; None if they are singular or badly conditioned (no texture)."""
    det = syy * sxx - syx * syx
    trace = syy + sxx
    if trace <= 0 or det <= 0:
        return None
    disc = max((trace / 2) ** 2 - det, 0.0) ** 0.5
    if (trace / 2 + disc) / max(trace / 2 - disc, 1e-30) > 1e4:  # condition number: no texture in one direction
        return None
    ey = (-ry * sxx + rx * syx) / det
    ex = (-rx * syy + ry * syx) / det
    return ey, ex


@numba.njit(cache=True)
def _lk_difference(a: np.ndarray,
                   b: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, float]:  # pragma: no cover - compiled
    """(a - b; the two frames' mean gradient along rows and along columns; the sum of its squared norm).

    Gradients as numpy.gradient takes them: central differences inside, one-sided at the edges.
    """
    h, w = a.shape
    d = np.empty((h, w), np.float32)
    gy = np.empty((h, w), np.float32)
    gx = np.empty((h, w), np.float32)
    for i in range(h):
        up, down = max(i - 1, 0), min(i + 1, h - 1)
        step_y = np.float32(0.25 if 0 < i < h - 1 else 0.5)  # half of 1 / (down - up), for the mean of a and b
        for j in range(w):
            gy[i, j] = step_y * ((a[down, j] + b[down, j]) - (a[up, j] + b[up, j]))
        for j in range(1, w - 1):
            gx[i, j] = np.float32(0.25) * ((a[i, j + 1] + b[i, j + 1]) - (a[i, j - 1] + b[i, j - 1]))
        gx[i, 0] = np.float32(0.5) * ((a[i, 1] + b[i, 1]) - (a[i, 0] + b[i, 0]))
        gx[i, w - 1] = np.float32(0.5) * ((a[i, w - 1] + b[i, w - 1]) - (a[i, w - 2] + b[i, w - 2]))
        for j in range(w):
            d[i, j] = a[i, j] - b[i, j]
    energy = 0.0
    for i in range(h):
        row = np.float32(0.0)
        for j in range(w):
            row += gy[i, j] * gy[i, j] + gx[i, j] * gx[i, j]
        energy += row
    return d, gy, gx, energy


@numba.njit(cache=True)
def _lk_sums(gy: np.ndarray, gx: np.ndarray, d: np.ndarray, offset: float,
             scale: float) -> np.ndarray:  # pragma: no cover - compiled
    """The Cauchy-weighted normal equations' five sums (yy, yx, xx, yd, xd): float32 rows, float64 total."""
    h, w = d.shape
    sums = np.zeros(5)
    off, inv = np.float32(offset), np.float32(1.0 / scale)
    for i in range(h):
        s0 = s1 = s2 = s3 = s4 = np.float32(0.0)
        for j in range(w):
            y, x = gy[i, j], gx[i, j]
            r = d[i, j] - off
            z = r * inv
            wgt = np.float32(1.0) / (np.float32(1.0) + z * z)
            s0 += wgt * y * y
            s1 += wgt * y * x
            s2 += wgt * x * x
            s3 += wgt * y * r
            s4 += wgt * x * r
        sums[0] += s0
        sums[1] += s1
        sums[2] += s2
        sums[3] += s3
        sums[4] += s4
    return sums


def _median(values: np.ndarray) -> float:
    """The lower median (torch.median's choice), by partition: ~3x faster than numpy.median on 16k values."""
    flat = values.ravel()
    k = (flat.size - 1) // 2
    return float(np.partition(flat, k)[k])


def subpixel_shift(cur: torch.Tensor, ref: torch.Tensor, max_shift: float = 64.0,
                   torch_only: bool = False) -> tuple[float, float] | None:
    """(dy, dx) with cur[y, x] ~ ref[y - dy, x - dx], to a fraction of a pixel; None if not found.

    Coarse: phase correlation at quarter resolution. Fine: up to five Lucas-Kanade steps at half
    resolution (sigma-1 blur there), robustly weighted, re-centring on the nearest integer shift
    after each step. Frames above WORK_SIDE are block-averaged to it first.
    """
    factor = 1
    while min(cur.shape) > WORK_SIDE:
        cur, ref, factor = halve(cur), halve(ref), factor * 2
    a2, b2 = halve(cur), halve(ref)
    h, w = a2.shape
    if min(h, w) < 16:
        return None
    a2, b2 = separable(a2, GAUSS1, GAUSS1), separable(b2, GAUSS1, GAUSS1)
    if min(h, w) >= 64:
        cy, cx = register_shift(halve(a2), halve(b2))
        n = [2 * cy, 2 * cx]
    else:
        n = [0, 0]
    e = [0.0, 0.0]
    margin = 3
    for it in range(5):
        if abs(n[0]) > h // 2 or abs(n[1]) > w // 2:
            return None
        (ya, xa), (yb, xb) = overlap(h, w, n[0], n[1])
        a, b = a2[ya, xa], b2[yb, xb]
        if e[0] or e[1]:
            b = shift_fraction(b, e[0], e[1])
        a, b = a[margin:-margin, margin:-margin], b[margin:-margin, margin:-margin]
        if min(a.shape) < 8:
            return None
        step = _lucas_kanade(a.contiguous(), b.contiguous(), torch_only)
        if step is None:
            return None
        e = [e[0] + step[0], e[1] + step[1]]
        whole = [round(e[0]), round(e[1])]
        if it > 0 and whole == [0, 0] and abs(step[0]) < 0.01 and abs(step[1]) < 0.01:
            break
        n = [n[0] + whole[0], n[1] + whole[1]]
        e = [e[0] - whole[0], e[1] - whole[1]]
    dy, dx = 2 * factor * (n[0] + e[0]), 2 * factor * (n[1] + e[1])
    if abs(dy) > max_shift or abs(dx) > max_shift:
        return None
    return float(dy), float(dx)
