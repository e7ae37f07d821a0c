"""Scientific-fidelity measures of a denoised stream: photometry, clipping, flicker and drift.

All measures compare float camera units. Photometry is a relative mean error over a region, both
in camera units as recorded (ADU, offset included) and above a given offset (the signal itself,
the stricter figure). Regions are regions of interest as a microscopist draws them, larger than the
PSF: the whole frame, and the brightest / darkest quarter of its 16x16-pixel tiles by ground-truth
mean (pixel-level masks would measure resolution, not photometry). Flicker: the mean per-pixel
temporal standard deviation of the denoised frames over that of the raw frames, on a static field.
Drift: the change of the frame mean between the first and last windows of a stream, relative
to the signal above the offset.
`play` runs frames through a real Pipeline at a fixed rate and returns every Result.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import numpy as np

from .frame import Frame, Result
from .pipeline import Pipeline, PipelineConfig
from .sinks import MemorySink

__all__ = ["clipped_fraction", "flicker_ratio", "mean_drift", "photometry", "play", "regions"]


def regions(truth: np.ndarray, tile: int = 16) -> dict[str, np.ndarray]:
    """Masks: whole frame, and the brightest / darkest quarter of `tile`-sized tiles of the truth."""
    h, w = truth.shape[0] // tile * tile, truth.shape[1] // tile * tile
    means = truth[:h, :w].reshape(h // tile, tile, w // tile, tile).mean(axis=(1, 3))
    hi, lo = np.percentile(means, [75, 25])
    full = lambda m: np.pad(np.kron(m, np.ones((tile, tile), bool)).astype(bool),  # noqa: E731
                            ((0, truth.shape[0] - h), (0, truth.shape[1] - w)))
    return {"all": np.ones(truth.shape, bool), "bright": full(means >= hi), "dark": full(means <= lo)}


def photometry(frame: np.ndarray, truth: np.ndarray, offset: float = 0.0,
               masks: dict[str, np.ndarray] | None = None) -> dict[str, dict[str, float]]:
    """Per region: relative mean error of `frame` vs `truth` in camera units and above `offset`.

    Pass `masks` (from `regions` of the ground truth) when `truth` is itself noisy, e.g. the raw
    frame: regions selected on noise are biased towards it.
    """
    f, t = frame.astype(np.float64), truth.astype(np.float64)
    out = {}
    for name, mask in (masks or regions(t)).items():
        mf, mt = float(f[mask].mean()), float(t[mask].mean())
        out[name] = {"adu": mf / mt - 1.0, "signal": (mf - offset) / max(mt - offset, 1e-12) - 1.0}
    return out


def clipped_fraction(frame: np.ndarray) -> float:
    """Fraction of pixels at the dtype's minimum or maximum."""
    info = np.iinfo(frame.dtype)
    return float(np.mean((frame == info.min) | (frame == info.max)))


def flicker_ratio(denoised: Sequence[np.ndarray], raw: Sequence[np.ndarray]) -> float:
    """Mean temporal std per pixel of the denoised frames over that of the raw frames (static field)."""
    d = np.stack([np.asarray(x, np.float64) for x in denoised])
    r = np.stack([np.asarray(x, np.float64) for x in raw])
    return float(d.std(axis=0, ddof=1).mean() / max(r.std(axis=0, ddof=1).mean(), 1e-12))


def mean_drift(frames: Sequence[np.ndarray], offset: float = 0.0, window: int = 50) -> float:
    """(mean of the last `window` frames - mean of the first) / signal above `offset`."""
    means = np.array([float(np.mean(f)) for f in frames])
    w = max(1, min(window, len(means) // 2))
    first, last = means[:w].mean(), means[-w:].mean()
    return float((last - first) / max(first - offset, 1e-12))


def play(frames: Sequence[np.ndarray], config: PipelineConfig, fps: float, channel: str = "c",
         timeout: float = 600.0) -> list[Result]:
    """Submit frames at `fps` (after the first frame's cold start) through a Pipeline; all Results."""
    sink = MemorySink()
    with Pipeline(config, sinks=[sink]) as pipe:
        pipe.submit(Frame(frames[0], channel=channel, t=0, frame_id=0))
        end = time.monotonic() + timeout
        while not (channel in pipe.channels and pipe.channels[channel].ready):
            if time.monotonic() > end:
                raise TimeoutError("cold start did not finish")
            time.sleep(0.01)
        t0 = time.perf_counter()
        for i in range(1, len(frames)):
            time.sleep(max(0.0, t0 + i / fps - time.perf_counter()))
            pipe.submit(Frame(frames[i], channel=channel, t=i, frame_id=i))
    return [sink.by_id[i] for i in range(len(frames))]
