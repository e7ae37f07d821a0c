"""TemporalAverage: a motion-adaptive running average of a channel's denoised frames.

A single-frame denoiser leaves frame-to-frame flicker: on a static field each output still carries
~0.4x the raw noise, re-drawn every frame. Static pixels are therefore averaged recursively over up
to `max_frames` frames (weight 1/n, n capped), which cuts the flicker by ~sqrt(2 max_frames - 1).
Nothing that changes is averaged: a pixel restarts from the current frame when its raw value,
averaged over 3x3, differs from its running raw average by more than `threshold` standard deviations
of the expected noise (camera Poisson-Gaussian variance, re-fitted from the frames every
`refit_every` frames, times the robust spread of the normalised differences, learnt on frames that
barely changed, so that correlated noise and model error do not trigger it); the decision is
dilated by one pixel. When most of the field changes (a stage move,
a new scene) every pixel restarts. The average is unbiased for static pixels, so photometry holds.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from .calibrate import estimate_noise

__all__ = ["TemporalAverage"]

SCENE_CHANGE = 0.3  # fraction of changed pixels above which the whole field restarts


@dataclass
class _State:
    raw: np.ndarray  # running average of the 3x3-averaged raw frame (camera units, float32)
    out: np.ndarray  # running average of the denoised frame
    count: np.ndarray  # frames in each pixel's average (1..max_frames)


class TemporalAverage:
    """Per stage position: average static pixels of consecutive denoised frames, restart on change."""

    def __init__(self, max_frames: int = 8, threshold: float = 4.0, refit_every: int = 16,
                 max_positions: int = 32) -> None:
        if max_frames < 1:
            raise ValueError("max_frames must be >= 1")
        self.max_frames = max_frames
        self.threshold = threshold
        self.refit_every = refit_every
        self.max_positions = max_positions  # bounds memory: least recently seen positions are forgotten
        self.noise: tuple[float, float] | None = None  # (a, b): var = a * v + b, smoothed over refits
        self.frames = 0
        self.scene_changes = 0
        self.spread: float | None = None  # robust std of the normalised difference on static frames
        self._states: dict[tuple[int, int], _State] = {}

    def reset(self) -> None:
        """Forget every position's history (shape change, model reset)."""
        self._states.clear()

    def apply(self, raw: np.ndarray, denoised: np.ndarray, position: tuple[int, int] = (0, 0)) -> tuple[
        np.ndarray, float
    ]:
        """(averaged denoised frame as float32, mean number of frames averaged per pixel)."""
        self.frames += 1
        self._refit(raw)
        box = ndimage.uniform_filter(raw.astype(np.float32), 3, mode="reflect")
        out = denoised.astype(np.float32)
        state = self._states.pop(position, None)
        if state is not None:
            self._states[position] = state  # most recently seen last
        if state is None or state.out.shape != out.shape or self.max_frames == 1:
            return self._restart(position, box, out)
        changed = self._changed(box, state)
        if changed.mean() > SCENE_CHANGE:
            self.scene_changes += 1
            return self._restart(position, box, out)
        count = np.where(changed, np.float32(1), np.minimum(state.count + 1, np.float32(self.max_frames)))
        alpha = 1.0 / count
        state.raw += alpha * (box - state.raw)
        state.out += alpha * (out - state.out)
        state.count = count
        return state.out.copy(), float(count.mean())

    def _restart(self, position: tuple[int, int], box: np.ndarray, out: np.ndarray) -> tuple[np.ndarray, float]:
        """Start this position's average afresh from the current frame (oldest positions forgotten)."""
        self._states[position] = _State(box, out.copy(), np.ones(out.shape, np.float32))
        while len(self._states) > self.max_positions:
            self._states.pop(next(iter(self._states)))
        return out, 1.0

    def _refit(self, raw: np.ndarray) -> None:
        if self.noise is not None and self.frames % self.refit_every != 1:
            return
        try:
            est = estimate_noise(raw)
        except ValueError:  # too structured to fit: keep the previous model
            return
        new = (est.a, max(est.b, 1e-6 - est.a * est.black))
        if not all(np.isfinite(new)):
            return
        old = self.noise
        self.noise = new if old is None else (0.7 * old[0] + 0.3 * new[0], 0.7 * old[1] + 0.3 * new[1])

    def _changed(self, box: np.ndarray, state: _State) -> np.ndarray:
        """Pixels whose 3x3 raw mean left their running average by more than the noise explains."""
        diff = box - state.raw
        if self.noise is not None:
            a, b = self.noise
            var = np.maximum(a * state.raw + b, 1e-6) / 9.0 * (1.0 + 1.0 / state.count)
            z = diff / np.sqrt(var)
        else:
            z = diff
        current = 1.4826 * float(np.median(np.abs(z[::4, ::4])))
        if self.noise is not None:
            current = min(max(current, 1.0), 3.0)  # correlated noise / model error, never below the model
        spread = current if self.spread is None else self.spread
        changed = np.abs(z) > self.threshold * max(spread, 1e-12)
        if changed.mean() < 0.05:  # a (nearly) static frame: it teaches what the noise looks like
            self.spread = current if self.spread is None else 0.9 * self.spread + 0.1 * current
        return ndimage.binary_dilation(changed, structure=np.ones((3, 3), bool))
