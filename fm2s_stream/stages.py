"""StageClock: where a frame's time goes, stage by stage (transfer, scaling, inference, ...), when asked.

Off by default (no cost). On, it records the seconds between consecutive `lap` calls under each
stage's name; on CUDA it synchronises the device at each lap so the times are the stages' own,
not the launch queue's (which slows the stream: only for benchmarks).
"""

from __future__ import annotations

import time
from collections import defaultdict

import torch

__all__ = ["StageClock"]


class StageClock:
    """Accumulated seconds and counts per stage name."""

    def __init__(self, device: torch.device, enabled: bool = False) -> None:
        self.device = device
        self.enabled = enabled
        self.seconds: defaultdict[str, float] = defaultdict(float)
        self.frames = 0
        self._last = 0.0

    def start(self, frame: bool = True) -> None:
        """Begin timing a frame (or, `frame` False, more work for the same one); laps measure from here."""
        if self.enabled:
            self.frames += frame
            self._sync()
            self._last = time.perf_counter()

    def lap(self, stage: str) -> None:
        """Charge the time since the previous lap (or start) to `stage`."""
        if not self.enabled:
            return
        self._sync()
        now = time.perf_counter()
        self.seconds[stage] += now - self._last
        self._last = now

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def reset(self) -> None:
        """Forget what was recorded (e.g. after a warm-up)."""
        self.seconds.clear()
        self.frames = 0

    def mean_ms(self) -> dict[str, float]:
        """Mean milliseconds per frame spent in each stage."""
        return {k: 1000 * v / max(1, self.frames) for k, v in self.seconds.items()}
