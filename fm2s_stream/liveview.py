"""What a live viewer shows: the newest raw + denoised frame of each channel, and the stream's vital signs.

Sources (a preview subscriber, a Micro-Manager pipeline's sink) `put` frames from their own threads;
the GUI `take`s what is new on its own clock. Newest frame wins: a GUI slower than the stream skips
frames, it never falls behind. No sockets, no GUI here.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import numpy as np

__all__ = ["PREVIEW_ADDRESS", "ChannelVitals", "LatestFrames", "LiveFrame"]

PREVIEW_ADDRESS = "tcp://127.0.0.1:5557"  # where viewers look for `serve --preview` unless told otherwise
WINDOW = 100  # latency percentiles over the last this many frames
FPS_WINDOW_S = 2.0  # frame rate over the last this many seconds


def _number(value: Any) -> float | None:
    """A finite JSON number as float, else None (header fields come from the network)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not np.isfinite(value):
        return None
    return float(value)


@dataclass
class LiveFrame:
    """One channel's frame as shown: raw (None if the source sends none), denoised, and its fm2s fields."""

    channel: str
    denoised: np.ndarray
    raw: np.ndarray | None
    fm2s: dict[str, Any]
    frame_id: int = 0
    t: int = 0


@dataclass
class ChannelVitals:
    """Per channel: frames received, the model's state as of its newest frame, degraded frames."""

    frames: int = 0
    degraded: int = 0
    status: str = "-"
    steps: int = 0
    cold_start: float = 0.0

    def line(self) -> str:
        """A short human-readable state: 'cold start 43 %' or 'denoised, 1200 steps'."""
        state = f"cold start {self.cold_start:.0%}" if self.cold_start < 1 else self.status
        return f"{state}, {self.steps} steps, {self.degraded}/{self.frames} degraded"


@dataclass
class LatestFrames:
    """Thread-safe newest frame per channel plus the stream's rate, latency and per-channel vitals."""

    _new: dict[str, LiveFrame] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _arrivals: deque[float] = field(default_factory=lambda: deque(maxlen=4096))
    _latency: deque[float] = field(default_factory=lambda: deque(maxlen=WINDOW))
    vitals: dict[str, ChannelVitals] = field(default_factory=dict)
    received: int = 0
    malformed: int = 0

    def put(self, frame: LiveFrame) -> None:
        """Record a frame (any thread); it replaces the channel's frame not yet taken."""
        now = time.monotonic()
        with self._lock:
            self._new[frame.channel] = frame
            self.received += 1
            self._arrivals.append(now)
            f = frame.fm2s
            latency = _number(f.get("latency_ms"))
            if latency is not None:
                self._latency.append(latency)
            v = self.vitals.setdefault(frame.channel, ChannelVitals())
            v.frames += 1
            v.degraded += f.get("degraded") is True
            v.status = str(f.get("status", "-"))[:32]
            v.steps = int(_number(f.get("steps")) or 0)
            progress = _number(f.get("cold_start_progress"))
            v.cold_start = progress if progress is not None else 1.0 if v.status == "denoised" else 0.0

    def take(self) -> dict[str, LiveFrame]:
        """The frames that arrived since the last take, newest per channel."""
        with self._lock:
            new, self._new = self._new, {}
        return new

    def fps(self) -> float:
        """Frames received per second over the last FPS_WINDOW_S."""
        now = time.monotonic()
        with self._lock:
            recent = [t for t in self._arrivals if now - t <= FPS_WINDOW_S]
        if len(recent) < 2:
            return 0.0
        return (len(recent) - 1) / max(recent[-1] - recent[0], 1e-6)

    def latency_ms(self) -> tuple[float, float]:
        """(p50, p99) of the server's latency over the last WINDOW frames (nan before any)."""
        with self._lock:
            values = np.asarray(self._latency, dtype=float)
        if not values.size:
            return float("nan"), float("nan")
        return float(np.percentile(values, 50)), float(np.percentile(values, 99))

    def status_line(self) -> str:
        """'12.0 fps · latency p50 31 ms, p99 48 ms', then a line per channel ('GFP: cold start 43 %, ...')."""
        p50, p99 = self.latency_ms()
        head = f"{self.fps():.1f} fps · latency p50 {p50:.0f} ms, p99 {p99:.0f} ms"
        if self.malformed:
            head += f" · {self.malformed} malformed messages"
        with self._lock:
            lines = [f"{name}: {v.line()}" for name, v in sorted(self.vitals.items())]
        return "\n".join([head, *lines])
