"""Block-matching collaborative filtering (the BM3D family, Dabov et al. 2007): the classical pre-denoiser.

Every 8x8 patch on a grid is grouped with the most similar patches around it; a group is transformed
(orthonormal 2D DCT of each patch, then a Walsh-Hadamard transform along the group), shrunk, and
transformed back; every patch estimate is aggregated into the frame with a weight that favours
sparse groups. Step 1 shrinks by hard thresholding; step 2 matches on step 1's estimate and shrinks
by the empirical Wiener filter that estimate gives.

It works on a frame whose noise is stationary: unit variance after the generalized Anscombe transform
of the frame's Poisson-Gaussian law (`stabilize`, `unstabilize`), white or correlated between
neighbours as the network's injection correlates it. Correlated noise gets each DCT coefficient's own
variance and, for the group's mean, the exact variance of patches that overlap and so share noise
(Makinen, Azzari, Foi 2020 make the same point); patches right next to the reference stay out of its
group. `block_matched` is what `offline.denoise` uses; it declines a frame whose law overstates its
noise. Written from the papers; no code of the `bm3d` package (non-commercial licence).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numba
import numpy as np

from .calibrate import CORRELATED
from .noise import correlation_taps

__all__ = ["BLOCKMATCH", "CONSISTENT_SD", "BlockMatchParams", "Prior", "block_matched", "collaborative_filter",
           "stabilize", "unstabilize"]

PATCH = 8  # patch side: the 2D transform is an 8x8 DCT
TILE = 512  # frames over 2 tiles wide are filtered in tiles of this size (memory), with margins
CONSISTENT_SD = 0.6  # a residual sd below this (unit-variance domain): the law overstates the frame's noise


@dataclass(frozen=True)
class BlockMatchParams:
    """Step 1 (hard threshold) and step 2 (Wiener) settings, distances in units of the noise variance.

    step: reference-patch grid spacing; radius: search window half-size; group1/group2: most patches
    per group (powers of two); tau1/tau2: largest mean squared patch distance admitted, over sigma^2;
    lam / lam_correlated: hard threshold in noise standard deviations, for white / correlated noise;
    apart: correlated noise only: patches this close to the reference (both axes) are not grouped
    with it (they share its low-frequency noise); beta: Kaiser window of the aggregation.
    Measured (FMD dev images, synthetic correlated noise): README "Quality".
    """

    step: int = 3
    radius: int = 16
    group1: int = 16
    group2: int = 32
    tau1: float = 4.0
    tau2: float = 1.0
    lam: float = 2.4  # published: 2.7; the filter alone on FMD two-photon: 34.11 dB at 2.7, 34.19 at 2.4
    lam_correlated: float = 3.0
    apart: int = 2
    beta: float = 2.0


BLOCKMATCH = BlockMatchParams()


def _dct_matrix(n: int = PATCH) -> np.ndarray:
    """The orthonormal DCT-II matrix (rows are basis vectors)."""
    k = np.arange(n)[:, None]
    i = np.arange(n)[None, :]
    c = np.sqrt(2.0 / n) * np.cos(np.pi * (2 * i + 1) * k / (2 * n))
    c[0] /= np.sqrt(2.0)
    return c


def _shift_covariance(rho: float, sigma: float) -> np.ndarray:
    """cov[k, d + D]: covariance of DCT coefficient k of two 8-sample windows d samples apart, for noise
    of sd `sigma` correlated along the axis as the injector correlates it (`noise.correlation_taps`:
    lag-1 rho, a small lag 2, none beyond; as measured on FMD widefield). A 2D coefficient's is the
    product of its two axes'. D = 7 + the longest correlated lag: windows farther apart share no noise."""
    taps = np.asarray(correlation_taps(rho).tolist(), np.float64)
    acf = np.correlate(taps, taps, mode="full")  # lags -2 .. 2
    most = len(taps) - 1  # the longest lag with any correlation
    reach = PATCH - 1 + most
    c = _dct_matrix()
    u = np.arange(PATCH)
    out = np.zeros((PATCH, 2 * reach + 1))
    for d in range(-reach, reach + 1):
        lag = u[:, None] - u[None, :] - d  # sample u of one window against sample v of the other
        r = np.where(np.abs(lag) <= most, acf[np.clip(lag + most, 0, len(acf) - 1)], 0.0)
        out[:, d + reach] = np.einsum("ku,uv,kv->k", c, r, c)
    return sigma * out  # the 2D product gives sigma^2


def stabilize(frame: np.ndarray, a: float, b: float) -> np.ndarray:
    """Generalized Anscombe transform of var = a * level + b (camera units): noise of unit variance."""
    return 2.0 / a * np.sqrt(np.maximum(a * frame.astype(np.float64) + 0.375 * a * a + b, 0.0))


def unstabilize(z: np.ndarray, a: float, b: float) -> np.ndarray:
    """The inverse of `stabilize` for a denoised z (algebraic, with the 1/8 bias correction)."""
    return ((a * np.asarray(z, np.float64) / 2.0) ** 2 - 0.125 * a * a - b) / a


@numba.njit(parallel=True, cache=True)
def _patch_coefficients(img: np.ndarray, c: np.ndarray) -> np.ndarray:  # pragma: no cover - numba
    """2D DCT of every 8x8 patch: (H-7, W-7, 64), row-major coefficients."""
    h, w = img.shape
    ph, pw = h - PATCH + 1, w - PATCH + 1
    rows = np.empty((h, pw, PATCH), np.float32)
    for y in numba.prange(h):
        for x in range(pw):
            for k in range(PATCH):
                s = 0.0
                for i in range(PATCH):
                    s += c[k, i] * img[y, x + i]
                rows[y, x, k] = s
    out = np.empty((ph, pw, PATCH * PATCH), np.float32)
    for y in numba.prange(ph):
        for x in range(pw):
            for k in range(PATCH):
                for j in range(PATCH):
                    s = 0.0
                    for i in range(PATCH):
                        s += c[k, i] * rows[y + i, x, j]
                    out[y, x, k * PATCH + j] = s
    return out


@numba.njit(cache=True, inline="always")
def _hadamard(g: np.ndarray, n: int) -> None:  # pragma: no cover - numba
    """In-place orthonormal Walsh-Hadamard transform along axis 0 of g[:n] (n a power of two)."""
    h = 1
    while h < n:
        for i in range(0, n, 2 * h):
            for j in range(i, i + h):
                for k in range(g.shape[1]):
                    u = g[j, k]
                    v = g[j + h, k]
                    g[j, k] = u + v
                    g[j + h, k] = u - v
        h *= 2
    s = 1.0 / math.sqrt(n)
    for j in range(n):
        for k in range(g.shape[1]):
            g[j, k] *= s


@numba.njit(cache=True)
def _match(coef: np.ndarray, ry: int, rx: int, radius: int, most: int, tau: float,
           ys: np.ndarray, xs: np.ndarray, ds: np.ndarray, apart: int) -> int:  # pragma: no cover - numba
    """The `most` patches nearest to (ry, rx) within `radius` and mean distance `tau`, nearest first
    (the reference itself always first; none closer than `apart` on both axes); returns how many,
    rounded down to a power of two."""
    ph, pw, m = coef.shape
    n = 0
    limit = tau * m
    for y in range(max(0, ry - radius), min(ph, ry + radius + 1)):
        for x in range(max(0, rx - radius), min(pw, rx + radius + 1)):
            if y == ry and x == rx:
                d = -1.0  # the reference leads every group
            elif abs(y - ry) < apart and abs(x - rx) < apart:
                continue
            else:
                d = 0.0
                for k in range(m):
                    t = coef[y, x, k] - coef[ry, rx, k]
                    d += t * t
            if d > limit or (n == most and d >= ds[n - 1]):
                continue
            i = n if n < most else most - 1
            while i > 0 and ds[i - 1] > d:
                if i < most:
                    ds[i], ys[i], xs[i] = ds[i - 1], ys[i - 1], xs[i - 1]
                i -= 1
            ds[i], ys[i], xs[i] = d, y, x
            if n < most:
                n += 1
    p = 1
    while p * 2 <= n:
        p *= 2
    return p


@numba.njit(parallel=True, cache=True)
def _collaborate(noisy: np.ndarray, pilot: np.ndarray, refs_y: np.ndarray, refs_x: np.ndarray,
                 cov: np.ndarray, c: np.ndarray, window: np.ndarray, radius: int, most: int, tau: float,
                 lam: float, wiener: bool, apart: int, chunks: int) -> np.ndarray:  # pragma: no cover - numba
    """One step over all reference patches: match on `pilot`'s coefficients, shrink `noisy`'s groups
    (hard threshold lam * sd, or Wiener with the pilot's group), aggregate; returns (2, H, W) sums of
    weighted estimates and of weights, per chunk of references (summed by the caller).

    cov[k, d + D]: covariance of DCT coefficient k (one axis) of two patches d pixels apart (`_shift_covariance`).
    The group's mean (the first Hadamard row) gets its exact noise variance, which overlapping patches
    raise (they share noise), and the other rows share the rest of the group's noise equally."""
    ph, pw, m = noisy.shape
    h, w = ph + PATCH - 1, pw + PATCH - 1
    reach = (cov.shape[1] - 1) // 2
    var = np.empty(m)
    for ky in range(PATCH):
        for kx in range(PATCH):
            var[ky * PATCH + kx] = cov[ky, reach] * cov[kx, reach]
    vmin = var.min()
    acc = np.zeros((chunks, 2, h, w), np.float64)
    for t in numba.prange(chunks):
        ys = np.empty(most, np.int64)
        xs = np.empty(most, np.int64)
        ds = np.empty(most, np.float64)
        g = np.empty((most, m), np.float64)
        gp = np.empty((most, m), np.float64)
        vg = np.empty((2, m), np.float64)  # noise variance of the group's mean row, and of the others
        patch = np.empty((PATCH, PATCH), np.float64)
        tmp = np.empty((PATCH, PATCH), np.float64)
        for r in range(t, refs_y.size, chunks):
            n = _match(pilot, refs_y[r], refs_x[r], radius, most, tau, ys, xs, ds, apart)
            for j in range(n):
                for k in range(m):
                    g[j, k] = noisy[ys[j], xs[j], k]
                    gp[j, k] = pilot[ys[j], xs[j], k]
            for k in range(m):
                vg[0, k] = var[k]
                vg[1, k] = var[k]
            if n > 1:
                for k in range(m):
                    vg[0, k] = 0.0
                for i in range(n):
                    for j in range(n):
                        dy = ys[i] - ys[j]
                        dx = xs[i] - xs[j]
                        if abs(dy) > reach or abs(dx) > reach:
                            continue
                        for ky in range(PATCH):
                            cy = cov[ky, dy + reach]
                            for kx in range(PATCH):
                                vg[0, ky * PATCH + kx] += cy * cov[kx, dx + reach]
                for k in range(m):
                    vg[0, k] /= n
                    vg[1, k] = max((n * var[k] - vg[0, k]) / (n - 1), 1e-3 * var[k])
            _hadamard(g, n)
            if wiener:
                _hadamard(gp, n)
                energy = 0.0
                for j in range(n):
                    row = 0 if j == 0 else 1
                    for k in range(m):
                        p2 = gp[j, k] * gp[j, k]
                        f = p2 / (p2 + vg[row, k])
                        g[j, k] *= f
                        energy += f * f * vg[row, k]
                weight = 1.0 / max(energy, 1e-12)
            else:
                kept = 0.0
                for j in range(n):
                    row = 0 if j == 0 else 1
                    for k in range(m):
                        if g[j, k] * g[j, k] <= lam * lam * vg[row, k]:
                            g[j, k] = 0.0
                        else:
                            kept += vg[row, k]
                weight = 1.0 / max(kept, vmin)
            _hadamard(g, n)  # its own inverse
            for j in range(n):
                for u in range(PATCH):  # inverse 2D DCT: patch = C^T G C
                    for v in range(PATCH):
                        s = 0.0
                        for k in range(PATCH):
                            s += c[k, u] * g[j, k * PATCH + v]
                        tmp[u, v] = s
                for u in range(PATCH):
                    for v in range(PATCH):
                        s = 0.0
                        for k in range(PATCH):
                            s += tmp[u, k] * c[k, v]
                        patch[u, v] = s
                y0, x0 = ys[j], xs[j]
                for u in range(PATCH):
                    for v in range(PATCH):
                        wk = weight * window[u, v]
                        acc[t, 0, y0 + u, x0 + v] += wk * patch[u, v]
                        acc[t, 1, y0 + u, x0 + v] += wk
    return acc


def _grid(n: int, step: int) -> np.ndarray:
    """Reference positions 0, step, ... along one axis of n patch positions, the last one included."""
    g = list(range(0, n, step))
    if g[-1] != n - 1:
        g.append(n - 1)
    return np.asarray(g, np.int64)


def collaborative_filter(z: np.ndarray, sigma: float = 1.0, rho: float = 0.0,
                         params: BlockMatchParams = BLOCKMATCH) -> np.ndarray:
    """Denoise a 2D frame with stationary noise of standard deviation `sigma` (lag-1 correlation `rho`
    along each axis) by both steps; returns float32 of the same shape. Frames under 8x8 come back as they are."""
    z = np.ascontiguousarray(z, np.float32)
    if z.ndim != 2:
        raise ValueError(f"collaborative_filter takes a 2D frame, got shape {z.shape}")
    if min(z.shape) < PATCH:
        return z.copy()
    if max(z.shape) > 2 * TILE:  # in tiles: every patch's DCT is held twice (64 floats per pixel each)
        out = np.empty_like(z)
        margin = 2 * params.radius + PATCH  # a core pixel's patches, their groups and their references
        for y0 in range(0, z.shape[0], TILE):
            for x0 in range(0, z.shape[1], TILE):
                y1, x1 = min(y0 + TILE, z.shape[0]), min(x0 + TILE, z.shape[1])
                ya, xa = max(y0 - margin, 0), max(x0 - margin, 0)
                part = _filter(z[ya:min(y1 + margin, z.shape[0]), xa:min(x1 + margin, z.shape[1])], sigma, rho, params)
                out[y0:y1, x0:x1] = part[y0 - ya:y1 - ya, x0 - xa:x1 - xa]
        return out
    return _filter(z, sigma, rho, params)


def _filter(z: np.ndarray, sigma: float, rho: float, params: BlockMatchParams) -> np.ndarray:
    """`collaborative_filter` of one (tile of a) frame at least 8x8."""
    z = np.ascontiguousarray(z, np.float32)
    c = _dct_matrix()
    cov = _shift_covariance(rho, sigma)
    kw = np.kaiser(PATCH, params.beta)
    window = np.outer(kw, kw)
    ph, pw = z.shape[0] - PATCH + 1, z.shape[1] - PATCH + 1
    gy, gx = np.meshgrid(_grid(ph, params.step), _grid(pw, params.step), indexing="ij")
    refs_y, refs_x = gy.ravel(), gx.ravel()
    chunks = numba.get_num_threads()
    noisy = _patch_coefficients(z, c)
    s2 = sigma * sigma
    lam, apart = (params.lam_correlated, params.apart) if rho > 0 else (params.lam, 0)
    acc = _collaborate(noisy, noisy, refs_y, refs_x, cov, c, window, params.radius, params.group1,
                       params.tau1 * s2, lam, False, apart, chunks).sum(axis=0)
    basic = (acc[0] / acc[1]).astype(np.float32)
    pilot = _patch_coefficients(basic, c)
    acc = _collaborate(noisy, pilot, refs_y, refs_x, cov, c, window, params.radius, params.group2,
                       params.tau2 * s2, lam, True, apart, chunks).sum(axis=0)
    return (acc[0] / acc[1]).astype(np.float32)


@dataclass(frozen=True)
class Prior:
    """The block-matched estimate of a frame (camera units), or None and why the law was not trusted."""

    estimate: np.ndarray | None
    residual_sd: float
    reason: str


def block_matched(frame: np.ndarray, a: float, b: float, rho: float,
                  params: BlockMatchParams = BLOCKMATCH) -> Prior:
    """The frame denoised in the stabilised domain of its law var = a * level + b (camera units), its
    noise taken as correlated by `rho` where rho > calibrate.CORRELATED (as the network's injection does).

    Withheld (estimate None) where the residual is far quieter than the law's unit variance: the law then
    overstates this frame's noise, or the frame counts so few photons that the stabilisation cannot reach
    unit variance, and filtering at unit variance would blur it. FMD confocal, ~0.3 e- per pixel: residual
    sd 0.58-0.61 with a law within 4-16 % of the raw - truth gain (declined on three dev images; on the
    fourth, 0.61, it is kept: +0.02 dB over the network alone), 0.41 with the 2x law of a fit through
    clipping that was not there; two-photon 0.89-0.93; widefield 0.89-0.90; a dim synthetic 8-bit 128x128
    frame 0.70, where the prior gains ~0.4 dB."""
    if a <= 0:
        return Prior(None, math.nan, "no positive gain")
    z = stabilize(frame, a, b)
    filtered = collaborative_filter(z, 1.0, rho if rho > CORRELATED else 0.0, params)
    sd = float(np.std(z - filtered))
    if sd < CONSISTENT_SD:
        return Prior(None, sd, f"the noise law overstates this frame's noise (residual sd {sd:.2f} < {CONSISTENT_SD})")
    return Prior(unstabilize(filtered, a, b), sd, "")
