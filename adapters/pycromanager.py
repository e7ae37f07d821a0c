"""The pycromanager edge: an `image_process_fn` for `pycromanager.Acquisition` backed by a fm2s pipeline.

Modes:
- `divert`: the acquisition keeps the raw frame untouched; a copy goes to fm2s, whose denoised
  frames go to fm2s's own sinks. Never slows the acquisition (a full queue is counted, not waited on).
- `replace`: the acquisition receives the denoised frame (cast to the input dtype) if it is ready
  within `deadline_s`; on timeout or error the raw frame passes and the event is counted.
- `both`: the acquisition receives the raw frame and, as an extra image on channel
  "<channel>-fm2s", the denoised one (same deadline rule).
The hook never raises into the acquisition: an exception there would abort it.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections import Counter
from typing import Any

import numpy as np

from ..frame import Frame, Result
from ..pipeline import Pipeline, PipelineConfig
from ..sinks import FrameSink

__all__ = ["MODES", "Fm2sHook", "frame_from_pycromanager"]

log = logging.getLogger(__name__)
MODES = ("divert", "replace", "both")


def frame_from_pycromanager(image: np.ndarray, metadata: dict[str, Any], frame_id: int) -> Frame:
    """Translate pycromanager's (image, metadata) into a Frame; coordinates come from metadata["Axes"]."""
    axes = metadata.get("Axes", {}) or {}
    channel = axes.get("channel", metadata.get("Channel", "default"))
    return Frame(
        pixels=np.array(image, copy=True),
        channel=str(channel),
        t=int(axes.get("time", 0) or 0),
        z=int(axes.get("z", 0) or 0),
        p=int(axes.get("position", 0) or 0),
        frame_id=frame_id,
        ts=time.time(),
        meta={"Axes": {k: v for k, v in axes.items() if isinstance(v, (int, str, float))}},
    )


class _Waiter:
    """A sink that hands results back to the hook waiting for them (by frame id)."""

    name = "pycromanager-hook"

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._results: dict[int, Result] = {}
        self._wanted: set[int] = set()

    def want(self, frame_id: int) -> None:
        with self._cond:
            self._wanted.add(frame_id)

    def open(self) -> None:
        """Nothing to open."""

    def write(self, result: Result) -> None:
        """Keep the result only if a hook call is (still) waiting for it."""
        with self._cond:
            if result.frame.frame_id in self._wanted:
                self._results[result.frame.frame_id] = result
                self._cond.notify_all()

    def take(self, frame_id: int, timeout: float) -> Result | None:
        with self._cond:
            self._cond.wait_for(lambda: frame_id in self._results, timeout)
            self._wanted.discard(frame_id)
            return self._results.pop(frame_id, None)

    def close(self) -> None:
        """Nothing to close."""


class Fm2sHook:
    """Callable `image_process_fn(image, metadata)`; owns its pipeline (call `close()` at the end)."""

    def __init__(
        self,
        config: PipelineConfig,
        mode: str = "divert",
        sinks: list[FrameSink] | None = None,
        deadline_s: float = 1.0,
    ) -> None:
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}")
        self.mode = mode
        self.deadline_s = deadline_s
        self._waiter = _Waiter()
        all_sinks = list(sinks or []) + ([self._waiter] if mode != "divert" else [])
        self.pipeline = Pipeline(config, all_sinks).start()
        self._ids = itertools.count()
        self.counts: Counter[str] = Counter()
        self.hook_s: list[float] = []  # acquisition-thread time per call

    def __call__(self, image: np.ndarray, metadata: dict[str, Any]) -> Any:
        """pycromanager's image_process_fn: returns (image, metadata), or a list of them in `both` mode."""
        t0 = time.perf_counter()
        try:
            return self._process(image, metadata)
        except Exception as exc:  # an exception here would abort the whole acquisition
            log.exception("fm2s hook failed; passing the raw frame")
            self.counts["errors"] += 1
            metadata["fm2s"] = {"status": "raw", "reason": f"{type(exc).__name__}: {exc}"}
            return image, metadata
        finally:
            self.hook_s.append(time.perf_counter() - t0)

    def _process(self, image: np.ndarray, metadata: dict[str, Any]) -> Any:
        fid = next(self._ids)
        frame = frame_from_pycromanager(image, metadata, fid)
        if self.mode == "divert":
            if not self.pipeline.submit(frame, block=False):
                self.counts["not_accepted"] += 1
            self.counts["diverted"] += 1
            return image, metadata
        self._waiter.want(fid)
        if not self.pipeline.submit(frame, block=True, timeout=self.deadline_s):
            self.counts["not_accepted"] += 1
            return self._raw(image, metadata, "queue full")
        result = self._waiter.take(fid, self.deadline_s)
        if result is None or result.status == "raw":
            self.counts["timeouts" if result is None else "errors"] += 1
            return self._raw(image, metadata, "deadline" if result is None else str(result.reason))
        denoised = result.pixels.astype(image.dtype, copy=False)
        info = result.processing()
        self.counts["denoised"] += 1
        if self.mode == "replace":
            metadata["fm2s"] = info
            return denoised, metadata
        extra = dict(metadata)
        extra["Axes"] = dict(metadata.get("Axes", {}))
        extra["Axes"]["channel"] = f"{frame.channel}-fm2s"
        extra["fm2s"] = info
        return [(image, metadata), (denoised, extra)]

    def _raw(self, image: np.ndarray, metadata: dict[str, Any], reason: str) -> Any:
        metadata["fm2s"] = {"status": "raw", "reason": reason}
        return image, metadata

    def close(self) -> dict[str, Any]:
        """Drain and stop the pipeline; return its report plus the hook's counters and timing."""
        self.pipeline.stop()
        stats = self.pipeline.stats()
        hook = np.asarray(self.hook_s) * 1000
        stats["hook"] = {**self.counts, "calls": len(self.hook_s),
                         "p50_ms": float(np.percentile(hook, 50)) if hook.size else None,
                         "p99_ms": float(np.percentile(hook, 99)) if hook.size else None}
        return stats
