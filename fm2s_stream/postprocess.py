"""PostProcess: what every answer goes through after the network, on its device: anchor, then average.

Anchoring keeps the raw frame's low spatial frequencies (photometry, `anchor.py`); the registered
temporal average then removes flicker on what did not change (`temporal.py`). Tensors in camera
units in and out, on the frame's device.
"""

from __future__ import annotations

import torch

from .anchor import anchor
from .calibrate import NoiseEstimate
from .ops import one_thread
from .stages import StageClock
from .temporal import TemporalAverage

__all__ = ["ALL_THREADS_PIXELS", "PostProcess"]

# From this many pixels on, the anchoring and averaging kernels run on all of torch's threads (each
# pass over the frame is long enough that a barrier costs nothing); registration stays on one
# (`TemporalAverage._register`: its small operations lose more at barriers than they gain).
ALL_THREADS_PIXELS = 1024 * 1024


class PostProcess:
    """anchor (sigma px; 0 = off) -> registered temporal average (over up to `frames`; 1 = off)."""

    def __init__(self, anchor_sigma: float, frames: int, threshold: float, max_positions: int,
                 registration: bool, noise: NoiseEstimate | None = None, clock: StageClock | None = None) -> None:
        self.anchor_sigma = anchor_sigma
        self.clock = clock or StageClock(torch.device("cpu"))
        self.average = TemporalAverage(frames, threshold, max_positions=max_positions, motion=registration,
                                       clock=self.clock)
        self.average.seed_noise(noise)
        self._classical = False  # the history holds classical (cold-start) answers

    def apply(self, raw: torch.Tensor, out: torch.Tensor, position: tuple[int, int], network: bool) -> tuple[
        torch.Tensor, float
    ]:
        """(the answer to publish, mean frames averaged per pixel); `network` False for classical answers.

        Classical answers are averaged too (a still or drifting field gains from time already); their
        history is dropped when the network takes over, so the two are never mixed.
        """
        if network and self._classical:
            self.average.reset()
        self._classical = not network
        with one_thread(raw.device.type == "cpu" and raw.numel() < ALL_THREADS_PIXELS):
            if network:
                out = anchor(out, raw, self.anchor_sigma)
                self.clock.lap("anchoring")
            result = self.average.apply(raw, out, position)
            self.clock.lap("averaging")
        return result

    @property
    def measured_shift(self) -> tuple[float, float] | None:
        """The latest frame's registered shift from its position's previous frame (None: not measured)."""
        return self.average.measured_shift

    @property
    def still(self) -> bool:
        """The latest frame showed the same field as its position's previous one (unmoved, unchanged)."""
        return self.average.still

    def set_noise(self, est: NoiseEstimate) -> None:
        """A newer camera noise law for the average's change test (e.g. a multi-frame fit)."""
        self.average.set_noise(est)

    def reset(self) -> None:
        """Forget the history (a shape change)."""
        self.average.reset()
