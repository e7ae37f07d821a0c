"""The plugin's two dock widgets: Denoise layer (offline, in a worker thread) and Live (a stream, or a core).

Work never runs on the GUI thread: denoising runs in a thread whose progress a timer reads; live
frames arrive on a subscriber's (or the pipeline's) thread into a `LatestFrames` board that a timer
shows. Errors are shown in the widget's status line and logged.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

import numpy as np
from qtpy.QtCore import QTimer
from qtpy.QtWidgets import (
    QCheckBox,
    QComboBox,
    QFormLayout,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QProgressBar,
    QPushButton,
    QSpinBox,
    QVBoxLayout,
    QWidget,
)

from ..frame import Result
from ..liveview import PREVIEW_ADDRESS, LatestFrames, LiveFrame
from ..pipeline import PipelineConfig
from ..presets import preset_names
from ..training import Schedule
from .layers import GAP, LiveLayers

__all__ = ["PREVIEW_ADDRESS", "Cancelled", "DenoiseWidget", "LiveWidget", "stack_axes"]

log = logging.getLogger(__name__)

POLL_MS = 30  # how often the GUI shows new live frames and reads progress (newest frame wins in between)


class Cancelled(Exception):
    """Raised from a training step's callback when the user pressed Cancel."""


def stack_axes(layer: Any) -> str:
    """The layer's axes as fm2s letters ("TCZYX"-like) when napari knows them, else "" (no channel axis)."""
    labels = [str(a).upper() for a in getattr(layer, "axis_labels", ())]
    return "".join(labels) if all(len(a) == 1 for a in labels) and len(set(labels)) == len(labels) else ""


def _devices() -> list[str]:
    import torch

    return ["auto", "cpu"] + [f"cuda:{i}" for i in range(torch.cuda.device_count())]


class DenoiseWidget(QWidget):
    """Pick an image layer (2D-5D, uint8/uint16), preset and device; adds `<layer> fm2s` alike placed."""

    def __init__(self, napari_viewer: Any, seed: int = 0, method: str | Schedule = "fast") -> None:
        super().__init__()
        self.viewer = napari_viewer
        self.method = method  # the offline schedule (`denoise`'s `method`)
        self.layer_box = QComboBox()
        self.preset_box = QComboBox()
        self.preset_box.addItems(["auto", *preset_names()])
        self.device_box = QComboBox()
        self.device_box.addItems(_devices())
        self.seed_box = QSpinBox()
        self.seed_box.setRange(0, 2**31 - 1)
        self.seed_box.setValue(seed)
        self.run_button = QPushButton("Denoise")
        self.cancel_button = QPushButton("Cancel")
        self.cancel_button.setEnabled(False)
        self.progress = QProgressBar()
        self.progress.setRange(0, 1000)
        self.status = QLabel("")
        self.status.setWordWrap(True)
        form = QFormLayout()
        form.addRow("layer", self.layer_box)
        form.addRow("preset", self.preset_box)
        form.addRow("device", self.device_box)
        form.addRow("seed", self.seed_box)
        buttons = QHBoxLayout()
        buttons.addWidget(self.run_button)
        buttons.addWidget(self.cancel_button)
        box = QVBoxLayout(self)
        box.addLayout(form)
        box.addLayout(buttons)
        box.addWidget(self.progress)
        box.addWidget(self.status)
        box.addStretch()
        self.run_button.clicked.connect(self.start)
        self.cancel_button.clicked.connect(self.cancel)
        self.viewer.layers.events.inserted.connect(self._refresh_layers)
        self.viewer.layers.events.removed.connect(self._refresh_layers)
        self._refresh_layers()
        self._timer = QTimer(self)
        self._timer.setInterval(POLL_MS)
        self._timer.timeout.connect(self._poll)
        self._thread: threading.Thread | None = None
        self._cancel = threading.Event()
        self._fraction = 0.0
        self._outcome: tuple[str, Any] | None = None  # ("done", array) | ("cancelled", None) | ("error", message)
        self._source: Any = None
        self.last_output: Any = None  # the layer added by the last finished run
        self.finished_runs = 0

    def _refresh_layers(self, _event: Any = None) -> None:
        from napari.layers import Image

        current = self.layer_box.currentText()
        self.layer_box.clear()
        self.layer_box.addItems([layer.name for layer in self.viewer.layers if isinstance(layer, Image)])
        if current:
            self.layer_box.setCurrentText(current)

    @property
    def running(self) -> bool:
        """True while a denoising run is in flight."""
        return self._thread is not None

    def _check(self, layer: Any) -> np.ndarray:
        if layer.multiscale or getattr(layer, "rgb", False):
            raise ValueError(f"layer {layer.name!r} is multiscale or RGB; pick a single-scale grey image")
        data = np.asarray(layer.data)
        if data.dtype not in (np.uint8, np.uint16):
            raise ValueError(f"layer {layer.name!r} is {data.dtype}; FM2S denoises uint8/uint16 camera frames")
        if not 2 <= data.ndim <= 5:
            raise ValueError(f"layer {layer.name!r} has {data.ndim} dimensions; 2D to 5D are supported")
        return data

    def start(self) -> None:
        """Denoise the chosen layer in a worker thread (the viewer stays responsive)."""
        if self.running:
            return
        name = self.layer_box.currentText()
        try:
            if name not in self.viewer.layers:
                raise ValueError("choose an image layer")
            layer = self.viewer.layers[name]
            data = self._check(layer)
        except ValueError as exc:
            self.status.setText(str(exc))
            return
        from ..offline import denoise_stack
        from ..training import SCHEDULES

        planes = int(np.prod(data.shape[:-2], dtype=np.int64))
        method = self.method
        per_plane = (method if isinstance(method, Schedule) else SCHEDULES[method]).total_steps
        preset, device, seed = self.preset_box.currentText(), self.device_box.currentText(), self.seed_box.value()
        axes = stack_axes(layer)
        self._cancel.clear()
        self._fraction, self._outcome, self._source = 0.0, None, layer
        done_planes = [0]

        def on_step(steps: int) -> None:
            if self._cancel.is_set():
                raise Cancelled
            self._fraction = min(0.999, (done_planes[0] + min(1.0, steps / per_plane)) / planes)

        def on_plane(i: int, n: int) -> None:
            done_planes[0] = i

        def work() -> None:
            t0 = time.perf_counter()
            try:
                out = denoise_stack(data, axes, preset, method, device, seed, progress=on_plane, on_step=on_step)
                self._outcome = ("done", (out, time.perf_counter() - t0))
            except Cancelled:
                self._outcome = ("cancelled", None)
            except Exception as exc:
                log.exception("denoising layer %r failed", name)
                self._outcome = ("error", f"{type(exc).__name__}: {exc}")

        self.run_button.setEnabled(False)
        self.cancel_button.setEnabled(True)
        self.status.setText(f"denoising {name!r}: {planes} plane(s) of {data.shape[-2]}x{data.shape[-1]}")
        self._thread = threading.Thread(target=work, name="fm2s-denoise-layer", daemon=True)
        self._thread.start()
        self._timer.start()

    def cancel(self) -> None:
        """Stop the run at its next training step; nothing is added."""
        self._cancel.set()

    def _poll(self) -> None:
        self.progress.setValue(int(self._fraction * 1000))
        if self._outcome is None or self._thread is None:
            return
        self._thread.join()
        self._thread = None
        self._timer.stop()
        kind, value = self._outcome
        layer = self._source
        if kind == "done":
            out, seconds = value
            self.last_output = self.viewer.add_image(
                out, name=f"{layer.name} fm2s", scale=layer.scale, translate=layer.translate,
                metadata={**layer.metadata, "fm2s": {"preset": self.preset_box.currentText(),
                                                     "seed": self.seed_box.value(), "source": layer.name}},
                contrast_limits=layer.contrast_limits, colormap=layer.colormap)
            self.progress.setValue(1000)
            self.status.setText(f"added {layer.name} fm2s in {seconds:.1f} s")
        elif kind == "cancelled":
            self.progress.setValue(0)
            self.status.setText("cancelled; nothing added")
        else:
            self.status.setText(f"failed: {value}")
        self.finished_runs += 1
        self.run_button.setEnabled(True)
        self.cancel_button.setEnabled(False)


class _BoardSink:
    """A pipeline sink that puts each result on a LatestFrames board (the Micro-Manager attach)."""

    name = "napari-live"

    def __init__(self, board: LatestFrames) -> None:
        self.board = board

    def open(self) -> None:
        """Nothing to open."""

    def write(self, result: Result) -> None:
        """Newest frame per channel wins on the board."""
        f = result.frame
        self.board.put(LiveFrame(f.channel, result.pixels, f.pixels, result.processing(), f.frame_id, f.t))

    def close(self) -> None:
        """Nothing to close."""


class LiveWidget(QWidget):
    """Raw | denoised per channel, live: from a running `serve` (its --preview address) or a pymmcore-plus core."""

    def __init__(self, napari_viewer: Any, address: str = PREVIEW_ADDRESS, core: Any = None) -> None:
        super().__init__()
        self.viewer = napari_viewer
        self.core = core
        self.board = LatestFrames()
        self.layers = LiveLayers(napari_viewer, self.board)
        self.address = QLineEdit(address)
        self.connect_button = QPushButton("Connect")
        self.connect_button.setCheckable(True)
        self.attach_box = QCheckBox("Attach to the Micro-Manager core (no server)")
        self.attach_box.setEnabled(self._mm_available())
        self.status = QLabel("not connected")
        self.status.setWordWrap(True)
        row = QHBoxLayout()
        row.addWidget(QLabel("serve preview"))
        row.addWidget(self.address)
        row.addWidget(self.connect_button)
        box = QVBoxLayout(self)
        box.addLayout(row)
        box.addWidget(self.attach_box)
        box.addWidget(self.status)
        box.addStretch()
        self.connect_button.toggled.connect(self._toggle_connect)
        self.attach_box.toggled.connect(self._toggle_attach)
        self._subscriber: Any = None
        self._mm: tuple[Any, Any] | None = None  # (MMCoreSource, Pipeline)
        self.layers.warm_up()
        self._timer = QTimer(self)
        self._timer.setInterval(POLL_MS)
        self._timer.timeout.connect(self._tick)
        self._timer.start()
        self._last_status = 0.0

    def _mm_available(self) -> bool:
        if self.core is not None:
            return True
        try:
            import pymmcore_plus  # noqa: F401
        except ImportError:
            return False
        return True

    # -- a running serve -----------------------------------------------------------------------------
    def connect_to(self, address: str | None = None) -> None:
        """Subscribe to a `serve --preview` address (ZMQ reconnects if the server starts later)."""
        from ..adapters.zmq import PreviewSubscriber

        self.disconnect_stream()
        if address:
            self.address.setText(address)
        self._subscriber = PreviewSubscriber(self.address.text().strip(), self.board).start()
        self.connect_button.blockSignals(True)
        self.connect_button.setChecked(True)
        self.connect_button.setText("Disconnect")
        self.connect_button.blockSignals(False)
        self.status.setText(f"waiting for frames from {self.address.text()}")

    def disconnect_stream(self) -> None:
        """Stop receiving (the layers stay)."""
        if self._subscriber is not None:
            self._subscriber.stop()
            self._subscriber = None
        self.connect_button.blockSignals(True)
        self.connect_button.setChecked(False)
        self.connect_button.setText("Connect")
        self.connect_button.blockSignals(False)

    def _toggle_connect(self, on: bool) -> None:
        try:
            self.connect_to() if on else self.disconnect_stream()
        except Exception as exc:  # a malformed address, say
            self.disconnect_stream()
            self.status.setText(f"cannot connect: {exc}")

    # -- a pymmcore-plus core (napari-micromanager) ----------------------------------------------------
    def attach(self, core: Any = None, config: PipelineConfig | None = None) -> None:
        """Denoise the core's MDA frames in this process and show them right of the viewer's own layers.

        core: default the one given at construction, else pymmcore-plus's global (napari-micromanager's);
        config: the pipeline's (default: the `serve` defaults with the auto preset).
        """
        from ..adapters.mmcore import MMCoreSource
        from ..channel import channel_config
        from ..pipeline import Pipeline

        self.detach()
        if core is not None:
            self.core = core
        if self.core is None:
            from pymmcore_plus import CMMCorePlus

            self.core = CMMCorePlus.instance()  # napari-micromanager's core
        own = [layer for layer in self.viewer.layers if layer.name not in self._live_names()]
        if own:
            self.layers.origin_x = max(float(layer.extent.world[1][-1]) for layer in own) * (1 + GAP)
        pipeline = Pipeline(config or PipelineConfig(channel_config("auto")), [], [_BoardSink(self.board)]).start()
        source = MMCoreSource(self.core)
        source.start(pipeline)
        self._mm = (source, pipeline)
        self.attach_box.blockSignals(True)
        self.attach_box.setChecked(True)
        self.attach_box.blockSignals(False)
        self.status.setText("attached to the Micro-Manager core: MDA frames are denoised here")

    def detach(self) -> None:
        """Disconnect from the core and stop its pipeline."""
        if self._mm is not None:
            source, pipeline = self._mm
            source.stop()
            pipeline.stop()
            self._mm = None
        self.attach_box.blockSignals(True)
        self.attach_box.setChecked(False)
        self.attach_box.blockSignals(False)

    def _toggle_attach(self, on: bool) -> None:
        try:
            self.attach() if on else self.detach()
        except Exception as exc:
            log.exception("could not attach to the Micro-Manager core")
            self.detach()
            self.status.setText(f"cannot attach: {exc}")

    def _live_names(self) -> set[str]:
        return {n for ch in self.layers.rows for n in self.layers.layer_names(ch)}

    # -- the GUI clock ---------------------------------------------------------------------------------
    def _tick(self) -> None:
        try:
            self.layers.update()
        except Exception:
            log.exception("could not show a live frame")
        now = time.monotonic()
        if self.board.received and now - self._last_status > 0.5:
            self._last_status = now
            self.status.setText(self.board.status_line())

    def close_all(self) -> None:
        """Stop the stream and the core attach (the widget's owner calls this on close)."""
        self._timer.stop()
        self.disconnect_stream()
        self.detach()

    def closeEvent(self, event: Any) -> None:
        """Stop receiving when the dock closes."""
        self.close_all()
        super().closeEvent(event)
