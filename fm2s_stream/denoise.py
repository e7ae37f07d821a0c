"""One-shot denoising of a single frame: the library's main entry point (`fm2s_stream.denoise`)."""

from __future__ import annotations

import numpy as np
import torch

from .devices import resolve_device
from .model import FM2SNet
from .presets import Preset, get_preset
from .scaling import check_frame, from_unit, scaling_for, to_unit
from .training import SCHEDULES, Schedule, Trainer, TrainReport, infer, make_target

__all__ = ["denoise", "denoise_unit", "new_network"]


def new_network(n_chan: int, seed: int, device: torch.device) -> FM2SNet:
    """A freshly initialised network, seeded without touching torch's global RNG."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = FM2SNet(n_chan)
    return net.to(device).to(memory_format=torch.channels_last)


def denoise_unit(
    unit: np.ndarray,
    preset: Preset,
    schedule: Schedule,
    device: torch.device,
    seed: int = 0,
) -> tuple[np.ndarray, TrainReport]:
    """Train a fresh network on a [0, 1] float frame and return its denoised version."""
    target = make_target(unit, preset, schedule.target)
    raw_t = torch.from_numpy(np.ascontiguousarray(unit, dtype=np.float32))[None, None].to(device)
    tgt_t = torch.from_numpy(np.ascontiguousarray(target, dtype=np.float32))[None, None].to(device)
    net = new_network(preset.n_chan, seed, device)
    report = Trainer(net, preset, device, seed=seed).fit(raw_t, tgt_t, schedule)
    out = infer(net, raw_t)[0, 0].float().cpu().numpy()
    return out, report


def denoise(
    frame: np.ndarray,
    preset: str | Preset = "confocal",
    method: str | Schedule = "fast",
    device: str | torch.device | None = "auto",
    seed: int = 0,
) -> np.ndarray:
    """Denoise one uint8/uint16 2D frame with FM2S; returns the same dtype and shape.

    preset: a paper preset name or a `Preset`; method: "fast" (default), "paper" or a `Schedule`.
    """
    check_frame(frame)
    p = get_preset(preset) if isinstance(preset, str) else preset
    if isinstance(method, str):
        if method not in SCHEDULES:
            raise ValueError(f"unknown method {method!r}; choose one of {', '.join(SCHEDULES)}")
        method = SCHEDULES[method]
    scaling = scaling_for(frame)
    out, _ = denoise_unit(to_unit(frame, scaling), p, method, resolve_device(device), seed)
    return from_unit(out, scaling, frame.dtype)
