"""Camera-noise calibration from a single frame: Poisson-Gaussian fit and the matching FM2S parameters.

Model: var(v) = a * v + b in camera units (a = gain in ADU per electron; b = gain^2 * read^2 -
a * offset). Estimation: the frame is cut into 8x8 tiles; per tile a fused numba kernel computes
the mean, the variance, and the variance of horizontal/vertical first differences (which cancel
smooth structure). Tiles whose variance is much larger than the difference-based noise variance
hold structure and are dropped; the rest are binned by mean, each bin gives a robust (median) noise
variance, and a weighted line fit gives (a, b). The lag-1 noise correlation rho is estimated from
lag-1..3 differences combined so that linear structure cancels (`noise_correlation`) and corrects
the difference-based variances (var(diff)/2 = var * (1 - rho)), so spatially correlated noise is
measured at its true level. Clipped tiles are excluded.

`fm2s_parameters` maps the estimate onto a base preset: it keeps the preset's balance between its
three noise terms and scales their strength so that the injected noise, relative to the real noise
at the frame's median level, is what the paper's presets inject on FMD data (REFERENCE_RATIO).
"""

from __future__ import annotations

import itertools
import math
from dataclasses import asdict, dataclass
from typing import Any

import numba
import numpy as np

from .presets import Preset, get_preset
from .scaling import check_frame, scaling_for

__all__ = ["REFERENCE_RATIO", "NoiseEstimate", "auto_base", "auto_preset", "calibrate", "estimate_noise",
           "estimate_noise_or_none", "fm2s_parameters", "tile_stats"]

TILE = 8
# injected-to-real noise variance ratio (geometric mean) of the paper presets on the 12 FMD dev images at
# their median level, each with its own preset (benchmarks/calibration.py: 0.7 confocal .. 4.0 widefield).
REFERENCE_RATIO = 1.92


@numba.njit(parallel=True, cache=True)
def tile_stats(img: np.ndarray, tile: int) -> np.ndarray:  # pragma: no cover - compiled
    """Per tile: (mean, variance, var of first differences / 2, max) as an (n_tiles, 4) array."""
    h, w = img.shape
    ny, nx = h // tile, w // tile
    out = np.empty((ny * nx, 4), np.float64)
    for k in numba.prange(ny * nx):
        ty, tx = k // nx, k % nx
        s = 0.0
        s2 = 0.0
        d2 = 0.0
        nd = 0
        mx = -1e300
        for i in range(tile):
            for j in range(tile):
                v = float(img[ty * tile + i, tx * tile + j])
                s += v
                s2 += v * v
                mx = max(mx, v)
                if j + 1 < tile:
                    d = v - float(img[ty * tile + i, tx * tile + j + 1])
                    d2 += d * d
                    nd += 1
                if i + 1 < tile:
                    d = v - float(img[ty * tile + i + 1, tx * tile + j])
                    d2 += d * d
                    nd += 1
        n = tile * tile
        mean = s / n
        out[k, 0] = mean
        out[k, 1] = (s2 - n * mean * mean) / (n - 1)
        out[k, 2] = d2 / nd / 2.0
        out[k, 3] = mx
    return out


@dataclass(frozen=True)
class NoiseEstimate:
    """var(v) = a * v + b (camera units); rho: lag-1 noise correlation; black: the frame's black level."""

    a: float
    b: float
    rho: float
    black: float
    median_level: float
    tiles_used: int

    def variance(self, level: float | np.ndarray) -> Any:
        """Noise variance at a camera level."""
        return np.maximum(self.a * np.asarray(level) + self.b, 0.0)

    def read_noise_electrons(self, offset: float) -> float:
        """Read noise in electrons, given the camera offset (not identifiable from one frame alone)."""
        return math.sqrt(max(self.b + self.a * offset, 0.0)) / max(self.a, 1e-12)


def estimate_noise(frame: np.ndarray, bins: int = 16) -> NoiseEstimate:
    """Fit the Poisson-Gaussian noise of one uint8/uint16 frame (see module docstring)."""
    check_frame(frame)
    h, w = (frame.shape[0] // TILE) * TILE, (frame.shape[1] // TILE) * TILE
    stats = tile_stats(np.ascontiguousarray(frame[:h, :w]), TILE)
    mean, var, dvar, mx = stats.T
    white = float(np.iinfo(frame.dtype).max)
    ok = (mx < white) & (stats[:, 0] > 0)  # clipped tiles say nothing about the noise
    rho = noise_correlation(np.asarray(frame[:h, :w], np.float64), mean, ok)
    one_minus_rho = max(1.0 - rho, 0.05)
    noise = dvar / one_minus_rho
    smooth = ok & (var < 1.5 * noise)  # structure inflates var far above the difference estimate
    m, n = mean[smooth], noise[smooth]
    if m.size < 16:
        raise ValueError("frame too structured or too small to estimate its noise (need flat regions)")
    bins = max(1, min(bins, m.size // 8))  # small frames: fewer, fuller bins
    edges = np.unique(np.quantile(m, np.linspace(0, 1, bins + 1)))
    xs, ys, ws = [], [], []
    for lo, hi in itertools.pairwise(edges):
        sel = (m >= lo) & (m <= hi)
        if sel.sum() >= 4:
            xs.append(float(np.median(m[sel])))
            ys.append(float(np.median(n[sel])) / _median_bias(TILE))
            ws.append(float(sel.sum()))
    x, y, wt = np.array(xs), np.array(ys), np.array(ws)
    if x.size == 0 or not np.all(np.isfinite(y)):
        raise ValueError("too few flat regions to estimate the noise")
    if x.size >= 2 and np.ptp(x) > 0:
        a, b = np.polyfit(x, y, 1, w=np.sqrt(wt) / np.maximum(y, 1e-12))
    else:
        a, b = 0.0, float(y.mean())
    a = max(float(a), 0.0)
    black = float(np.quantile(mean[ok], 0.001))
    return NoiseEstimate(a, float(b), rho, black, float(np.median(mean[ok])), int(m.size))


def _tile_sum(a: np.ndarray, ny: int, nx: int) -> np.ndarray:
    """Per-tile sums of the top-left (ny*TILE, nx*TILE) part of `a`, flattened like tile_stats."""
    return a[: ny * TILE, : nx * TILE].reshape(ny, TILE, nx, TILE).sum(axis=(1, 3)).ravel()


def noise_correlation(img: np.ndarray, tile_mean: np.ndarray, ok: np.ndarray) -> float:
    """Lag-1 correlation of the noise, from lag-1..3 differences combined so that linear structure cancels.

    D_k = var(x_i - x_{i+k}) / 2 = s2 (1 - rho_k) + k^2 g^2 / 2 for a local gradient g, so
    4 D_1 - D_2 = s2 (3 - 4 rho_1 + rho_2) and 9 D_1 - D_3 = s2 (8 - 9 rho_1 + rho_3) carry no g.
    With a Gaussian-shaped correlation (rho_k = rho_1^(k^2)) their ratio fixes rho_1. Medians over
    the darker half of the unclipped tiles (mostly background) keep curvature out. Measured on
    512^2 synthetic frames: true 0 / 0.26 / 0.58 / 0.78 -> 0.00 / 0.23 / 0.55 / 0.77; frames below
    ~200 px are biased upwards (too few flat tiles).
    """
    h, w = img.shape
    ny, nx = (h - 3) // TILE, (w - 3) // TILE
    if ny * nx < 8:
        return 0.0
    d = []
    for k in (1, 2, 3):
        sq = (img[:, k:] - img[:, :-k])[: h - 3, : w - 3] ** 2 + (img[k:, :] - img[:-k, :])[: h - 3, : w - 3] ** 2
        d.append(_tile_sum(sq, ny, nx) / (4 * TILE * TILE))
    nxt = w // TILE  # tile_stats' grid may be one tile wider/taller: re-index its flags onto this grid
    idx = (np.arange(ny)[:, None] * nxt + np.arange(nx)[None, :]).ravel()
    level, usable = tile_mean[idx], ok[idx]
    keep = usable & (level <= np.quantile(level[usable], 0.5)) if usable.any() else usable
    if keep.sum() < 8:
        return 0.0
    a = float(np.median(4 * d[0][keep] - d[1][keep]))
    b = float(np.median(9 * d[0][keep] - d[2][keep]))
    if a <= 0:
        return 0.0
    ratio = b / a  # 8/3 for white noise, growing with rho_1

    def excess(r: float) -> float:
        return (8 - 9 * r + r**9) / (3 - 4 * r + r**4) - ratio

    if excess(0.0) >= 0:
        return 0.0
    if excess(0.95) <= 0:
        return 0.95
    lo, hi = 0.0, 0.95
    for _ in range(40):  # bisection: excess is increasing in r
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if excess(mid) < 0 else (lo, mid)
    return 0.5 * (lo + hi)


def _median_bias(tile: int) -> float:
    """Median / mean of a tile's difference-variance estimate under Gaussian noise (Wilson-Hilferty)."""
    k = 2 * tile * (tile - 1) / 2  # effective degrees of freedom of the pooled differences (~half correlated)
    return (1 - 2 / (9 * k)) ** 3


def preset_variance(preset: Preset, x: float) -> float:
    """Variance the FM2S injector adds at level x (in [0, 1]) of a flat tile."""
    m = min(max(x, 1e-5), 0.15)
    return x * m / preset.k_p + (preset.k_g * m / 255) ** 2 + x / preset.lambda_p


def fm2s_parameters(est: NoiseEstimate, frame: np.ndarray, base: str | Preset = "confocal") -> Preset:
    """A preset whose injected noise relates to this frame's noise as the paper's presets do on FMD."""
    p = get_preset(base) if isinstance(base, str) else base
    scaling = scaling_for(frame)
    level = est.median_level
    x = max((level - scaling.black) / scaling.span, 1e-4)
    real = float(est.variance(level)) / scaling.span**2  # in the [0, 1] domain
    s = REFERENCE_RATIO * real / max(preset_variance(p, x), 1e-12)  # variance scale factor
    return p.with_noise(k_g=p.k_g * math.sqrt(s), k_p=p.k_p / s, lambda_p=p.lambda_p / s, name=f"auto({p.name})")


CORRELATED = 0.3  # lag-1 noise correlation above which the widefield base (1 channel, 11x11 median) is used


def estimate_noise_or_none(frame: np.ndarray) -> NoiseEstimate | None:
    """`estimate_noise`, or None for frames too structured or too small to fit."""
    try:
        return estimate_noise(frame)
    except ValueError:
        return None


def auto_base(est: NoiseEstimate) -> str:
    """The paper preset whose structure suits this noise: widefield for correlated noise, else confocal."""
    return "widefield" if est.rho > CORRELATED else "confocal"


def auto_preset(frame: np.ndarray, base: str | None = None) -> Preset:
    """FM2S parameters for this frame from its own noise (`--preset auto`).

    Falls back to the base (or confocal) paper preset when the frame has too few flat regions to fit.
    """
    est = estimate_noise_or_none(frame)
    if est is None:
        return get_preset(base or "confocal")
    return fm2s_parameters(est, frame, base or auto_base(est))


def calibrate(frame: np.ndarray, base: str = "confocal", offset: float | None = None) -> dict[str, Any]:
    """The estimate and the derived FM2S parameters, as a JSON-ready dict (what `calibrate` prints)."""
    est = estimate_noise(frame)
    preset = fm2s_parameters(est, frame, base)
    out: dict[str, Any] = {**asdict(est), "gain_adu_per_e": est.a}
    if offset is not None:
        out["offset"] = offset
        out["read_noise_e"] = est.read_noise_electrons(offset)
    out["fm2s"] = asdict(preset)
    return out
