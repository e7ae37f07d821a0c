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

import torch

from .ops import GAUSS1, gaussian, halve, overlap, separable, shift_fraction

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


def refine_shift(cur: torch.Tensor, prev: torch.Tensor, dy: int, dx: int) -> tuple[int, int]:
    """The best integer shift within +-1 pixel of (dy, dx), by the blurred frames' squared difference."""
    h, w = cur.shape
    a, b = gaussian(cur, 1.0), gaussian(prev, 1.0)
    best, best_err = (dy, dx), float("inf")
    for ey in (-1, 0, 1):
        for ex in (-1, 0, 1):
            (ya, xa), (yb, xb) = overlap(h, w, dy + ey, dx + ex)
            if a[ya, xa].numel() == 0:
                continue
            err = float(((a[ya, xa] - b[yb, xb]) ** 2).mean())
            if err < best_err:
                best, best_err = (dy + ey, dx + ex), err
    return best


def _gradient(a: torch.Tensor, dim: int) -> torch.Tensor:
    """Central differences inside, one-sided at the edges (numpy.gradient's rule)."""
    return torch.gradient(a, dim=dim)[0]


def _lucas_kanade(a: torch.Tensor, b: torch.Tensor) -> tuple[float, float] | None:
    """Robust least-squares (ey, ex) with a[y] ~ b[y - e] for small e; None if the frames have no texture.

    Residuals are Cauchy-weighted (scale from their median absolute deviation), so a region that
    changed (a cell lighting up) does not pull the global shift towards itself.
    """
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


def subpixel_shift(cur: torch.Tensor, ref: torch.Tensor, max_shift: float = 64.0) -> tuple[float, float] | None:
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
        step = _lucas_kanade(a.contiguous(), b.contiguous())
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
