"""TEST-ONLY: drive pycromanager's Python-backend acquisition engine with a UniMMCore.

pycromanager's Python backend expects a pymmcore core with snake_case methods and TaggedImage
objects. This shim adapts a UniMMCore (with the synthetic Python camera) to that shape. It relies
on pycromanager's private engine internals (acq_eng_py), so it lives in tests only; real users run
pycromanager with a Micro-Manager installation (Java backend) and just pass `image_process_fn`.
"""

from __future__ import annotations

import atexit
from typing import Any

from fm2s_stream.adapters.mm_demo import build_core


class TaggedImage:
    def __init__(self, tags: Any, pix: Any) -> None:
        self.tags, self.pix = tags, pix


def snake_core(channels: tuple[str, ...] = ("GFP",), shape: tuple[int, int] = (128, 128)) -> Any:
    core = build_core(channels, shape)

    class SnakeCaseCore(type(core)):  # type: ignore[misc]
        TaggedImage = TaggedImage

        def __getattr__(self, name: str) -> Any:
            if "_" in name and not name.startswith("_"):
                head, *rest = name.split("_")
                camel = head + "".join(p[:1].upper() + p[1:] for p in rest)
                return object.__getattribute__(self, camel.replace("Xy", "XY").replace("Slm", "SLM"))
            raise AttributeError(name)

        def get_tagged_image(self, cam_index: int, camera: str, height: int, width: int) -> TaggedImage:
            self.snapImage()
            return TaggedImage({"Camera": camera, "Height": height, "Width": width}, self.getImage())

        def pop_next_tagged_image(self) -> TaggedImage:
            img, md = self.popNextImageAndMD()
            return TaggedImage(dict(md), img)

    core.__class__ = SnakeCaseCore
    return core


def run_acquisition(directory: str, hook: Any, timepoints: int = 4, shape: tuple[int, int] = (128, 128)) -> Any:
    """A real pycromanager (Python backend) time-lapse with `hook` as image_process_fn; returns the NDTiff path."""
    from pycromanager import multi_d_acquisition_events
    from pycromanager.acquisition.acq_eng_py.internal.engine import Engine
    from pycromanager.acquisition.python_backend_acquisitions import PythonBackendAcquisition

    if Engine.get_instance() is None:  # one engine per process: pycromanager's engine is a singleton
        engine = Engine(snake_core(shape=shape))
        atexit.register(engine.shutdown)
    acq = PythonBackendAcquisition(directory=directory, name="fm2s", image_process_fn=hook)
    acq.acquire(multi_d_acquisition_events(num_time_points=timepoints))
    acq.mark_finished()
    acq.await_completion()
    return acq.get_dataset().path
