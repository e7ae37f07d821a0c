"""fm2s_stream: real-time, acquisition-side zero-shot denoising of fluorescence micrographs (FM2S).

Public API: `denoise` (one frame), `denoise_stack`, `Frame`, `Pipeline`, `Preset`, `get_preset`.
Heavy modules (torch) load on first use, not at import.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"
__all__ = ["Frame", "Pipeline", "PipelineConfig", "Preset", "__version__", "denoise", "denoise_stack",
           "get_preset"]

_LAZY = {
    "denoise": "offline", "denoise_stack": "offline", "Frame": "frame", "Pipeline": "pipeline",
    "PipelineConfig": "pipeline", "Preset": "presets", "get_preset": "presets",
}

if TYPE_CHECKING:
    from .frame import Frame
    from .offline import denoise, denoise_stack
    from .pipeline import Pipeline, PipelineConfig
    from .presets import Preset, get_preset


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module 'fm2s_stream' has no attribute {name!r}")
