"""Live layers: per channel a `<channel> raw` and a `<channel> fm2s` image side by side, contrast linked.

`LiveLayers.update` (called on the GUI thread by a timer) shows the newest frame of each channel
from a `LatestFrames` board and counts what it showed; frames that came in between are skipped.
Creating a layer blocks the event loop (~60-90 ms whatever its size in software GL, ~0.5 s for
napari's first) while filling one with new data takes ~5 ms, so `warm_up` pays napari's first at
start and leaves SPARES hidden layers that the first channel takes over; beyond them, `update`
creates at most one layer per call. Garbage collection is frozen after the warm-up (see there).
"""

from __future__ import annotations

import contextlib
import gc
import string
from typing import Any

import numpy as np

from ..liveview import LatestFrames, LiveFrame

__all__ = ["GAP", "LiveLayers"]

GAP = 0.04  # space between panels, as a share of the frame's side
SPARES = 2  # hidden layers made at start for the first channel's raw and fm2s panels
SPARE_NAME = "fm2s spare"
CONTRAST_PERCENTILES = (0.5, 99.8)  # initial contrast limits from the first raw frame


class LiveLayers:
    """Keeps the live layers of a napari viewer up to date with a board's newest frames."""

    def __init__(self, viewer: Any, board: LatestFrames, origin_x: float = 0.0) -> None:
        self.viewer = viewer
        self.board = board
        self.origin_x = origin_x  # where the panels start (right of the viewer's own layers, e.g. MM's preview)
        self.rows: list[str] = []  # channels in the order they appeared: one row of panels each
        self.shown: dict[str, int] = {}  # frames shown per channel
        self._pending: dict[str, LiveFrame] = {}  # frames waiting for a layer to be created
        self._reset_due = False  # fit the view to new layers (on the call after the one that created them)
        self._linking = False

    def warm_up(self) -> None:
        """Pay napari's one-off GL set-up before streaming: draw a tiny layer and the text overlay; make the spares."""
        from qtpy.QtWidgets import QApplication

        layer = self.viewer.add_image(np.zeros((8, 8), np.uint8), name="fm2s warm-up")
        overlay = self.viewer.text_overlay  # its first drawing, and each new glyph's, are slow too
        overlay.text, overlay.visible = string.ascii_letters + string.digits + string.punctuation, True
        QApplication.processEvents()
        overlay.text = "raw | fm2s: waiting for frames"
        # A full garbage collection of napari's, Qt's and torch's objects takes 85-190 ms here, and one
        # would stall the view mid-stream: collect once now and freeze what lives, so that later
        # collections scan only objects made from now on.
        gc.collect()
        gc.freeze()
        self.viewer.layers.remove(layer)
        for i in range(SPARES):
            self.viewer.add_image(np.zeros((8, 8), np.uint16), name=f"{SPARE_NAME} {i + 1}", visible=False)

    def spares(self) -> list[Any]:
        """The hidden layers not yet taken over by a channel."""
        return [layer for layer in self.viewer.layers if layer.name.startswith(SPARE_NAME)]

    def drop_spares(self) -> None:
        """Remove the spare layers no channel took (when the stream ends)."""
        for layer in self.spares():
            self.viewer.layers.remove(layer)

    def update(self) -> int:
        """Show what arrived since the last call (creating at most one layer); the number of channels shown."""
        if self._reset_due:
            self._reset_due = False
            self.viewer.reset_view()
            return 0
        frames = {**self._pending, **self.board.take()}
        self._pending = {}
        budget = 1
        shown = 0
        for channel, frame in frames.items():
            missing = self._missing(frame)
            if missing and budget:
                self._create(frame, missing[0])
                budget -= 1
                missing = missing[1:]
            if missing:
                self._pending[channel] = frame
                continue
            self._show(frame)
            shown += 1
        return shown

    def layer_names(self, channel: str) -> tuple[str, str]:
        """(raw, denoised) layer names of a channel."""
        return f"{channel} raw", f"{channel} fm2s"

    def _panels(self, frame: LiveFrame) -> list[tuple[str, np.ndarray, tuple[float, float]]]:
        """(layer name, pixels, translate) of each panel of the frame's channel row."""
        if frame.channel not in self.rows:
            self.rows.append(frame.channel)
        raw_name, den_name = self.layer_names(frame.channel)
        h, w = frame.denoised.shape
        y = self.rows.index(frame.channel) * h * (1 + GAP)
        panels = [(raw_name, frame.raw)] if frame.raw is not None else []
        panels.append((den_name, frame.denoised))
        return [(name, data, (y, self.origin_x + i * w * (1 + GAP))) for i, (name, data) in enumerate(panels)]

    def _missing(self, frame: LiveFrame) -> list[str]:
        """The frame's panels without a layer of its shape and dtype."""
        layers = self.viewer.layers
        return [name for name, data, _ in self._panels(frame)
                if name not in layers or layers[name].data.shape != data.shape or layers[name].data.dtype != data.dtype]

    def _create(self, frame: LiveFrame, name: str) -> None:
        for panel, data, translate in self._panels(frame):
            if panel != name:
                continue
            if name in self.viewer.layers:  # the frame's shape or dtype changed: a new layer
                self.viewer.layers.remove(name)
            limits, meta = self._initial_limits(frame), {"fm2s_channel": frame.channel}
            spares = self.spares()
            if not spares:
                self.viewer.add_image(data, name=name, translate=translate, contrast_limits=limits, metadata=meta)
                continue
            layer = spares[0]
            layer.name, layer.data, layer.translate, layer.metadata = name, data, translate, meta
            layer.contrast_limits_range = (0.0, float(np.iinfo(data.dtype).max))
            layer.contrast_limits, layer.visible = limits, True
        if not self._missing(frame):
            self._link(*self.layer_names(frame.channel))
            self._reset_due = True
            self.viewer.text_overlay.text = f"raw | fm2s   rows: {', '.join(self.rows)}"

    def _show(self, frame: LiveFrame) -> None:
        for name, data, translate in self._panels(frame):
            layer = self.viewer.layers[name]
            layer.data = data
            if tuple(layer.translate) != translate:
                layer.translate = translate
        self.shown[frame.channel] = self.shown.get(frame.channel, 0) + 1

    @staticmethod
    def _initial_limits(frame: LiveFrame) -> tuple[float, float]:
        ref = frame.raw if frame.raw is not None else frame.denoised
        lo, hi = np.percentile(ref[:: max(1, ref.shape[0] // 256), :: max(1, ref.shape[1] // 256)],
                               CONTRAST_PERCENTILES)
        return float(lo), float(max(hi, lo + 1))

    def _link(self, a: str, b: str) -> None:
        """Changing one layer's contrast limits changes the other's (raw and denoised are compared alike)."""
        if a not in self.viewer.layers or b not in self.viewer.layers:
            return
        la, lb = self.viewer.layers[a], self.viewer.layers[b]
        lb.contrast_limits = la.contrast_limits

        def follow(src: Any, dst: Any) -> None:
            if self._linking:
                return
            self._linking = True
            try:
                with contextlib.suppress(Exception):
                    dst.contrast_limits = src.contrast_limits
            finally:
                self._linking = False

        la.events.contrast_limits.connect(lambda _e: follow(la, lb))
        lb.events.contrast_limits.connect(lambda _e: follow(lb, la))
