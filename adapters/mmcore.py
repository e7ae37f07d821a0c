"""The pymmcore-plus edge: MDA (`frameReady`) and live-mode frames from a CMMCorePlus/UniMMCore into a pipeline.

Callbacks only translate and enqueue (never block the acquisition: a full queue is counted as a
rejected frame, and Micro-Manager still stores the raw frame itself). `SignalSink` emits each
denoised frame on a psygnal signal, for napari-micromanager-style live preview.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import threading
import time
from typing import Any

import numpy as np

from ..frame import Frame, Result
from ..pipeline import Pipeline

__all__ = ["MMCoreSource", "SignalSink", "frame_from_mda"]

log = logging.getLogger(__name__)


def _json_safe(meta: Any) -> dict[str, Any]:
    """Metadata reduced to JSON-serialisable values (anything else as its string)."""
    try:
        return dict(json.loads(json.dumps(dict(meta), default=str)))
    except (TypeError, ValueError):
        return {}


def frame_from_mda(img: np.ndarray, event: Any, meta: Any, frame_id: int) -> Frame:
    """Translate a pymmcore-plus MDA frame (image, useq.MDAEvent, metadata) into a Frame."""
    index = dict(getattr(event, "index", {}) or {})
    channel = getattr(getattr(event, "channel", None), "config", None) or "default"
    return Frame(
        pixels=np.array(img, copy=True),
        channel=str(channel),
        t=int(index.get("t", 0)),
        z=int(index.get("z", 0)),
        p=int(index.get("p", 0)),
        frame_id=frame_id,
        ts=time.time(),
        meta={"mda_index": {k: int(v) for k, v in index.items()}, "mm": _json_safe(meta or {})},
    )


class MMCoreSource:
    """Feeds a pipeline from a pymmcore-plus core: MDA frames and, on demand, live mode."""

    def __init__(self, core: Any, block: bool = False, live_channel: str | None = None) -> None:
        self.core = core
        self.block = block
        self.live_channel = live_channel
        self._ids = itertools.count()
        self._pipeline: Pipeline | None = None
        self._live_stop = threading.Event()
        self._live_thread: threading.Thread | None = None
        self.submitted = 0
        self.dropped = 0
        self.callback_s: list[float] = []  # acquisition-thread time spent per frame

    # -- FrameSource -------------------------------------------------------------------------------
    def start(self, pipeline: Pipeline) -> None:
        """Connect to the core's MDA frameReady signal."""
        self._pipeline = pipeline
        self.core.mda.events.frameReady.connect(self._on_frame)

    def stop(self) -> None:
        """Disconnect and stop live polling."""
        self.stop_live()
        with contextlib.suppress(ValueError, RuntimeError):
            self.core.mda.events.frameReady.disconnect(self._on_frame)

    # -- MDA ---------------------------------------------------------------------------------------
    def _submit(self, frame: Frame) -> None:
        assert self._pipeline is not None
        if self._pipeline.submit(frame, block=self.block):
            self.submitted += 1
        else:
            self.dropped += 1

    def _on_frame(self, img: np.ndarray, event: Any, meta: Any = None) -> None:
        t0 = time.perf_counter()
        try:
            self._submit(frame_from_mda(img, event, meta, next(self._ids)))
        except Exception:  # never raise into the acquisition
            log.exception("could not enqueue an MDA frame")
            self.dropped += 1
        self.callback_s.append(time.perf_counter() - t0)

    # -- live mode ---------------------------------------------------------------------------------
    def start_live(self, interval_ms: float = 0.0, poll_s: float = 0.002) -> None:
        """Start continuous acquisition and forward every frame from the core's buffer."""
        self._live_stop.clear()
        self.core.startContinuousSequenceAcquisition(interval_ms)
        self._live_thread = threading.Thread(target=self._poll_live, args=(poll_s,), name="mm-live", daemon=True)
        self._live_thread.start()

    def _poll_live(self, poll_s: float) -> None:
        t = 0
        channel = self.live_channel or (self.core.getCurrentConfig(self.core.getChannelGroup()) or "live")
        while not self._live_stop.is_set():
            if self.core.getRemainingImageCount() == 0:
                time.sleep(poll_s)
                continue
            img, md = self.core.popNextImageAndMD()
            frame = Frame(np.array(img, copy=True), channel=str(channel), t=t, frame_id=next(self._ids),
                          meta={"mm": _json_safe(md) if hasattr(md, "keys") else {}})
            t += 1
            self._submit(frame)

    def stop_live(self) -> None:
        """Stop continuous acquisition and the polling thread (frames already popped are kept)."""
        if self._live_thread is None:
            return
        self._live_stop.set()
        self._live_thread.join(5)
        self._live_thread = None
        if self.core.isSequenceRunning():
            self.core.stopSequenceAcquisition()


class SignalSink:
    """A sink that emits `frameDenoised(pixels, frame, processing)` for GUIs (napari, Qt)."""

    def __init__(self) -> None:
        from psygnal import Signal, SignalInstance

        class _Events:
            frameDenoised = Signal(np.ndarray, object, dict)

        self.events = _Events()
        self.frameDenoised: SignalInstance = self.events.frameDenoised
        self.name = "signal"

    def open(self) -> None:
        """Nothing to open."""

    def write(self, result: Result) -> None:
        """Emit the denoised frame (listener errors are logged by the relay)."""
        self.frameDenoised.emit(result.pixels, result.frame, result.processing())

    def close(self) -> None:
        """Nothing to close."""
