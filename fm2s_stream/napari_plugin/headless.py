"""Running napari without a screen: an X display for Qt's offscreen GL, and a meter of event-loop stalls."""

from __future__ import annotations

import atexit
import contextlib
import os
import shutil
import subprocess
import time

__all__ = ["LONG_MS", "StallMeter", "ensure_gl_display"]

TICK_MS = 10  # the stall meter's timer interval
LONG_MS = 50  # stalls longer than this are listed


def ensure_gl_display() -> subprocess.Popen[bytes] | None:
    """Under QT_QPA_PLATFORM=offscreen, draw on a private virtual X screen (Xvfb) instead; else do nothing.

    Qt's offscreen platform cannot draw napari's OpenGL canvas (no GL context: vispy raises on
    GL_EXTENSIONS, and screenshots come out black). A private Xvfb (Debian's `xvfb`, Mesa drawing
    in software) does draw it and shows nothing on any screen, so an "offscreen" run starts one,
    points DISPLAY at it and uses Qt's xcb platform. Returns the Xvfb process (stopped at exit).
    """
    if os.environ.get("QT_QPA_PLATFORM") != "offscreen":
        return None
    xvfb = shutil.which("Xvfb")
    if xvfb is None:
        raise RuntimeError("an offscreen napari needs Xvfb to draw its OpenGL canvas: install it "
                           "(Debian: apt-get install xvfb libxcb-cursor0), or run on a display")
    read_fd, write_fd = os.pipe()
    proc = subprocess.Popen([xvfb, "-displayfd", str(write_fd), "-screen", "0", "1600x1200x24", "-nolisten", "tcp"],
                            pass_fds=(write_fd,), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    os.close(write_fd)
    with os.fdopen(read_fd) as f:  # Xvfb writes its display number here once it accepts clients
        number = f.readline().strip()
    if not number:
        proc.kill()
        raise RuntimeError("Xvfb did not start (it gave no display number)")
    os.environ["DISPLAY"] = f":{number}"
    os.environ["QT_QPA_PLATFORM"] = "xcb"

    def stop() -> None:
        proc.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(5)

    atexit.register(stop)
    return proc


class StallMeter:
    """The longest time the Qt event loop was blocked: a TICK_MS timer's ticks that came late."""

    def __init__(self) -> None:
        from qtpy.QtCore import QTimer

        self.max_stall_ms = 0.0
        self.stalls: list[tuple[float, float]] = []  # (seconds since start, ms) of stalls over LONG_MS
        self._t0 = 0.0
        self._last: float | None = None
        self._timer = QTimer()
        self._timer.setInterval(TICK_MS)
        self._timer.timeout.connect(self._tick)

    def start(self) -> StallMeter:
        """Start measuring from now."""
        self._last = None
        self.max_stall_ms = 0.0
        self.stalls = []
        self._t0 = time.perf_counter()
        self._timer.start()
        return self

    def _tick(self) -> None:
        now = time.perf_counter()
        if self._last is not None:
            stall = (now - self._last) * 1000 - TICK_MS
            self.max_stall_ms = max(self.max_stall_ms, stall)
            if stall > LONG_MS:
                self.stalls.append((round(now - self._t0, 2), round(stall, 1)))
        self._last = now

    def stop(self) -> float:
        """Stop; the longest stall in ms."""
        self._timer.stop()
        return self.max_stall_ms
