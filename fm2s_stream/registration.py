"""Global translation between two frames of one stage position, to a fraction of a pixel.

Convention everywhere: a shift (dy, dx) means cur[y, x] ~ ref[y - dy, x - dx] (the scene moved by
+dy, +dx). `register_shift` finds the integer shift by phase correlation; `refine_shift` picks the
best integer shift around it; `subpixel_shift` refines it to ~0.05 px with Lucas-Kanade steps on
half-resolution, blurred copies (65k equations for two unknowns at 512x512, so noise averages out).
`shift_fraction` moves an image by less than a pixel with a separable Lanczos-3 kernel: sharp
(half the error of bilinear interpolation on PSF-limited detail) and cheap (two 7-tap passes).
"""

from __future__ import annotations

import numba
import numpy as np
from scipy import ndimage

__all__ = ["halve", "overlap", "refine_shift", "register_shift", "separable_filter", "shift_fraction",
           "subpixel_shift"]


def halve(a: np.ndarray) -> np.ndarray:
    """2x2 block mean (odd last row/column dropped), float32."""
    h, w = a.shape[0] // 2 * 2, a.shape[1] // 2 * 2
    a = np.asarray(a, np.float32)
    return (a[0:h:2, 0:w:2] + a[1:h:2, 0:w:2] + a[0:h:2, 1:w:2] + a[1:h:2, 1:w:2]) * np.float32(0.25)


def register_shift(a: np.ndarray, b: np.ndarray) -> tuple[int, int]:
    """Integer (dy, dx) such that a[y, x] ~ b[y - dy, x - dx], by phase correlation."""
    fa, fb = np.fft.rfft2(a - a.mean()), np.fft.rfft2(b - b.mean())
    cross = fa * np.conj(fb)
    cross /= np.abs(cross) + 1e-12
    corr = np.fft.irfft2(cross, s=a.shape)
    dy, dx = np.unravel_index(int(np.argmax(corr)), corr.shape)
    h, w = a.shape
    return (int(dy) - h if dy > h // 2 else int(dy), int(dx) - w if dx > w // 2 else int(dx))


def overlap(h: int, w: int, dy: int, dx: int) -> tuple[tuple[slice, slice], tuple[slice, slice]]:
    """Index windows (in cur, in ref) where cur[y, x] ~ ref[y - dy, x - dx]."""
    cur = (slice(max(0, dy), h + min(0, dy)), slice(max(0, dx), w + min(0, dx)))
    ref = (slice(max(0, -dy), h + min(0, -dy)), slice(max(0, -dx), w + min(0, -dx)))
    return cur, ref


def refine_shift(cur: np.ndarray, prev: np.ndarray, dy: int, dx: int) -> tuple[int, int]:
    """The best integer shift within +-1 pixel of (dy, dx), by the blurred frames' squared difference."""
    h, w = cur.shape
    a, b = ndimage.gaussian_filter(cur, 1.0), ndimage.gaussian_filter(prev, 1.0)
    best, best_err = (dy, dx), np.inf
    for ey in (-1, 0, 1):
        for ex in (-1, 0, 1):
            (ya, xa), (yb, xb) = overlap(h, w, dy + ey, dx + ex)
            err = float(np.mean((a[ya, xa] - b[yb, xb]) ** 2)) if a[ya, xa].size else np.inf
            if err < best_err:
                best, best_err = (dy + ey, dx + ex), err
    return best


def _fraction_kernel(f: float) -> np.ndarray:
    """7 taps (offsets -3..3) that sample a line at i - f, for |f| <= 0.5: Lanczos-3, normalised."""
    offsets = np.arange(-3, 4, dtype=np.float64) + f
    k = np.sinc(offsets) * np.sinc(offsets / 3)
    k[np.abs(offsets) >= 3] = 0
    return (k / k.sum()).astype(np.float32)


@numba.njit(parallel=True, cache=True)
def _separable(img: np.ndarray, ky: np.ndarray, kx: np.ndarray) -> np.ndarray:  # pragma: no cover - compiled
    """Correlate rows with kx, then columns with ky (odd lengths), edges repeated."""
    h, w = img.shape
    ry, rx = len(ky) // 2, len(kx) // 2
    tmp = np.empty((h, w), np.float32)
    for i in numba.prange(h):
        for j in range(w):
            s = 0.0
            for k in range(len(kx)):
                jj = min(max(j + k - rx, 0), w - 1)
                s += kx[k] * img[i, jj]
            tmp[i, j] = s
    out = np.empty((h, w), np.float32)
    for i in numba.prange(h):
        for j in range(w):
            out[i, j] = 0.0
        for k in range(len(ky)):
            ii = min(max(i + k - ry, 0), h - 1)
            for j in range(w):
                out[i, j] += ky[k] * tmp[ii, j]
    return out


def separable_filter(img: np.ndarray, ky: np.ndarray, kx: np.ndarray) -> np.ndarray:
    """2D correlation with the outer product of two odd-length kernels, edges repeated (float32)."""
    return _separable(np.ascontiguousarray(img, np.float32), np.asarray(ky, np.float32), np.asarray(kx, np.float32))


IDENTITY = np.array([1.0], np.float32)
GAUSS1 = np.exp(-0.5 * np.arange(-3, 4) ** 2).astype(np.float32)
GAUSS1 /= GAUSS1.sum()  # sigma 1, 7 taps


def shift_fraction(img: np.ndarray, fy: float, fx: float) -> np.ndarray:
    """out[y, x] = img[y - fy, x - fx] for |fy|, |fx| <= 0.5 (Lanczos-3 interpolation, edges repeated)."""
    if not fy and not fx:
        return np.asarray(img, np.float32)
    ky = _fraction_kernel(fy) if fy else IDENTITY
    kx = _fraction_kernel(fx) if fx else IDENTITY
    return separable_filter(img, ky, kx)


def _lucas_kanade(a: np.ndarray, b: np.ndarray, robust: bool) -> tuple[float, float] | None:
    """Least-squares (ey, ex) with a[y] ~ b[y - e] for small e; None if the frames have no texture.

    With `robust`, residuals are Cauchy-weighted (scale from their median absolute deviation), so a
    region that changed (a cell lighting up) does not pull the global shift towards itself.
    """
    gy = 0.5 * (np.gradient(a, axis=0) + np.gradient(b, axis=0))
    gx = 0.5 * (np.gradient(a, axis=1) + np.gradient(b, axis=1))
    d = a - b
    if robust:
        d -= np.float32(np.median(d[::2, ::2]))  # a change in part of the field must not offset the rest
        # Cauchy scale: the residuals' spread, but never below what a 0.25-pixel misalignment leaves
        texture = float(np.sqrt(np.mean(gy * gy + gx * gx)))
        scale = max(1.4826 * float(np.median(np.abs(d[::2, ::2]))), 0.25 * texture) * 2.385 + 1e-12
        w = 1.0 / (1.0 + (d / np.float32(scale)) ** 2)
        wy, wx = w * gy, w * gx
    else:
        d -= np.float32(d.mean())
        wy, wx = gy, gx
    m = np.array([[np.vdot(wy, gy), np.vdot(wy, gx)], [np.vdot(wx, gy), np.vdot(wx, gx)]], np.float64)
    rhs = -np.array([np.vdot(wy, d), np.vdot(wx, d)], np.float64)
    if m[0, 0] + m[1, 1] <= 0 or np.linalg.cond(m) > 1e4:
        return None
    ey, ex = np.linalg.solve(m, rhs)
    return float(ey), float(ex)


def subpixel_shift(cur: np.ndarray, ref: np.ndarray, max_shift: float = 64.0) -> tuple[float, float] | None:
    """(dy, dx) with cur[y, x] ~ ref[y - dy, x - dx], to a fraction of a pixel; None if not found.

    Coarse: phase correlation at quarter resolution. Fine: up to five Lucas-Kanade steps at half
    resolution (sigma-1 blur there), robustly weighted, re-centring on the nearest
    integer shift after each step.
    """
    a2, b2 = halve(cur), halve(ref)
    h, w = a2.shape
    if min(h, w) < 16:
        return None
    a2, b2 = separable_filter(a2, GAUSS1, GAUSS1), separable_filter(b2, GAUSS1, GAUSS1)
    if min(h, w) >= 64:
        cy, cx = register_shift(halve(a2), halve(b2))
        n = [2 * cy, 2 * cx]
    else:
        n = [0, 0]
    e = np.zeros(2)
    margin = 3
    for it in range(5):
        if abs(n[0]) > h // 2 or abs(n[1]) > w // 2:
            return None
        (ya, xa), (yb, xb) = overlap(h, w, n[0], n[1])
        a, b = a2[ya, xa], b2[yb, xb]
        if e.any():
            b = shift_fraction(b, float(e[0]), float(e[1]))
        a, b = a[margin:-margin, margin:-margin], b[margin:-margin, margin:-margin]
        if min(a.shape) < 8:
            return None
        step = _lucas_kanade(a, b, robust=True)
        if step is None:
            return None
        e += step
        whole = np.round(e).astype(int)
        if it > 0 and not whole.any() and np.all(np.abs(step) < 0.01):
            break
        n[0] += int(whole[0])
        n[1] += int(whole[1])
        e -= whole
    dy, dx = 2 * (n[0] + e[0]), 2 * (n[1] + e[1])
    if abs(dy) > max_shift or abs(dx) > max_shift:
        return None
    return float(dy), float(dx)
