"""TemporalAverage: a motion-compensated, change-adaptive running average of a channel's outputs.

A single-frame denoiser leaves frame-to-frame flicker: on a static field each output still carries
~0.4x the raw noise, re-drawn every frame. Pixels that show the same thing as before are therefore
averaged recursively over up to `max_frames` frames (weight 1/n, n capped), which cuts the flicker
by ~sqrt(2 max_frames - 1) and leaves their photometry unbiased.

Motion: before averaging, the history is registered to the current frame (global translation to a
fraction of a pixel, `registration.subpixel_shift`), so a drifting stage or a panning field keeps
its average instead of being smeared or restarted. The history is kept on its own pixel grid, offset
from the current frame by less than a pixel (`frac`); whole-pixel moves shift it losslessly, and only
the difference between history and current frame is interpolated, so the current frame's detail is
never resampled and interpolation blur never compounds over frames.

Change: a pixel restarts from the current frame when its raw value, averaged over 3x3 (or, for
faint extended changes, over ~9x9 or ~30x30), leaves its running raw average by more than
`threshold` standard deviations of the expected noise at that scale; the decision is dilated by one
pixel. The expected noise is a Poisson-Gaussian line (variance = a * level + b) of the 3x3 raw mean,
the camera's noise law (`calibrate`: one frame's fit as a first guess, then the owner's multi-frame
fits of still frames, `FieldNoise`, the estimator `fm2s-stream calibrate` uses) through the 3x3 mean
of noise of its spatial correlation, times a robust spread learnt per scale on frames that barely
changed. When most of the field changes (a new scene), or no registration is found, everything
restarts. `still` tells the owner whether the latest frame showed the same field as the one before.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numba
import numpy as np
import torch

from .calibrate import FieldNoise, NoiseEstimate, estimate_noise_or_none
from .noise import box_mean_variance
from .ops import (
    BOX3,
    BOX7,
    filter_then_shift,
    halve,
    host_kernels,
    one_thread,
    separable,
    shift_fraction,
)
from .registration import subpixel_shift
from .stages import StageClock

__all__ = ["TemporalAverage", "average_series"]

SCENE_CHANGE = 0.3  # fraction of changed pixels above which the whole field restarts
SNAP = 0.05  # sub-pixel offsets below this (pixels) are not worth an interpolation
STILL_CHANGE = 0.05  # a frame with fewer pixels changed (3x3 scale) than this fraction counts as still ...
# ... and registered less than this far from its previous frame (pixels): on still fields of the FMD
# ground truths at a few photons per pixel, registration's jitter alone reaches 0.04-0.1 px (p90); a real
# move of 0.1 px adds < 4 % to the frame-difference variance of a bright tile's sharp edge
STILL_SHIFT = 0.1
SPREAD_SAMPLES = 16384  # samples per scale for a frame's robust spread (every 4th pixel of a 512x512 frame)


def _variance_factor(kernel_1d: np.ndarray) -> float:
    """White-noise variance of a separable region mean of the 3x3-averaged frame, relative to the 3x3 mean."""
    k = np.convolve(BOX3, kernel_1d)
    return float((np.sum(k**2) / np.sum(BOX3**2)) ** 2)


# the three scales of change detection: 3x3, ~9x9 (box3 then box7) and ~30x30 (4x4 blocks, then box7)
WIDE_VARIANCE = _variance_factor(BOX7)
REGION_VARIANCE = _variance_factor(np.full(28, 1 / 28))


@numba.njit(parallel=True, cache=True)
def _residuals_numba(box: np.ndarray, raw: np.ndarray, count: np.ndarray, a: float, b: float,
                     modelled: bool) -> tuple[np.ndarray, np.ndarray]:  # pragma: no cover - compiled
    """The fused CPU kernel of `_residuals` (one pass instead of ten)."""
    h, w = box.shape
    diff = np.empty((h, w), np.float32)
    sd = np.empty((h, w), np.float32)
    for i in numba.prange(h):
        for j in range(w):
            n = count[i, j]
            diff[i, j] = 0.0 if n < 1 else box[i, j] - raw[i, j]
            if modelled:
                sd[i, j] = np.sqrt(max(a * raw[i, j] + b, 1e-6) * (1.0 + 1.0 / max(n, 1.0)))
            else:
                sd[i, j] = 1.0
    return diff, sd


@numba.njit(parallel=True, cache=True)
def _update_numba(changed: np.ndarray, box: np.ndarray, out: np.ndarray, raw: np.ndarray, avg: np.ndarray,
                  count: np.ndarray, max_frames: float) -> float:  # pragma: no cover - compiled
    """The fused CPU kernel of `_update`, the mask's dilation included, in place; returns the mean count."""
    h, w = box.shape
    sums = np.zeros(h, np.float64)
    for i in numba.prange(h):
        up, down = max(i - 1, 0), min(i + 1, h - 1)
        column = np.empty(w + 2, np.bool_)  # the mask ORed over rows i-1..i+1, edges repeated
        for j in range(w):
            column[j + 1] = changed[up, j] or changed[i, j] or changed[down, j]
        column[0], column[w + 1] = column[1], column[w]
        s = 0.0
        for j in range(w):
            restart = column[j] or column[j + 1] or column[j + 2]
            n = np.float32(1.0) if restart else min(count[i, j] + np.float32(1.0), np.float32(max_frames))
            alpha = np.float32(1.0) / n
            raw[i, j] += alpha * (box[i, j] - raw[i, j])
            avg[i, j] += alpha * (out[i, j] - avg[i, j])
            count[i, j] = n
            s += n
        sums[i] = s
    return sums.sum() / (h * w)


@numba.njit(parallel=True, cache=True)
def _hits_numba(diff: np.ndarray, sd: np.ndarray, d9: np.ndarray, wide: np.ndarray, c9: np.float32,
                t3: np.float32, t9: np.float32, t30: np.float32, has_wide: bool,
                count: np.ndarray) -> tuple[np.ndarray, np.ndarray]:  # pragma: no cover - compiled
    """The fused CPU kernel of `_hits`: all three scales' tests in one pass (float32 as torch does them).

    Thresholds scale the noise std instead of dividing by it, and the coarse scale's test runs as a
    second loop over the row, so both loops vectorise (2048x2048: 7.4 -> 3.8 ms).
    """
    h, w = diff.shape
    hw, ww = wide.shape
    changed = np.empty((h, w), np.bool_)
    per_row = np.zeros((h, 3), np.int64)
    t9c = t9 * c9
    for i in numba.prange(h):
        coarse = wide[min(i // 4, hw - 1)]
        n3 = 0
        n9 = 0
        n30 = 0
        for j in range(w):
            s = sd[i, j]
            a = abs(diff[i, j]) > t3 * s
            b = abs(d9[i, j]) > t9c * s
            n3 += a
            n9 += b
            changed[i, j] = count[i, j] < 1 or a or b
        if has_wide:
            for j in range(w):
                c = abs(coarse[min(j // 4, ww - 1)]) > t30
                n30 += c
                changed[i, j] = changed[i, j] or c
        per_row[i, 0] = n3
        per_row[i, 1] = n9
        per_row[i, 2] = n30
    return changed, per_row.sum(axis=0)


@dataclass
class _State:
    raw: torch.Tensor  # running average of the 3x3-averaged raw frame (camera units, float32)
    out: torch.Tensor  # running average of the denoised frame
    count: torch.Tensor  # frames in each pixel's average (0: no history yet)
    frac: tuple[float, float] = (0.0, 0.0)  # history pixel i shows the current frame's position i + frac


class TemporalAverage:
    """Per stage position: align, then average what did not change over consecutive denoised frames.

    Frames are (H, W) float32 tensors in camera units, on any device; everything stays there.
    """

    def __init__(self, max_frames: int = 8, threshold: float = 4.0, max_positions: int = 32,
                 motion: bool = True, clock: StageClock | None = None) -> None:
        if max_frames < 1:
            raise ValueError("max_frames must be >= 1")
        self.max_frames = max_frames
        self.threshold = threshold
        self.max_positions = max_positions  # bounds memory: least recently seen positions are forgotten
        self.motion = motion  # register the history to each frame (off: a static field is assumed)
        self.noise: tuple[float, float] | None = None  # (a, b): variance of the 3x3 raw mean = a * level + b
        self.frames = 0
        self.scene_changes = 0
        # the latest frame's shift from its position's previous frame (cur[y] ~ prev[y - shift]) where
        # registration measured it, else None (no history, a scene change, registration off)
        self.measured_shift: tuple[float, float] | None = None
        self.spread: dict[str, float] = {}  # per scale: robust std of the normalised difference, static frames
        self.still = False  # the latest frame showed its position's previous field, unmoved and unchanged
        self._states: dict[tuple[int, int], _State] = {}
        self.clock = clock or StageClock(torch.device("cpu"))  # times registration apart from averaging
        self.torch_only = False  # True: the torch kernels on the CPU too (tests compare them with the fused ones)

    def reset(self) -> None:
        """Forget every position's history (shape change, model reset)."""
        self._states.clear()
        self.still = False

    def seed_noise(self, est: NoiseEstimate | None) -> None:
        """First guess of the noise (a single-frame camera fit), where there is none yet."""
        if est is not None and self.noise is None:
            self.set_noise(est)

    def set_noise(self, est: NoiseEstimate) -> None:
        """The 3x3-mean noise from a camera noise law (a newer fit, e.g. `FieldNoise`'s, replaces the
        older): var(3x3 mean) = var(pixel) x the 3x3 mean's share under the law's correlation rho."""
        share = box_mean_variance(est.rho, 3)
        a, b = est.a * share, max(est.b, 1e-6 - est.a * est.black) * share  # positive at the black level
        if np.isfinite(a) and np.isfinite(b):
            self.noise = (a, b)

    def apply(self, raw: torch.Tensor, denoised: torch.Tensor, position: tuple[int, int] = (0, 0)) -> tuple[
        torch.Tensor, float
    ]:
        """(averaged denoised frame, float32 on its device; mean number of frames averaged per pixel)."""
        out = denoised.float()
        self.measured_shift = None
        self.still = False
        if self.max_frames == 1:
            return out, 1.0
        self.frames += 1
        if self.noise is None and self.frames == 1:  # nobody seeded it: fit the first frame (a central crop)
            self.seed_noise(estimate_noise_or_none(_central_crop(raw)))
        raw = raw.float()
        state = self._states.pop(position, None)
        if state is not None:
            self._states[position] = state  # most recently seen last
        if state is None or state.out.shape != out.shape:
            return self._restart(position, raw, out)
        self.clock.lap("averaging")
        with one_thread(out.device.type == "cpu"):  # small operations: see ops.one_thread
            shift = self._register(state, out)
        if shift is None:
            self.clock.lap("registration")
            self.scene_changes += 1
            return self._restart(position, raw, out)
        self._move(state, shift)  # whole-frame copies: on all threads where the caller allows them
        self.clock.lap("registration")
        fy, fx = state.frac
        # the 3x3 raw mean and the denoised frame on the history's grid (the 3x3 mean and its shift in one pass)
        box_h = filter_then_shift(raw, BOX3, BOX3, -fy, -fx, self.torch_only)
        out_h = shift_fraction(out, -fy, -fx, self.torch_only)
        changed, fine = self._changed(box_h, state)
        if fine > SCENE_CHANGE:
            self.scene_changes += 1
            return self._restart(position, raw, out)
        moved = max(map(abs, self.measured_shift)) if self.measured_shift is not None else 0.0  # motion off: 0
        self.still = fine < STILL_CHANGE and moved < STILL_SHIFT
        mean_count = self._update(changed, box_h, out_h, state)
        if not fy and not fx:
            return state.out.clone(), mean_count
        # the current frame as it is, plus the history's difference from it brought to its grid
        return out + shift_fraction(state.out - out_h, fy, fx, self.torch_only), mean_count

    def _update(self, changed: torch.Tensor, box: torch.Tensor, out: torch.Tensor, state: _State) -> float:
        """Restart changed pixels and their 8 neighbours (edges repeated), average the rest (weight
        1 / count, count capped); the mean count. On the CPU the dilation is fused into the update."""
        if host_kernels(state.raw, self.torch_only):
            return float(_update_numba(changed.numpy(), box.contiguous().numpy(), out.contiguous().numpy(),
                                       state.raw.numpy(), state.out.numpy(), state.count.numpy(),
                                       float(self.max_frames)))
        changed = separable(changed.float(), BOX3, BOX3, self.torch_only) > 0
        count = torch.where(changed, 1.0, torch.clamp(state.count + 1, max=float(self.max_frames)))
        alpha = 1.0 / count
        state.raw += alpha * (box - state.raw)
        state.out += alpha * (out - state.out)
        state.count = count
        return float(count.mean())

    def _residuals(self, box: torch.Tensor, state: _State) -> tuple[torch.Tensor, torch.Tensor]:
        """(3x3 raw mean - its running average, 0 where there is no history; the noise std of that)."""
        modelled = self.noise is not None
        a, b = self.noise if self.noise is not None else (0.0, 0.0)
        if host_kernels(box, self.torch_only):
            d, s = _residuals_numba(box.contiguous().numpy(), state.raw.numpy(), state.count.numpy(),
                                    float(a), float(b), modelled)
            return torch.from_numpy(d), torch.from_numpy(s)
        diff = torch.where(state.count < 1, 0.0, box - state.raw)
        if not modelled:
            return diff, torch.ones_like(diff)
        sd = torch.sqrt(torch.clamp(a * state.raw + b, min=1e-6) * (1.0 + 1.0 / torch.clamp(state.count, min=1)))
        return diff, sd

    def _restart(self, position: tuple[int, int], raw: torch.Tensor, out: torch.Tensor) -> tuple[torch.Tensor, float]:
        """Start this position's average afresh from the current frame (oldest positions forgotten)."""
        box = separable(raw, BOX3, BOX3, self.torch_only)
        self._states[position] = _State(box, out.clone(), torch.ones_like(out))
        while len(self._states) > self.max_positions:
            self._states.pop(next(iter(self._states)))
        return out, 1.0

    def _register(self, state: _State, out: torch.Tensor) -> tuple[float, float] | None:
        """The history's shift to the current frame ((0, 0) without motion); None if no match is found."""
        if not self.motion:
            return (0.0, 0.0)
        h, w = out.shape
        return subpixel_shift(out, state.out, max_shift=min(h, w) / 4, torch_only=self.torch_only)

    def _move(self, state: _State, shift: tuple[float, float]) -> None:
        """Bring the history to the current frame: whole pixels by copying, the fraction kept in `frac`."""
        # history pixel j shows the current frame's position j + shift, and showed the previous frame's
        # position j + its frac
        if self.motion:
            self.measured_shift = (shift[0] - state.frac[0], shift[1] - state.frac[1])
        whole = (round(shift[0]), round(shift[1]))
        frac = tuple(0.0 if abs(t - n) < SNAP else t - n for t, n in zip(shift, whole))
        state.frac = (float(frac[0]), float(frac[1]))
        if whole != (0, 0):
            for name in ("raw", "out", "count"):
                setattr(state, name, _roll(getattr(state, name), whole, self.torch_only))

    def _changed(self, box: torch.Tensor, state: _State) -> tuple[torch.Tensor, float]:
        """Pixels whose 3x3 (~9x9, ~30x30) raw mean left its running average by more than the noise
        explains, and pixels without history; and the fraction of the frame changed at 3x3 (the
        coarser scales mark the surroundings of any local change, so they do not decide scene changes).

        Each scale's threshold comes from its robust spread (learnt on static frames; this frame's is
        measured on one sample per 4x4 block), so the thresholds are known before the one pass that
        marks the hits of all scales at once (`_hits`).
        """
        diff, sd = self._residuals(box, state)
        h, w = diff.shape
        d9 = separable(diff, BOX7, BOX7)
        c9 = WIDE_VARIANCE**0.5
        k = _sample_step(h, w)
        samples = [("3x3", diff[::k, ::k] / sd[::k, ::k]), ("9x9", d9[::k, ::k] / (sd[::k, ::k] * c9))]
        wide = None
        if min(h, w) >= 64:
            quarter = lambda a: halve(halve(a))  # noqa: E731 - 4x4 block means
            wide = separable(quarter(diff), BOX7, BOX7) / (quarter(sd) * REGION_VARIANCE**0.5)
            rows = torch.clamp(torch.arange(0, h, k, device=diff.device) // 4, max=wide.shape[0] - 1)
            cols = torch.clamp(torch.arange(0, w, k, device=diff.device) // 4, max=wide.shape[1] - 1)
            samples.append(("30x30", wide[rows][:, cols]))
        currents, spreads, finer = [], [], 1.0
        for scale, z in samples:
            current = 1.4826 * float(z.abs().median())
            if self.noise is not None:
                # correlated noise and model error only ever add spread, and more so at coarser scales;
                # a coarse scale has few independent samples per frame, so its estimate is floored
                current = min(max(current, finer), 5.0)
            spread = self.spread.get(scale, current)
            finer = spread
            currents.append(current)
            spreads.append(spread)
        thresholds = [self.threshold * max(sp, 1e-12) for sp in spreads] + [0.0] * (3 - len(spreads))
        changed, counts = self._hits(diff, sd, d9, wide, thresholds, c9, state.count)
        quiet, fine = True, 0.0
        for (scale, _), current, spread, count in zip(samples, currents, spreads, counts):
            fraction = count / diff.numel()
            fine = fraction if scale == "3x3" else fine
            quiet = quiet and fraction < STILL_CHANGE
            if quiet:  # a (nearly) static frame teaches what the noise looks like at this scale
                self.spread[scale] = current if scale not in self.spread else 0.9 * spread + 0.1 * current
        return changed, fine

    def _hits(self, diff: torch.Tensor, sd: torch.Tensor, d9: torch.Tensor, wide: torch.Tensor | None,
              thresholds: list[float], c9: float, count: torch.Tensor) -> tuple[torch.Tensor, list[int]]:
        """(pixels without history or beyond a scale's threshold; the number of hits per scale)."""
        if host_kernels(diff, self.torch_only):
            small = wide if wide is not None else torch.zeros((1, 1))
            mask, n = _hits_numba(diff.numpy(), sd.numpy(), d9.numpy(), small.contiguous().numpy(), np.float32(c9),
                                  np.float32(thresholds[0]), np.float32(thresholds[1]), np.float32(thresholds[2]),
                                  wide is not None, count.numpy())
            return torch.from_numpy(mask), [int(v) for v in n[: 3 if wide is not None else 2]]
        hits = [diff.abs() > thresholds[0] * sd, d9.abs() > (thresholds[1] * c9) * sd]
        if wide is not None:
            hits.append(_expand(wide, diff.shape).abs() > thresholds[2])
        changed = count < 1
        for hit in hits:
            changed |= hit
        return changed, [int(torch.count_nonzero(hit)) for hit in hits]


def _sample_step(h: int, w: int) -> int:
    """Pixel step of the samples a frame's robust spread is measured on: every 4th, coarser on large
    frames so that ~16k are taken: a median of 16k values takes 0.05 ms here, of 65k (1024x1024) 1.0 ms."""
    return 4 * max(1, round(math.sqrt(h * w / (16 * SPREAD_SAMPLES))))


def _central_crop(raw: torch.Tensor, side: int = 512) -> np.ndarray:
    """The central side x side window of a camera frame, as an integer numpy array for `estimate_noise`."""
    h, w = raw.shape
    y, x = max(0, (h - side) // 2), max(0, (w - side) // 2)
    window = raw[y : y + side, x : x + side].cpu().numpy()
    return window if window.dtype.kind == "u" else np.clip(np.rint(window), 0, 65535).astype(np.uint16)


def _expand(small: torch.Tensor, shape: tuple[int, int] | torch.Size) -> torch.Tensor:
    """Blocks of 4x4 back to full resolution (nearest; edges repeated where the shape is not a multiple of 4)."""
    big = small.repeat_interleave(4, dim=0).repeat_interleave(4, dim=1)
    ph, pw = shape[0] - big.shape[0], shape[1] - big.shape[1]
    if ph or pw:
        big = torch.nn.functional.pad(big[None, None], (0, pw, 0, ph), mode="replicate")[0, 0]
    return big


@numba.njit(parallel=True, cache=True)
def _roll_numba(a: np.ndarray, dy: int, dx: int) -> np.ndarray:  # pragma: no cover - compiled
    """`_roll` in one pass (torch.roll and four fills take five: 1.3 vs 0.6 ms at 1024x1024)."""
    h, w = a.shape
    out = np.zeros((h, w), a.dtype)
    for i in numba.prange(max(dy, 0), h + min(dy, 0)):
        for j in range(max(dx, 0), w + min(dx, 0)):
            out[i, j] = a[i - dy, j - dx]
    return out


def _roll(a: torch.Tensor, shift: tuple[int, int], torch_only: bool = False) -> torch.Tensor:
    """`a` moved by whole pixels (out[y] = a[y - shift]); what enters from outside is 0 (count 0: no history)."""
    if host_kernels(a, torch_only):
        return torch.from_numpy(_roll_numba(a.contiguous().numpy(), int(shift[0]), int(shift[1])))
    out = torch.roll(a, shift, dims=(0, 1))
    dy, dx = shift
    out[: max(dy, 0)] = 0
    out[out.shape[0] + min(dy, 0) :] = 0
    out[:, : max(dx, 0)] = 0
    out[:, out.shape[1] + min(dx, 0) :] = 0
    return out


def average_series(raw: list[np.ndarray], denoised: list[np.ndarray], max_frames: int = 8, threshold: float = 4.0,
                   non_causal: bool = True) -> list[np.ndarray]:
    """The registered temporal average over a stored series of one channel and position (float32 out).

    Causal: each frame averages with its past, as the stream does. Non-causal: also with its future:
    the series is averaged forwards and backwards and each pixel combines both,
    (n_f * fwd + n_b * bwd - frame) / (n_f + n_b - 1), n_f, n_b its frames averaged each way (the
    frame itself is in both), so a change restarts the average on both sides of it.
    """
    def one_way(order: list[int]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        avg, field = TemporalAverage(max_frames, threshold), FieldNoise()
        outs: list[torch.Tensor] = [torch.empty(0)] * len(order)
        counts: list[torch.Tensor] = [torch.empty(0)] * len(order)
        for i in order:
            r = torch.from_numpy(np.ascontiguousarray(raw[i], dtype=np.float32))
            d = torch.from_numpy(np.ascontiguousarray(denoised[i], dtype=np.float32))
            outs[i], _ = avg.apply(r, d)
            if raw[i].dtype in (np.uint8, np.uint16):  # the noise law from the still frames, as the stream does
                field.add(raw[i], avg.still)
                fitted = field.take()
                if fitted is not None:
                    avg.set_noise(fitted)
            state = avg._states.get((0, 0))
            counts[i] = state.count.clone() if state is not None and max_frames > 1 else torch.ones_like(d)
        return outs, counts

    fwd, n_f = one_way(list(range(len(raw))))
    if not non_causal:
        return [f.numpy() for f in fwd]
    bwd, n_b = one_way(list(range(len(raw)))[::-1])
    result = []
    for i, d in enumerate(denoised):
        cur = torch.from_numpy(np.ascontiguousarray(d, dtype=np.float32))
        result.append(((n_f[i] * fwd[i] + n_b[i] * bwd[i] - cur) / (n_f[i] + n_b[i] - 1)).numpy())
    return result
