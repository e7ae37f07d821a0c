"""Synthetic fluorescence scenes with known ground truth and realistic camera noise.

A scene is an expected photo-electron map (cells, filaments and puncta blurred by a Gaussian PSF on
a dim background). `Camera.expose` turns it into a camera frame: Poisson shot noise plus Gaussian
read noise, optionally spatially correlated (the noise field is blurred and renormalised so its
per-pixel variance still follows var = gain^2 * (signal + read^2)), then gain, offset, rounding and
clipping to the bit depth. `TimeLapse` moves a scene slowly (drift plus bleaching) frame by frame.
Tests, the demo and the calibration benchmark use this module instead of real data.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

__all__ = ["Camera", "TimeLapse", "make_scene"]


@dataclass(frozen=True)
class Camera:
    """A camera model: gain in ADU per electron, read noise in electrons, offset in ADU."""

    gain: float = 2.0
    read_noise: float = 2.0
    offset: float = 100.0
    bit_depth: int = 16
    correlation: float = 0.0  # sigma (pixels) of the Gaussian kernel correlating the noise; 0 = white

    @property
    def dtype(self) -> np.dtype:
        """uint8 up to 8 bits, uint16 above."""
        return np.dtype(np.uint8 if self.bit_depth <= 8 else np.uint16)

    @property
    def white(self) -> int:
        """Largest value the camera can report."""
        return 2**self.bit_depth - 1

    def ideal(self, electrons: np.ndarray) -> np.ndarray:
        """The noise-free frame in ADU (float64): the ground truth of `expose`."""
        return self.offset + self.gain * electrons

    def expose(self, electrons: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """One noisy frame of the expected electron map `electrons`, in the camera's dtype."""
        lam = np.clip(electrons, 0, None)
        noise = (rng.poisson(lam) - lam) + rng.normal(0.0, self.read_noise, lam.shape)
        if self.correlation > 0:
            noise = correlate(noise, self.correlation)
        adu = np.rint(self.offset + self.gain * (lam + noise))
        return np.clip(adu, 0, self.white).astype(self.dtype)


def correlate(noise: np.ndarray, sigma: float) -> np.ndarray:
    """Blur a white noise field with a Gaussian kernel, rescaled so each pixel keeps its variance."""
    radius = int(np.ceil(3 * sigma))
    x = np.arange(-radius, radius + 1)
    k = np.exp(-0.5 * (x / sigma) ** 2)
    k /= np.sqrt(np.sum(k**2))  # a separable kernel with unit energy keeps the variance
    out = ndimage.correlate1d(noise, k, axis=0, mode="reflect")
    return ndimage.correlate1d(out, k, axis=1, mode="reflect")


def _draw_curves(acc: np.ndarray, rng: np.random.Generator, count: int, length: int, weight: float) -> None:
    """Add smooth random curves (filaments) into `acc` as sub-pixel point samples."""
    h, w = acc.shape
    for _ in range(count):
        pos = rng.uniform([0, 0], [h, w])
        angle = rng.uniform(0, 2 * np.pi)
        turns = np.cumsum(rng.normal(0, 0.06, length)) + angle
        steps = np.stack([np.sin(turns), np.cos(turns)], axis=1) * 0.5
        pts = pos + np.cumsum(steps, axis=0)
        keep = (pts[:, 0] >= 0) & (pts[:, 0] < h) & (pts[:, 1] >= 0) & (pts[:, 1] < w)
        ij = pts[keep].astype(int)
        np.add.at(acc, (ij[:, 0], ij[:, 1]), weight * rng.uniform(0.5, 1.0))


def make_scene(
    shape: tuple[int, int],
    rng: np.random.Generator,
    peak: float = 200.0,
    background: float = 4.0,
    cells: int = 6,
    filaments: int = 40,
    puncta: int = 150,
    psf_sigma: float = 1.3,
) -> np.ndarray:
    """An expected photo-electron map: cells, filaments and puncta through a Gaussian PSF.

    `peak` is the brightest structure's mean photo-electrons per pixel, `background` the floor.
    """
    h, w = shape
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    body = np.zeros(shape)
    for _ in range(cells):
        cy, cx = rng.uniform(0, h), rng.uniform(0, w)
        ry, rx = rng.uniform(0.06, 0.16) * h, rng.uniform(0.06, 0.16) * w
        r = np.hypot((yy - cy) / ry, (xx - cx) / rx)
        body += rng.uniform(0.15, 0.3) / (1 + np.exp((r - 1) * 12))  # soft-edged cytoplasm
        body += rng.uniform(0.3, 0.5) / (1 + np.exp((r - 0.4) * 20))  # nucleus
    lines = np.zeros(shape)
    _draw_curves(lines, rng, filaments, length=4 * max(h, w) // 5, weight=1.0)
    lines = ndimage.gaussian_filter(lines, psf_sigma) * 2 * np.pi * psf_sigma**2 * 0.5
    dots = np.zeros(shape)
    ij = rng.integers(0, [h, w], size=(puncta, 2))
    np.add.at(dots, (ij[:, 0], ij[:, 1]), rng.uniform(0.5, 1.0, puncta))
    dots = ndimage.gaussian_filter(dots, psf_sigma) * 2 * np.pi * psf_sigma**2
    structure = ndimage.gaussian_filter(body, psf_sigma) + np.clip(lines, 0, 1.2) + dots
    structure /= max(float(structure.max()), 1e-9)
    gradient = 1 + 0.3 * (yy / h - 0.5)
    return background * gradient + peak * structure


def _bounce(travel: float, margin: int) -> float:
    """Offset in [-margin, margin) that moves linearly with `travel` and reflects at the ends."""
    d = travel % (4 * margin)
    return (d if d < 2 * margin else 4 * margin - d) - margin - 1e-9 * (d >= 2 * margin)


class TimeLapse:
    """A scene that drifts slowly (sub-pixel steps) and bleaches, seen through a fixed window."""

    def __init__(
        self,
        shape: tuple[int, int],
        camera: Camera,
        seed: int = 0,
        drift: tuple[float, float] = (0.3, 0.2),
        bleach: float = 0.0005,
        margin: int = 32,
        **scene_kw: float,
    ) -> None:
        self.shape, self.camera, self.drift, self.bleach = shape, camera, drift, bleach
        self.margin = margin
        self.rng = np.random.default_rng(seed)
        big = (shape[0] + 2 * margin, shape[1] + 2 * margin)
        self.scene = make_scene(big, self.rng, **scene_kw)  # type: ignore[arg-type]

    def electrons(self, t: int) -> np.ndarray:
        """The expected electron map at time point t (drift bounces back and forth in the margin)."""
        m = self.margin
        dy, dx = (_bounce(d * t, m) for d in self.drift)
        iy, ix = int(np.floor(dy)), int(np.floor(dx))
        fy, fx = dy - iy, dx - ix
        y0, x0 = m + iy, m + ix
        h, w = self.shape
        win = self.scene[y0 : y0 + h + 1, x0 : x0 + w + 1]
        # bilinear sub-pixel shift: cheap and exact in expectation
        out = (
            (1 - fy) * (1 - fx) * win[:h, :w] + (1 - fy) * fx * win[:h, 1 : w + 1]
            + fy * (1 - fx) * win[1 : h + 1, :w] + fy * fx * win[1 : h + 1, 1 : w + 1]
        )
        return out * np.exp(-self.bleach * t)

    def frame(self, t: int) -> tuple[np.ndarray, np.ndarray]:
        """(noisy frame in camera dtype, noise-free ground truth in ADU as float64) at time t."""
        e = self.electrons(t)
        return self.camera.expose(e, self.rng), self.camera.ideal(e)
