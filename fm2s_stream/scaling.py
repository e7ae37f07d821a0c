"""Mapping camera frames (uint8 / uint16) into FM2S's [0, 1] domain and back.

The paper's noise constants are defined for 8-bit data divided by 255. An 8-bit frame therefore
maps as v / 255. A 16-bit frame maps as (v - black) / (white - black): `black` is the frame's
0.05th percentile (the camera offset plus the darkest background) and `white` its 99.99th
percentile, so the frame's used range fills [0, 1] as an auto-ranged 8-bit frame of the same scene
would. The tile-adaptive part of the FM2S noise model is invariant to that gain, so 16-bit frames
see the same injected noise, relative to their signal, as their 8-bit counterparts. The inverse map
restores the original units exactly (up to rounding) and the full 16-bit range is kept: values
outside [black, white] are not clipped in the output.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["SUPPORTED_DTYPES", "Scaling", "check_frame", "from_unit", "quantize", "scaling_for", "to_unit"]

SUPPORTED_DTYPES = (np.dtype(np.uint8), np.dtype(np.uint16))
MIN_SIDE = 8


@dataclass(frozen=True)
class Scaling:
    """Affine map between camera units and the [0, 1] domain: unit = (v - black) / (white - black)."""

    black: float
    white: float

    @property
    def span(self) -> float:
        """Camera units per unit of the [0, 1] domain."""
        return self.white - self.black


def check_frame(frame: np.ndarray) -> None:
    """Raise ValueError with a clear message unless `frame` is a 2D uint8/uint16 image we can denoise."""
    if not isinstance(frame, np.ndarray):
        raise TypeError(f"expected a numpy array, got {type(frame).__name__}")
    if frame.dtype not in SUPPORTED_DTYPES:
        hint = ""
        if frame.dtype.kind == "f":
            hint = " (float frames are not accepted: convert to uint16 in camera units)"
            if not np.isfinite(frame).all():
                hint = " (and it contains NaN or inf)"
        raise ValueError(f"unsupported dtype {frame.dtype}; expected uint8 or uint16{hint}")
    if frame.ndim != 2:
        what = "an RGB/colour image" if frame.ndim == 3 and frame.shape[-1] in (3, 4) else f"{frame.ndim}D"
        raise ValueError(f"expected a 2D grey frame, got {what} with shape {frame.shape}")
    if min(frame.shape) < MIN_SIDE:
        raise ValueError(f"frame {frame.shape} is too small: both sides must be >= {MIN_SIDE} pixels")


def scaling_for(frame: np.ndarray) -> Scaling:
    """The paper's map for uint8 (v / 255); a robust black/white range map for uint16."""
    if frame.dtype == np.uint8:
        return Scaling(0.0, 255.0)
    lo, hi = np.percentile(frame[:: max(1, frame.shape[0] // 256), :: max(1, frame.shape[1] // 256)],
                           [0.05, 99.99])
    lo, hi = float(lo), float(hi)
    return Scaling(lo, max(hi, lo + 16.0))


def to_unit(frame: np.ndarray, scaling: Scaling) -> np.ndarray:
    """Camera units -> float32 in the [0, 1] domain (values may fall slightly outside it)."""
    return ((frame.astype(np.float32) - np.float32(scaling.black)) / np.float32(scaling.span)).astype(
        np.float32, copy=False
    )


def from_unit(unit: np.ndarray, scaling: Scaling, dtype: np.dtype) -> np.ndarray:
    """[0, 1] domain -> camera units of `dtype`, rounded and clipped to the dtype's range only."""
    return quantize(unit.astype(np.float64) * scaling.span + scaling.black, dtype)


def quantize(values: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """Float camera units -> `dtype`, rounded and clipped to the dtype's range only."""
    info = np.iinfo(dtype)
    return np.clip(np.rint(values), info.min, info.max).astype(dtype)
