"""Camera-noise calibration from a single frame: Poisson-Gaussian fit and the matching FM2S parameters.

Model: var(v) = a * v + b in camera units (a = gain in ADU per electron; b = gain^2 * read^2 -
a * offset). Estimation: the frame is cut into 8x8 tiles; per tile a fused numba kernel computes
the mean, the variance, the variance of horizontal/vertical first differences (which cancel smooth
structure) and the least-squares slopes (whose excess over noise is taken out of the differences:
the flanks of cells). Tiles whose variance is much larger than the difference-based noise variance
hold structure and are dropped; the rest are binned by mean (half the bins by tile count, half by
level, so the few bright tiles weigh; under correlated noise by their neighbours' mean instead, see
`_neighbour_levels`), each bin gives a robust (median) noise variance, and a
weighted line fit gives (a, b); bins significantly above the line are refitted without, since
structure that got past the flatness test only adds variance and gathers in the bright bins that
carry the slope. The lag-1 noise correlation rho is estimated from lag-1..3 differences combined so
that linear structure cancels (`noise_correlation`) and corrects the difference-based variances
(var(diff)/2 = var * (1 - rho)), so spatially correlated noise is measured at its true level; the
white noise of rounding to integers (1/12 ADU^2) is kept out of that correction. Saturated tiles are
excluded. Where dark tiles come within 3 noise std of 0 and pixels sit at 0 (CLIPPED_SHARE), the
camera clipped them there (variance shrinks, mean rises): the law is then fitted through a normal
censored at 0 (Foi et al. 2008 style), with the bins predicted as differences of correlated neighbours
clipped together, and `observed_variance` gives the pixel variance the frame itself shows. Without
pixels at 0 the dark tiles are merely quiet: photon counting above a PMT's offset (FMD confocal, no
pixel at 0: 21.6-23.9 ADU/e- against 20.6-21.0 from raw - truth; through the clipping 40).

Measured (benchmarks/calibration.py, 512x512 synthetic frames, gain 0.5-20 ADU/e-, read noise 1-10 e-,
8 and 16 bit, white and correlated noise, 20 noise draws per cell): the gain's bias (mean error over
draws) is within 10 % in all 36 cells (at most 6.2 %); 95 % of single frames are within 10 % (rms
5.8 %). One frame pins the gain less well where read noise dominates (read 10 e-: sd 5-12 %, its
variance spans only 25..44 ADU^2 in 8 bit); streaming re-estimates and smooths over frames. On the
dev FMD ground truths as photon maps with correlated cameras (the same benchmark, part 2), binning by
the neighbours' level took the mean gain error where the gain is identifiable from 53-71 % to 5-8 %.

`fm2s_parameters` maps the estimate onto a base preset: it keeps the preset's balance between its
three noise terms and scales their strength so that the injected noise, relative to the real noise
at the frame's median level, is what the paper's presets inject on FMD data with white noise
(REFERENCE_RATIO); correlated noise is injected correlated like the frame's (Preset.rho), at the
ratio measured best for it (CORRELATED_INJECTION_RATIO).
"""

from __future__ import annotations

import itertools
import math
from dataclasses import asdict, dataclass, field
from typing import Any

import numba
import numpy as np
from scipy import ndimage, optimize, special

from .presets import MAX_RHO, Preset, get_preset
from .scaling import check_frame, scaling_for

__all__ = ["CORRELATED_INJECTION_RATIO", "GAIN_PINNED", "REFERENCE_RATIO", "FieldNoise", "NoiseEstimate", "auto_base",
           "auto_preset", "calibrate", "estimate_noise", "estimate_noise_frames", "estimate_noise_or_none",
           "fm2s_parameters", "frame_gain_bound", "gain_bound", "tile_stats"]

TILE = 8
QUANTIZATION = 1.0 / 12.0  # variance (ADU^2) that rounding to integers adds, white
CLIP_SIGMAS = 3.0  # a bin whose mean is closer to 0 than this many noise std is affected by clipping
# clipping at 0 leaves pixels at 0: below this share of them the frame was not clipped, and dark tiles close
# to 0 in noise units are merely quiet (a PMT's offset with little read noise: the FMD confocal raws have no
# pixel at 0, and a fit through clipping there doubled their gain, 40 ADU/e- against 21 from raw - truth)
CLIPPED_SHARE = 1e-4
# gain_bound above this (1 sd): even an estimate that knew the scene strays beyond 10 % in > 5 % of frames
GAIN_PINNED = 0.05
CORRELATED = 0.3  # lag-1 noise correlation above which the widefield base (1 channel, 11x11 median) is used
# correlated noise: a tile is binned by its 8 neighbours' mean level, and kept only where its own mean lies
# within this many standard errors of theirs (see _neighbour_levels)
NEIGHBOUR_AGREEMENT = 2.0
NEIGHBOUR_MIN_TILES = 128  # fewer tiles agreeing (a small frame, e.g. 128x128) bin by their own levels: 16 bins of 8
# injected-to-real noise variance ratio of the paper presets on the 12 FMD dev images at their median
# level, each image with its own preset (geometric mean per noise class, benchmarks/calibration.py part
# fmd): white noise (confocal 0.67-0.75 and two-photon 2.44-2.65 images: the confocal base) and spatially
# correlated noise (widefield 4.0: the widefield base). Measured: confocal images denoise best with weak
# injection, widefield ones, injected white, with strong (1.4: 32.32, 4: 32.5). White, `auto`, seeds 0-2:
# confocal 1.34: 32.27 dB, 1.6: 32.21; two-photon 1.34: 34.42, 1.6: 34.40. Before
# the fit through clipping was limited to frames with pixels at 0, the confocal law read their noise at
# the median 25 % low, the confocal ratios 1.0 and the white ratio 1.60.
REFERENCE_RATIO = {"white": 1.34, "correlated": 3.94}
# Correlated noise (rho > CORRELATED) is injected correlated as the frame's (Preset.rho, lag-1 rho along
# each axis), at this injected-to-real variance ratio. Widefield dev images (4, seed 0, default `denoise`):
# white injection at 3.94: 32.54 dB; correlated at 0.25: 32.18, 0.4: 32.58, 0.6: 32.65, 1.0: 32.53, 1.6: 32.31,
# 3.94: 31.88 (seeds 0-2 at 0.6: 32.66). Weaker than the white ratio: correlated noise of the same variance
# already carries the low frequencies that the white injection needed ~4x the variance to reach.
CORRELATED_INJECTION_RATIO = 0.6


@numba.njit(parallel=True, cache=True)
def tile_stats(img: np.ndarray, tile: int) -> np.ndarray:  # pragma: no cover - compiled
    """Per tile: (mean, variance, var of first differences / 2, max, slope y, slope x), (n_tiles, 6).

    The slopes are the least-squares plane's, per pixel: a significant one marks the flank of a cell.
    """
    h, w = img.shape
    ny, nx = h // tile, w // tile
    out = np.empty((ny * nx, 6), np.float64)
    c = (tile - 1) / 2.0
    sxx = tile * tile * (tile * tile - 1) / 12.0  # sum over the tile of (coordinate - centre)^2
    for k in numba.prange(ny * nx):
        ty, tx = k // nx, k % nx
        s = 0.0
        s2 = 0.0
        sy = 0.0
        sx = 0.0
        d2 = 0.0
        nd = 0
        mx = -1e300
        for i in range(tile):
            for j in range(tile):
                v = float(img[ty * tile + i, tx * tile + j])
                s += v
                s2 += v * v
                sy += v * (i - c)
                sx += v * (j - c)
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
        out[k, 4] = sy / sxx
        out[k, 5] = sx / sxx
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
    clipped: bool = False  # dark regions reach 0: (a, b) were fitted through the clipping (see observed_variance)
    frames: int = 1  # frames the estimate came from (2+: differences of frames of one field)
    # the photon-transfer curve behind the fit: (level, variance, tiles, used in the fit) per bin
    bins: tuple[tuple[float, float, float, bool], ...] = field(default=(), compare=False, repr=False)

    def variance(self, level: float | np.ndarray) -> Any:
        """Noise variance at a camera level, before clipping (the camera's Poisson-Gaussian law)."""
        return np.maximum(self.a * np.asarray(level) + self.b, 0.0)

    def observed_variance(self, level: float) -> float:
        """Noise variance a frame shows at an observed mean `level`, with clipping at 0 taken into account."""
        if not self.clipped:
            return float(self.variance(level))
        return float(_clipped_prediction(np.array([level]), self.a, self.b)[0])

    def read_noise_electrons(self, offset: float) -> float:
        """Read noise in electrons, given the camera offset (not identifiable from one frame alone)."""
        return math.sqrt(max(self.b + self.a * offset, 0.0)) / max(self.a, 1e-12)


def estimate_noise(frame: np.ndarray, bins: int = 16) -> NoiseEstimate:
    """Fit the Poisson-Gaussian noise of one uint8/uint16 frame (see module docstring)."""
    check_frame(frame)
    h, w = (frame.shape[0] // TILE) * TILE, (frame.shape[1] // TILE) * TILE
    stats = tile_stats(np.ascontiguousarray(frame[:h, :w]), TILE)
    mean, var, dvar, mx, gy, gx = stats.T
    white = float(np.iinfo(frame.dtype).max)
    ok = (mx < white) & (stats[:, 0] > 0)  # clipped tiles say nothing about the noise
    rho = noise_correlation(np.asarray(frame[:h, :w], np.float64), mean, ok)
    one_minus_rho = max(1.0 - rho, 0.05)
    # a slope across the tile (the flank of a cell) is structure: it adds g^2 / 4 to the pooled
    # difference variance. Remove what the fitted slope holds beyond what noise alone puts into a
    # least-squares slope (more for correlated noise); near the clipping, slopes are the clip's
    sxx = TILE * TILE * (TILE * TILE - 1) / 12.0  # sum over a tile of (coordinate - centre)^2
    slope_noise = 2.0 * dvar / one_minus_rho * _correlation_sum(rho) / sxx
    excess = np.maximum(gy * gy + gx * gx - slope_noise, 0.0)
    excess[mean < CLIP_SIGMAS * np.sqrt(dvar / one_minus_rho)] = 0.0
    smooth = ok & (var < 1.5 * dvar / one_minus_rho)  # structure inflates var far above the difference estimate
    # the correlated part of the noise, then the rounding's white part (it does not shrink differences)
    noise = np.maximum(dvar - excess / 4.0 - QUANTIZATION, 0.0) / one_minus_rho + QUANTIZATION
    by = None
    if rho > CORRELATED:
        ring, agree = _neighbour_levels(mean, noise, rho, h // TILE, w // TILE)
        if np.count_nonzero(smooth & agree) >= NEIGHBOUR_MIN_TILES:  # else (small frames) by their own levels
            by, smooth = ring, smooth & agree
    m, n = mean[smooth], noise[smooth]
    if m.size < 16:
        raise ValueError("frame too structured or too small to estimate its noise (need flat regions)")
    a, b, clipped, curve = _fit_law(m, n, bins, min(rho, 0.95), _median_bias(TILE),
                                    by=None if by is None else by[smooth], zeros=_has_zeros([frame]))
    black = float(np.quantile(mean[ok], 0.001))
    return NoiseEstimate(a, b, rho, black, float(np.median(mean[ok])), int(m.size), clipped, 1, curve)


def _has_zeros(frames: list[np.ndarray]) -> bool:
    """Whether at least CLIPPED_SHARE of the frames' pixels sit at 0, as a camera clipping there leaves them."""
    zeros = sum(int(np.count_nonzero(f == 0)) for f in frames)
    return zeros >= CLIPPED_SHARE * sum(f.size for f in frames)


def _neighbour_levels(mean: np.ndarray, noise: np.ndarray, rho: float, ny: int, nx: int) -> tuple[
        np.ndarray, np.ndarray]:
    """Per tile: the mean level of its 8 neighbours (mirrored at the border), and whether the tile's own
    mean agrees with it within NEIGHBOUR_AGREEMENT standard errors of the two.

    Correlated noise makes an 8x8 mean ~5x noisier (rho 0.55: the correlation sum), so binned by their
    own means, the background tiles of one true level spread along the level axis at one variance and
    flatten the slope (on FMD ground truths as photon maps with correlated cameras: gain -50..-80 %,
    variance at mid level -30..-40 %). Binned by their neighbours' mean, whose noise is independent of
    theirs, a bin's mean own level is unbiased for its tiles' true level, as `estimate_noise_frames`
    bins by the other frames. Tiles that differ from their neighbours (edges of cells) are dropped.
    """
    def neighbours(v: np.ndarray) -> np.ndarray:
        grid = v.reshape(ny, nx)
        return ((ndimage.uniform_filter(grid, 3, mode="mirror") * 9 - grid) / 8).ravel()

    ring = neighbours(mean)
    # standard error of a tile mean, and of the neighbours' (8 tiles: 1/8 of its variance), from the
    # neighbours' noise: the tile's own would keep its noisier draws more often
    se = np.sqrt(np.maximum(neighbours(noise), 1e-12) * _correlation_sum(rho) / (TILE * TILE) * (1 + 1 / 8))
    return ring, np.abs(mean - ring) <= NEIGHBOUR_AGREEMENT * se


def _fit_law(m: np.ndarray, n: np.ndarray, bins: int, rho: float, median_bias: float,
             by: np.ndarray | None = None, robust: bool = True, zeros: bool = True) -> tuple[
        float, float, bool, tuple[tuple[float, float, float, bool], ...]]:
    """(a, b, clipped, the binned curve) of var = a * level + b through tiles' levels `m` and noise
    variance estimates `n`: a bin's variance is its tiles' median (structure inflates some) over
    `median_bias` (median / mean of one tile's estimate under noise alone; the mean where not
    `robust`, over the tiles at most CHANGED_TILE x the median); `rho`: the correlation of
    the values the estimates were differences of (for the fit through clipping). `by`: levels measured
    independently of `m`'s noise to bin by (a bin's level is then the mean of its tiles' `m`, free of
    the regression to the mean that binning by `m` itself brings: tiles of one true level binned by
    their noisy level spread along the level axis at one variance and flatten the slope). `robust`:
    drop bins significantly above the line (structure that passed the flatness test); off where the
    estimates cannot hold structure. `zeros`: the frames hold pixels at 0 (CLIPPED_SHARE), without
    which no fit through clipping is tried."""
    key = m if by is None else by
    bins = max(1, min(bins, m.size // 8))  # small frames: fewer, fuller bins
    # half the bins split the tiles evenly (most tiles are background), half split the level range
    # evenly (the few bright tiles carry the slope)
    lo_hi = np.quantile(key, [0.0, 0.995])
    edges = np.unique(np.concatenate([np.quantile(key, np.linspace(0, 1, bins // 2 + 1)),
                                      np.linspace(lo_hi[0], lo_hi[1], bins - bins // 2 + 1)]))
    edges[-1] = max(edges[-1], float(key.max()))
    xs, ys, ws, spread = [], [], [], []
    for lo, hi in itertools.pairwise(edges):
        sel = (key >= lo) & (key <= hi)
        if sel.sum() >= 8:
            ns = n[sel]
            med = float(np.median(ns))
            xs.append(float(np.median(m[sel]) if by is None else np.mean(m[sel])))
            ys.append(med / median_bias if robust else float(np.mean(ns[ns <= CHANGED_TILE * med])))
            ws.append(float(ns.size))
            spread.append(float(np.median(np.abs(ns - med))) * 1.4826 / max(med, 1e-12))
    x, y, wt = np.array(xs), np.array(ys), np.array(ws)
    if x.size == 0 or not np.all(np.isfinite(y)):
        raise ValueError("too few flat regions to estimate the noise")
    a, b, use = _robust_line(x, y, wt, np.array(spread), robust)
    curve = tuple((float(xi), float(yi), float(wi), bool(ui)) for xi, yi, wi, ui in zip(x, y, wt, use))
    x, y, wt = x[use], y[use], wt[use]
    # dark tiles within a few noise std of 0 are clipped there: their variance shrinks and their mean
    # rises, which tilts a straight line; fit the law through the clipping instead
    clipped = zeros and x.size >= 3 and bool(np.min(x / np.sqrt(np.maximum(y, 1e-12))) < CLIP_SIGMAS)
    if clipped:
        a, b = _fit_clipped(x, y, wt, a, float(b), rho)
    return a, float(b), clipped, curve


DRIFT_WINDOW = 63  # frame differences: their local mean over this window is drift, not noise
# a tile whose difference variance is over this many times its bin's median saw the scene change (a
# cell moved), not noise: pure noise of 64 pixels exceeds it in < 0.03 % of tiles even at rho 0.7
# (the mean then moves by < 0.05 %)
CHANGED_TILE = 3.0


def estimate_noise_frames(frames: list[np.ndarray], bins: int = 16) -> NoiseEstimate:
    """Fit the noise from several frames of one static field: differences of consecutive frames cancel
    the scene, so fine texture cannot pass for noise (the single-frame estimate's weakness).

    Per 8x8 tile and pair: the level is the pair's mean, the noise variance half the variance of the
    difference within the tile (a slow change such as bleaching moves the difference's mean, not its
    variance; it is taken out over DRIFT_WINDOW pixels). Tiles with a saturated pixel are left out.
    Tiles are binned by the mean of the *other* frames (3+ frames): its noise is independent of the
    pair's, so a bin's mean pair level is its tiles' true mean level (binned by their own noisy level,
    the many background tiles of a dim field, all of one true level, spread along the level axis at
    one variance and flatten the slope). A bin's variance is its tiles' mean (differences hold no
    structure to be robust against), the line keeps every bin, and the fit through clipping at 0 is
    the single-frame estimate's (`_fit_law`; consecutive frames' noise is independent); tiles where the
    scene changed (CHANGED_TILE) are left out of their bin's mean. rho is the
    lag-1 spatial correlation of the differences. Frames must be registered (a moving stage: register
    them first). Measured (benchmarks/calibration.py, 8 frames of 512x512 real-structure scenes: the
    dev FMD ground truths at their own photon level and a dim synthetic scene, 36 cameras each: gain
    0.5-20 ADU/e-, read 1-10 e-, 8/16 bit, white and correlated): wherever shot noise is >= 30 % of the
    variance at mid level, the gain within 3 % in all 96 cells (mean error 0.3-0.5 %; it was 19-35 % on
    the confocal and two-photon fields); where read noise swamps it (shot 3-10 %), the gain is off by
    ~11 % on average but the variance at mid level within ~1 %. On the dev FMD fields' 4 real
    exposures: 24.9 / 9.00 / 1.23 ADU/e- (confocal / two-photon / widefield) against 20.8 / 8.18 / 1.32
    from the raw - truth residual, a fit that itself ignores the clipping at 0 and 255.
    """
    if len(frames) < 2:
        raise ValueError("need at least 2 frames of one field")
    for f in frames:
        check_frame(f)
        if f.shape != frames[0].shape or f.dtype != frames[0].dtype:
            raise ValueError(f"frames differ in shape or dtype ({f.shape} {f.dtype} vs {frames[0].shape} "
                             f"{frames[0].dtype}): one field, one camera")
    h, w = (frames[0].shape[0] // TILE) * TILE, (frames[0].shape[1] // TILE) * TILE
    if h == 0 or w == 0:
        raise ValueError("frames too small to estimate their noise")
    white = float(np.iinfo(frames[0].dtype).max)
    ny, nx = h // TILE, w // TILE
    means = np.stack([np.asarray(f[:h, :w], np.float64).reshape(ny, TILE, nx, TILE).mean(axis=(1, 3)).ravel()
                      for f in frames])
    total = means.sum(axis=0)
    levels, keys, noise, lag_num, lag_den = [], [], [], 0.0, 0.0
    for i, (f0, f1) in enumerate(itertools.pairwise(frames)):
        a0, a1 = np.asarray(f0[:h, :w], np.float64), np.asarray(f1[:h, :w], np.float64)
        diff = a1 - a0
        # remove the difference's slow part (bleaching, a lamp drift) over ~64x64 pixels, not per tile:
        # a tile's own mean would take correlated noise's variance with it (10 % at rho 0.55)
        d = (diff - ndimage.uniform_filter(diff, DRIFT_WINDOW, mode="reflect")).reshape(ny, TILE, nx, TILE)
        level = (means[i] + means[i + 1]) / 2
        # bin by the other frames' level: its noise is independent of this pair's
        key = (total - means[i] - means[i + 1]) / (len(frames) - 2) if len(frames) > 2 else level
        peak = np.maximum(a0, a1).reshape(ny, TILE, nx, TILE).max(axis=(1, 3)).ravel()
        var = (d * d).sum(axis=(1, 3)).ravel() / (TILE * TILE) / 2.0
        ok = peak < white
        levels.append(level[ok])
        keys.append(key[ok])
        noise.append(var[ok])
        lag_num += float((d[:, :, :, 1:] * d[:, :, :, :-1]).sum())
        lag_den += float((d[:, :, :, 1:] ** 2).sum())
    m, n = np.concatenate(levels), np.concatenate(noise)
    if m.size < 16:
        raise ValueError("too few unsaturated regions to estimate the noise")
    rho = float(np.clip(lag_num / max(lag_den, 1e-12), 0.0, 0.95))
    # differences hold no structure: bins by the other frames' level, their tiles' mean variance, no drops
    a, b, clipped, curve = _fit_law(m, n, bins, 0.0, 1.0, by=np.concatenate(keys), robust=False,
                                    zeros=_has_zeros(frames))
    means = means.ravel()
    return NoiseEstimate(a, b, rho, float(np.quantile(means, 0.001)), float(np.median(means)), int(m.size),
                         clipped, len(frames), curve)


FIELD_FRAMES = 8  # still frames per multi-frame fit of a stream (benchmarks/calibration.py: gain within 3 %)
FIELD_SIDE = 256  # central crop a stream's multi-frame fit uses: 7 pairs x 1024 tiles, ~17 ms per fit (2-core EPYC)


class FieldNoise:
    """A stream's noise, from its own frames by `calibrate`'s estimator: central crops of consecutive
    still frames of one field (stage and scene unchanged, as the temporal average sees them) are
    collected, and every `frames` of them give one `estimate_noise_frames` fit. A frame that moved or
    changed, or has another shape or dtype, starts the collection afresh from itself. Core: numpy only."""

    def __init__(self, frames: int = FIELD_FRAMES, side: int = FIELD_SIDE) -> None:
        if frames < 2:
            raise ValueError("a multi-frame noise fit needs at least 2 frames")
        self.frames = frames
        self.side = side
        self.fits = 0  # estimates made
        self.failures = 0  # windows that could not be fitted (too few unsaturated tiles)
        self.latest: NoiseEstimate | None = None
        self._crops: list[np.ndarray] = []
        self._where: object = None

    def add(self, frame: np.ndarray, still: bool, where: object = None) -> None:
        """Keep this frame's central crop; `still`: it shows the same field as the previous frame of its
        stage position `where`, which must also be the previous frame added."""
        h, w = frame.shape
        y, x = max(0, (h - self.side) // 2), max(0, (w - self.side) // 2)
        crop = np.array(frame[y : y + self.side, x : x + self.side], copy=True)
        if self._crops and (not still or where != self._where or crop.shape != self._crops[0].shape
                            or crop.dtype != self._crops[0].dtype):
            self._crops.clear()
        self._where = where
        self._crops.append(crop)

    @property
    def due(self) -> bool:
        """A full window of still frames waits for its fit (`take`)."""
        return len(self._crops) >= self.frames

    def take(self) -> NoiseEstimate | None:
        """The fit of a full window (then a new window starts), else None; for the time between frames."""
        if not self.due:
            return None
        crops, self._crops = self._crops, []
        try:
            est = estimate_noise_frames(crops)
        except ValueError:
            self.failures += 1
            return None
        self.fits += 1
        self.latest = est
        return est


def _robust_line(x: np.ndarray, y: np.ndarray, wt: np.ndarray, spread: np.ndarray,
                 robust: bool = True) -> tuple[float, float, np.ndarray]:
    """Weighted line through the bins' noise variances, dropping bins that lie significantly above it.

    Structure that got past the flatness test only ever adds variance, and it gathers in the few
    bright bins (cell bodies), which carry the slope. Each bin's median has a relative standard
    error of 1.25 * spread / sqrt(tiles), spread being the tiles' relative spread (MAD): pooled over
    bins (the noise's own) to find bins above the line by more than 3 errors, and the bin's own
    (never below the pooled) to weigh the fit, so a bin whose tiles scatter widely counts less.
    """
    pooled = max(float(np.median(spread)), 1e-3)  # noise-free synthetic tiles scatter by nothing
    stderr = 1.2533 * pooled / np.sqrt(wt)
    weight = 1.0 / (1.2533 * np.maximum(spread, pooled) / np.sqrt(wt))
    use = np.ones(x.size, bool)
    for _ in range(4):
        if use.sum() >= 2 and np.ptp(x[use]) > 0:
            a, b = np.polyfit(x[use], y[use], 1, w=weight[use] / np.maximum(y[use], 1e-12))
        else:
            a, b = 0.0, float(np.median(y[use]))
        if a < 0:  # variance falling with the level: no slope to be had; the level-free law instead
            a, b = 0.0, float(np.average(y[use], weights=(weight[use] / np.maximum(y[use], 1e-12)) ** 2))
        a = float(a)
        pred = np.maximum(a * x + b, 1e-12)
        new = (y / pred - 1.0) <= 3.0 * stderr if robust else np.ones(x.size, bool)
        new[np.argsort(x)[: max(2, x.size // 2)]] = True  # the darker half of the bins always stays
        if np.array_equal(new, use):
            break
        use = new
    return a, float(b), use


def _clipped_moments(mu: np.ndarray, var: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Mean, variance and P(X > 0) of max(X, 0) for X ~ N(mu, var) (a normal censored at 0)."""
    s = np.sqrt(var)
    z = mu / s
    cdf = special.ndtr(z)
    pdf = np.exp(-0.5 * z * z) / math.sqrt(2 * math.pi)
    m = mu * cdf + s * pdf
    second = (mu * mu + var) * cdf + mu * s * pdf
    return m, np.maximum(second - m * m, 1e-12), cdf


_NODES, _WEIGHTS = np.polynomial.legendre.leggauss(48)


def _clipped_difference_variance(mu: np.ndarray, var: np.ndarray, rho: float) -> np.ndarray:
    """E[(max(X1, 0) - max(X2, 0))^2] / (2 (1 - rho)) for X1, X2 ~ N(mu, var) with correlation rho.

    What the difference-based estimate measures where the camera clips at 0: correlated neighbours are
    clipped together, so their differences shrink less than Var[max(X, 0)] says (equal at rho = 0).
    One Gauss-Legendre integral over X1 on each side of the kink at 0; X2 given X1 in closed form.
    """
    if rho <= 1e-6:
        return _clipped_moments(mu, var)[1]
    s = np.sqrt(var)[:, None]
    m0 = mu[:, None]
    lo, hi = m0 - 8 * s, m0 + 8 * s
    kink = np.clip(0.0, lo, hi)
    cs = s * math.sqrt(1 - rho * rho)  # std of X2 given X1
    total = np.zeros_like(mu, dtype=np.float64)
    for left, right in ((lo, kink), (kink, hi)):
        half = (right - left) / 2
        x = left + half * (_NODES[None, :] + 1)
        c = np.maximum(x, 0.0)
        m = m0 + rho * (x - m0)  # mean of X2 given X1 = x
        z = m / cs
        cdf = special.ndtr(z)
        pdf = np.exp(-0.5 * z * z) / math.sqrt(2 * math.pi)
        e1 = m * cdf + cs * pdf
        e2 = (m * m + cs * cs) * cdf + m * cs * pdf
        dens = np.exp(-0.5 * ((x - m0) / s) ** 2) / (s * math.sqrt(2 * math.pi))
        total += np.sum(_WEIGHTS[None, :] * half * (c * c - 2 * c * e1 + e2) * dens, axis=1)
    return np.maximum(total / (2 * (1 - rho)), 1e-12)


def _clipped_prediction(observed_mean: np.ndarray, a: float, b: float, rho: float = 0.0) -> np.ndarray:
    """Variance a clipped frame shows at each observed mean, if its noise law is var = a * mu + b: the
    pixels' variance (rho = 0), or what differences of neighbours with noise correlation rho measure."""
    floor = 1e-6 * max(abs(b), a * float(np.max(observed_mean)), 1e-6)
    mu = observed_mean.astype(np.float64).copy()
    for _ in range(40):  # Newton on the true mean: d E[max(X, 0)] / d mu = P(X > 0)
        m, _, cdf = _clipped_moments(mu, np.maximum(a * mu + b, floor))
        mu += (observed_mean - m) / np.maximum(cdf, 0.05)
    return _clipped_difference_variance(mu, np.maximum(a * mu + b, floor), rho)


def _fit_clipped(x: np.ndarray, y: np.ndarray, wt: np.ndarray, a0: float, b0: float,
                 rho: float = 0.0) -> tuple[float, float]:
    """(a, b) of var = a * mu + b such that the variance of the clipped noise matches each bin (Foi et al.
    2008 style, with the bins' robust variances): relative least squares, weighted by tiles per bin.
    The bins measured differences of neighbours, so the prediction does too (noise correlation rho)."""

    def residuals(p: np.ndarray) -> np.ndarray:
        return (_clipped_prediction(x, p[0], p[1], rho) / y - 1.0) * np.sqrt(wt)

    b_start = max(b0, float(np.min(y)) - a0 * float(np.min(x)))  # start from a law that is positive everywhere
    fit = optimize.least_squares(residuals, x0=[max(a0, 1e-6), b_start], bounds=([0.0, -np.inf], [np.inf, np.inf]),
                                 x_scale=[max(a0, 1e-3), max(abs(b_start), 1e-3)])
    return float(fit.x[0]), float(fit.x[1])


def _correlation_sum(rho: float) -> float:
    """Sum of the noise correlation over all 2D lags for a Gaussian-shaped correlation with lag-1 rho:
    how much more a smooth weighted sum (a slope) varies than under white noise."""
    if rho <= 0:
        return 1.0
    d = np.arange(-8, 9)
    return float(np.sum(rho ** (d * d)) ** 2)


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
    # rounding to integers adds white noise of QUANTIZATION variance after any correlation: take it out
    a = float(np.median(4 * d[0][keep] - d[1][keep])) - 3 * QUANTIZATION
    b = float(np.median(9 * d[0][keep] - d[2][keep])) - 8 * QUANTIZATION
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
    real = est.observed_variance(level) / scaling.span**2  # in the [0, 1] domain, as the frame shows it
    correlated = est.rho > CORRELATED
    ratio = CORRELATED_INJECTION_RATIO if correlated else REFERENCE_RATIO["white"]
    s = ratio * real / max(preset_variance(p, x), 1e-12)  # variance scale factor
    return p.with_noise(k_g=p.k_g * math.sqrt(s), k_p=p.k_p / s, lambda_p=p.lambda_p / s, name=f"auto({p.name})",
                        rho=min(est.rho, MAX_RHO) if correlated else 0.0)


def estimate_noise_or_none(frame: np.ndarray) -> NoiseEstimate | None:
    """`estimate_noise`, or None for frames too structured or too small to fit."""
    try:
        return estimate_noise(frame)
    except ValueError:
        return None


def auto_base(est: NoiseEstimate) -> str:
    """The paper preset whose structure suits this noise: widefield for correlated noise, else confocal."""
    return "widefield" if est.rho > CORRELATED else "confocal"


def auto_preset(frame: np.ndarray, base: str | None = None, est: NoiseEstimate | None = None) -> Preset:
    """FM2S parameters for this frame from its noise (`--preset auto`): `est` where the caller has an
    estimate (e.g. a stream's `FieldNoise`), else the frame's own single-frame estimate.

    Falls back to the base (or confocal) paper preset when the frame has too few flat regions to fit.
    """
    est = est if est is not None else estimate_noise_or_none(frame)
    if est is None:
        return get_preset(base or "confocal")
    return fm2s_parameters(est, frame, base or auto_base(est))


def gain_bound(levels: np.ndarray, a: float, b: float, pixels: float = 1.0) -> float:
    """The smallest relative standard deviation any unbiased estimate of the gain `a` can have from
    pixels at these mean `levels` (each standing for `pixels` pixels) with noise var = a * level + b:
    the Cramer-Rao bound for Gaussian pixels whose levels are known exactly. Real estimators must also
    find the scene, so they do worse; where read noise swamps the shot noise of a dim scene this bound
    alone is far above 10 % (benchmarks/calibration.py), and only more frames can pin the gain. The
    variance is taken as at least one electron's (a^2): fainter pixels count single photons, which a
    Gaussian does not describe (a law fitted through clipping would otherwise claim noise-free levels)."""
    lv = np.asarray(levels, np.float64).ravel()
    var = np.maximum(a * lv + b, max(a * a, QUANTIZATION))
    g = np.stack([lv, np.ones_like(lv)]) / var  # d var / d(a, b), over var
    info = pixels / 2.0 * (g @ g.T)  # Fisher information of (a, b)
    scale = 1.0 / np.sqrt(np.maximum(np.diag(info), 1e-300))
    if abs(a) < 1e-12 or lv.size == 0 or np.linalg.cond(info * np.outer(scale, scale)) > 1e10:
        return math.inf  # one level (or none): the gain and the read noise cannot be told apart
    return float(math.sqrt(max(np.linalg.inv(info)[0, 0], 0.0)) / abs(a))


def frame_gain_bound(frames: list[np.ndarray], a: float, b: float) -> float:
    """`gain_bound` for these frames of one field with noise law (a, b): its 8x8 tile means stand for the
    levels, saturated tiles carry nothing, and n frames hold n times one frame's information."""
    frame = frames[0]
    h, w = (frame.shape[0] // TILE) * TILE, (frame.shape[1] // TILE) * TILE
    stats = tile_stats(np.ascontiguousarray(frame[:h, :w]), TILE)
    unsaturated = stats[:, 3] < float(np.iinfo(frame.dtype).max)
    return gain_bound(stats[unsaturated, 0], a, b, TILE * TILE * len(frames))


def calibrate(frames: np.ndarray | list[np.ndarray], base: str = "confocal",
              offset: float | None = None) -> dict[str, Any]:
    """The noise law of one field and the derived FM2S parameters, as a JSON-ready dict (what
    `calibrate --json` prints). One frame: the single-frame estimate; several (or a stack of them):
    `estimate_noise_frames`. The law is var = a * (level - offset) + b in ADU: a is the gain (ADU/e-),
    b the read-noise variance (ADU^2). `offset` is the camera's (ADU); without it the darkest 0.1 %
    of the frame's 8x8 means stand in for it (an upper bound: background light adds to them), and b
    and the read noise depend on that guess (`offset_estimated`). `gain_sd_bound`: the relative standard
    deviation below which no estimate of the gain from these frames can go (`frame_gain_bound`; None
    where their levels cannot tell the gain at all)."""
    planes = [frames] if isinstance(frames, np.ndarray) and frames.ndim == 2 else list(frames)
    est = estimate_noise(planes[0]) if len(planes) == 1 else estimate_noise_frames(planes)
    guessed = offset is None
    off = est.black if offset is None else float(offset)
    bound = frame_gain_bound(planes, est.a, est.b)
    b_read = est.b + est.a * off  # var = a * level + b_cam  ==  a * (level - off) + (b_cam + a * off)
    preset = fm2s_parameters(est, planes[0], base)
    return {"a": est.a, "gain_adu_per_e": est.a, "b": b_read, "offset": off, "offset_estimated": guessed,
            "read_noise_e": math.sqrt(max(b_read, 0.0)) / max(est.a, 1e-12),
            "read_noise_adu": math.sqrt(max(b_read, 0.0)), "rho": est.rho, "frames": est.frames,
            "method": "single frame" if est.frames == 1 else "frame differences", "clipped": est.clipped,
            "gain_sd_bound": bound if math.isfinite(bound) else None,  # None: the levels cannot tell the gain
            "median_level": est.median_level, "tiles_used": est.tiles_used,
            "law": "var = a * (level - offset) + b (ADU)", "fm2s": asdict(preset),
            "ptc": [list(row) for row in est.bins]}


def _precision(bound: float | None, frames: int) -> str:
    """The gain line's note on how well these frames can pin it at best."""
    if bound is None:
        return "  (these levels cannot tell the gain at all: no shot noise to see)"
    text = f"  (no estimate from {'this frame' if frames == 1 else 'these frames'} is surer than +-{100 * bound:.2g} %"
    if bound > GAIN_PINNED:
        needed = math.ceil(frames * (bound / GAIN_PINNED) ** 2)
        return text + f": read noise swamps the shot noise; pinning it within 10 % takes {needed}+ frames)"
    return text + ")"


def calibration_table(report: dict[str, Any]) -> str:
    """`calibrate`'s report as the readable lines `fm2s-stream calibrate` prints by default."""
    r, p = report, report["fm2s"]
    how = ("one frame (texture can pass for noise: several frames of the field are better)" if r["frames"] == 1
           else f"{r['frames']} frames, from their differences (the scene cancels)")
    lines = [
        f"  estimated from     {how}",
        f"  gain               {r['a']:.4g} ADU/e-" + _precision(r["gain_sd_bound"], r["frames"]),
        f"  offset             {r['offset']:.4g} ADU"
        + ("  (a guess: the darkest regions; pass --offset for the camera's)" if r["offset_estimated"] else ""),
        f"  read noise         {r['read_noise_e']:.3g} e- = {r['read_noise_adu']:.3g} ADU",
        f"  noise correlation  {r['rho']:.3f} (neighbouring pixels, lag 1)",
        f"  law                var = {r['a']:.4g} * (level - {r['offset']:.4g}) + {r['b']:.4g} ADU^2"
        + ("  (fitted through the clipping at 0)" if r["clipped"] else ""),
        f"  FM2S parameters    {p['name']}: k_g {p['k_g']:.4g}, k_p {p['k_p']:.4g}, lambda_p {p['lambda_p']:.4g} "
        f"(n_chan {p['n_chan']}, median window {p['w_size']}, tile {p['stride']})",
    ]
    return "\n".join(lines)
