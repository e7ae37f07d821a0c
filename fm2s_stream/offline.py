"""One-shot denoising of a single frame: the library's main entry point (`fm2s_stream.denoise`)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

import numpy as np
import torch

from .devices import resolve_device
from .model import FM2SNet
from .presets import Preset, get_preset
from .scaling import check_frame, from_unit, scaling_for, to_unit
from .training import SCHEDULES, Schedule, Trainer, TrainReport, as_batch, infer, make_target, scaled

__all__ = ["denoise", "denoise_stack", "denoise_unit", "new_network"]

WARM_FRACTION = 0.2  # later planes of a stack continue training for this share of the schedule


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
    raw_t, tgt_t = as_batch(unit, device), as_batch(target, device)
    net = new_network(preset.n_chan, seed, device)
    report = Trainer(net, preset, device, seed=seed).fit(raw_t, tgt_t, schedule)
    out = infer(net, raw_t, schedule.tta)[0, 0].float().cpu().numpy()
    return out, report


def _schedule(method: str | Schedule) -> Schedule:
    if isinstance(method, Schedule):
        return method
    if method not in SCHEDULES:
        raise ValueError(f"unknown method {method!r}; choose one of {', '.join(SCHEDULES)}")
    return SCHEDULES[method]


def _preset(preset: str | Preset) -> Preset:
    return get_preset(preset) if isinstance(preset, str) else preset


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
    scaling = scaling_for(frame)
    out, _ = denoise_unit(to_unit(frame, scaling), _preset(preset), _schedule(method), resolve_device(device), seed)
    return from_unit(out, scaling, frame.dtype)


def denoise_stack(
    data: np.ndarray,
    axes: str = "",
    preset: str | Preset = "confocal",
    method: str | Schedule = "fast",
    device: str | torch.device | None = "auto",
    seed: int = 0,
    progress: Callable[[int, int], None] | None = None,
) -> np.ndarray:
    """Denoise a 2D frame or an N-D stack (last two axes Y, X) plane by plane.

    One network per channel (the "C" axis of `axes`, if any) is warm-started from plane to plane:
    the first plane gets the full schedule, later planes WARM_FRACTION of its stage 2.
    """
    if data.ndim == 2:
        return denoise(data, preset, method, device, seed)
    if data.ndim < 2:
        raise ValueError(f"expected a 2D frame or a stack, got shape {data.shape}")
    p, sched, dev = _preset(preset), _schedule(method), resolve_device(device)
    c_axis = axes.index("C") if len(axes) == data.ndim and "C" in axes[:-2] else None
    out = np.empty_like(data)
    trainers: dict[int, Trainer] = {}
    planes = list(np.ndindex(*data.shape[:-2]))
    for i, index in enumerate(planes):
        plane = data[index]
        check_frame(plane)
        channel = index[c_axis] if c_axis is not None else 0
        scaling = scaling_for(plane)
        unit = to_unit(plane, scaling)
        raw_t = as_batch(unit, dev)
        trainer = trainers.get(channel)
        if trainer is None:
            trainer = trainers[channel] = Trainer(new_network(p.n_chan, seed + channel, dev), p, dev, seed=seed)
            plan = sched
        else:
            plan = replace(scaled(sched, WARM_FRACTION), stage1_steps=0)
        target = as_batch(make_target(unit, p, sched.target), dev)
        trainer.fit(raw_t, target, plan)
        out[index] = from_unit(infer(trainer.net, raw_t, sched.tta)[0, 0].float().cpu().numpy(), scaling, plane.dtype)
        if progress is not None:
            progress(i + 1, len(planes))
    return out
