"""`fm2s-stream view`: napari with the Live widget connected to a `serve --preview` address.

With a screenshot path and a duration it runs unattended (under QT_QPA_PLATFORM=offscreen with no
screen too), saves the canvas, and returns a summary for other programs: frames shown (per channel),
their rate, the longest event-loop stall and the layers.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from .headless import LONG_MS, StallMeter, ensure_gl_display

__all__ = ["run_view"]

log = logging.getLogger(__name__)
WINDOW = (1400, 900)  # the viewer window's size (the unattended screenshot's canvas is most of it)


def run_view(address: str, screenshot: Path | None = None, seconds: float | None = None,
             canvas_only: bool = True) -> dict[str, Any] | None:
    """Open the viewer; unattended (screenshot and seconds given) return the summary, else run until closed.

    canvas_only=False puts the whole window (the Live widget and its status line too) in the screenshot.
    """
    ensure_gl_display()
    import napari
    from qtpy.QtCore import QTimer
    from qtpy.QtWidgets import QApplication

    from .widgets import LiveWidget

    viewer = napari.Viewer(title=f"fm2s live: {address}")
    viewer.window.resize(*WINDOW)
    widget = LiveWidget(viewer, address)
    viewer.window.add_dock_widget(widget, name="fm2s Live", area="right")
    widget.connect_to(address)
    if screenshot is None or seconds is None:
        napari.run()
        widget.close_all()
        return None
    meter = StallMeter().start()
    t0 = time.monotonic()
    summary: dict[str, Any] = {}

    def finish() -> None:
        elapsed = time.monotonic() - t0
        stall = meter.stop()
        widget.layers.update()
        widget.layers.drop_spares()
        screenshot.parent.mkdir(parents=True, exist_ok=True)
        viewer.screenshot(str(screenshot), canvas_only=canvas_only)
        shown = dict(widget.layers.shown)
        summary.update(frames=sum(shown.values()), channels=shown,
                       fps=round(sum(shown.values()) / max(elapsed, 1e-6), 2),
                       max_ui_stall_ms=round(stall, 1), layers=[layer.name for layer in viewer.layers])
        log.info("event-loop stalls over %s ms (s since start, ms): %s", LONG_MS, meter.stalls)
        widget.close_all()
        viewer.close()
        app = QApplication.instance()
        if app is not None:
            app.quit()

    QTimer.singleShot(int(seconds * 1000), finish)
    napari.run(force=True)
    return summary
