"""A Micro-Manager core with a pure-Python synthetic fluorescence camera, and `fm2s-stream mm-demo`.

`SyntheticCamera` is a real UniMMCore camera device (pymmcore-plus' Python device API); each channel
of the filter wheel shows its own drifting synthetic scene with camera noise. No Micro-Manager
installation is needed (UniMMCore logs one harmless error about that).
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..synthetic import Camera, TimeLapse

__all__ = ["build_core", "run_mm_demo"]


def _device_classes() -> tuple[type, type]:
    from pymmcore_plus.experimental.unicore import SimpleCameraDevice, StateDevice

    class SyntheticCamera(SimpleCameraDevice):  # type: ignore[misc]
        """512x512 uint16 camera whose image depends on the filter wheel position and on time."""

        def __init__(self, shape: tuple[int, int], wheel: Any, n_channels: int, seed: int = 0) -> None:
            super().__init__()
            self._shape = shape
            self._exposure = 10.0
            self._wheel = wheel
            cam = Camera(gain=2.0, read_noise=3.0, offset=100.0, correlation=0.6)
            self._lapses = [TimeLapse(shape, cam, seed=seed + c, peak=120 + 60 * c) for c in range(n_channels)]
            self._snaps = [0] * n_channels

        def get_exposure(self) -> float:
            return self._exposure

        def set_exposure(self, exposure: float) -> None:
            self._exposure = float(exposure)

        def sensor_shape(self) -> tuple[int, int]:
            return self._shape

        def dtype(self) -> Any:
            return np.uint16

        def snap(self, buffer: np.ndarray) -> Mapping[str, Any]:
            c = int(self._wheel.get_state()) % len(self._lapses)
            noisy, _ = self._lapses[c].frame(self._snaps[c])
            self._snaps[c] += 1
            buffer[:] = noisy
            return {"synthetic_channel": c}

    class Wheel(StateDevice):  # type: ignore[misc]
        """A filter wheel: one state per channel."""

        def __init__(self, labels: Sequence[str]) -> None:
            super().__init__(dict(enumerate(labels)))
            self._state = 0

        def get_state(self) -> int:
            return self._state

        def set_state(self, position: int) -> None:
            self._state = int(position)

    return SyntheticCamera, Wheel


def build_core(channels: Sequence[str] = ("GFP", "mCherry"), shape: tuple[int, int] = (512, 512),
               seed: int = 0) -> Any:
    """A UniMMCore with the synthetic camera, a filter wheel and a "Channel" config group."""
    from pymmcore_plus.experimental.unicore import UniMMCore

    camera_cls, wheel_cls = _device_classes()
    core = UniMMCore()
    wheel = wheel_cls(channels)
    core.loadPyDevice("Wheel", wheel)
    core.loadPyDevice("Camera", camera_cls(shape, wheel, len(channels), seed))
    core.initializeAllDevices()
    core.setCameraDevice("Camera")
    for name in channels:
        core.defineConfig("Channel", name, "Wheel", "Label", name)
    core.setChannelGroup("Channel")
    core.setAutoShutter(False)
    return core


def run_mm_demo(out: Path, timepoints: int = 20, channels: Sequence[str] = ("GFP", "mCherry"),
                preset: str = "auto", threads: int = 2, interval_s: float = 0.0,
                state_dir: Path | None = None) -> dict[str, Any]:
    """A 2-channel MDA time-lapse from the synthetic camera, denoised live, saved as OME-TIFF."""
    import useq

    from ..channel import channel_config
    from ..pipeline import Pipeline, PipelineConfig
    from ..tiffsink import TiffSink
    from .mmcore import MMCoreSource

    core = build_core(channels)
    sink = TiffSink(out, "denoised", prefix="mm-demo")
    config = PipelineConfig(channel_config(preset), threads=threads, state_dir=str(state_dir) if state_dir else None)
    pipeline = Pipeline(config, [sink]).start()
    source = MMCoreSource(core, block=True)
    source.start(pipeline)
    seq = useq.MDASequence(channels=list(channels),  # type: ignore[arg-type]  # (strings are coerced)
                           time_plan={"interval": interval_s, "loops": timepoints})  # type: ignore[arg-type]
    t0 = time.perf_counter()
    core.mda.run(seq)
    acquired = time.perf_counter() - t0
    source.stop()
    pipeline.stop()
    report = pipeline.stats()
    report["acquisition_s"] = acquired
    report["files"] = sink.stats()
    report["callback_ms_p50"] = float(np.percentile(np.asarray(source.callback_s) * 1000, 50))
    return report
