"""Frame (pixels + identity + metadata) and Result (what the pipeline made of a frame)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .scaling import check_frame

__all__ = ["MAX_CHANNEL_NAME", "Frame", "FrameError", "Result"]

MAX_CHANNEL_NAME = 128


class FrameError(ValueError):
    """A frame that cannot be processed; `kind` names the reason for counters."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


@dataclass
class Frame:
    """One camera frame: 2D uint8/uint16 pixels, its identity, and free metadata.

    The channel name decides which network denoises it; (t, z, p) locate it in the acquisition;
    frame_id is the source's own counter; ts its wall-clock time (seconds since the epoch).
    """

    pixels: np.ndarray
    channel: str = "default"
    t: int = 0
    z: int = 0
    p: int = 0
    frame_id: int = 0
    ts: float = field(default_factory=time.time)
    meta: dict[str, Any] = field(default_factory=dict)
    received: float = field(default_factory=time.perf_counter)  # monotonic arrival time

    def validate(self) -> None:
        """Raise FrameError unless the pixels and identity are usable."""
        try:
            check_frame(self.pixels)
        except (TypeError, ValueError) as exc:
            raise FrameError("pixels", str(exc)) from None
        if not isinstance(self.channel, str) or not self.channel or len(self.channel) > MAX_CHANNEL_NAME:
            raise FrameError("channel", f"channel must be a non-empty string of <= {MAX_CHANNEL_NAME} chars")
        if not self.channel.isprintable():
            raise FrameError("channel", f"channel name {self.channel!r} has non-printable characters")
        for name in ("t", "z", "p", "frame_id"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise FrameError("identity", f"{name} must be a non-negative integer, got {value!r}")

    def identity(self) -> dict[str, Any]:
        """The identity fields as a JSON-ready dict."""
        return {"channel": self.channel, "t": self.t, "z": self.z, "p": self.p,
                "frame_id": self.frame_id, "ts": self.ts}


@dataclass
class Result:
    """The pipeline's answer for one frame.

    status: "denoised" (network), "bootstrap" (classical pre-denoiser: during a cold start, or for a
    frame shed under overload, `reason` then says so) or
    "raw" (passed through after an error, `reason` says why). degraded: fine-tuning was cut for
    latency, or the frame is not network-denoised. steps: the channel model's total step count.
    averaged: mean number of consecutive frames averaged per pixel (1 = this frame alone).
    cold_start: share of the channel's cold start done when it answered (1 = done; the status says who answered).
    """

    frame: Frame
    pixels: np.ndarray
    status: str
    degraded: bool
    steps: int
    latency_ms: float
    reason: str | None = None
    averaged: float = 1.0
    cold_start: float = 1.0

    @classmethod
    def from_processing(cls, frame: Frame, fields: dict[str, Any]) -> Result:
        """The Result a received output frame describes (`frame.pixels` are its denoised pixels)."""
        def num(key: str, default: float) -> float:
            value = fields.get(key, default)
            return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else default

        reason = fields.get("reason")
        return cls(frame, frame.pixels, str(fields.get("status", "received")), bool(fields.get("degraded", False)),
                   int(num("steps", 0)), num("latency_ms", 0.0), reason if isinstance(reason, str) else None,
                   num("frames_averaged", 1.0), num("cold_start_progress", 1.0))

    def processing(self) -> dict[str, Any]:
        """The processing fields added to a frame's header on output."""
        return {"status": self.status, "degraded": self.degraded, "steps": self.steps,
                "latency_ms": round(self.latency_ms, 3), "reason": self.reason,
                "frames_averaged": round(self.averaged, 3), "cold_start_progress": round(self.cold_start, 3)}
