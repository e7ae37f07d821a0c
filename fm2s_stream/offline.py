"""One-shot denoising of a single frame: the library's main entry point (`fm2s_stream.denoise`)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

import numpy as np
import torch

from .anchor import anchor
from .devices import resolve_device
from .model import FM2SNet
from .presets import Preset, get_preset
from .scaling import check_frame, from_unit, scaling_for, to_unit
from .training import SCHEDULES, Schedule, Trainer, TrainReport, as_batch, infer, make_target, scaled

__all__ = ["denoise", "denoise_stack", "denoise_unit", "new_network"]

WARM_FRACTION = 0.2  # later planes of a stack continue training for this share of the schedule
ANCHOR_SIGMA = 16.0  # outputs keep the raw frame's spatial frequencies below this scale (photometry)


def new_network(n_chan: int, seed: int, device: torch.device) -> FM2SNet:
    """A freshly initialised network, seeded without touching torch's global RNG."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = FM2SNet(n_chan)
    return net.to(device).to(memory_format=torch.channels_last)  # type: ignore[call-overload,no-any-return]


def denoise_unit(
    unit: np.ndarray,
    preset: Preset,
    schedule: Schedule,
    device: torch.device,
    seed: int = 0,
    on_step: Callable[[int], None] | None = None,
) -> tuple[np.ndarray, TrainReport]:
    """Train a fresh network on a [0, 1] float frame and return its denoised version."""
    target = make_target(unit, preset, schedule.target).numpy()
    raw_t, tgt_t = as_batch(unit, device), as_batch(target, device)
    net = new_network(preset.n_chan, seed, device)
    trainer = Trainer(net, preset, device, seed=seed)
    trainer.on_step = on_step
    report = trainer.fit(raw_t, tgt_t, schedule)
    out = infer(net, raw_t, schedule.tta)[0, 0].float().cpu().numpy()
    return out, report


def _schedule(method: str | Schedule) -> Schedule:
    if isinstance(method, Schedule):
        return method
    if method not in SCHEDULES:
        raise ValueError(f"unknown method {method!r}; choose one of {', '.join(SCHEDULES)}")
    return SCHEDULES[method]


def _preset(preset: str | Preset, frame: np.ndarray) -> Preset:
    """A Preset object; "auto" calibrates the noise parameters on `frame` (see calibrate.auto_preset)."""
    if isinstance(preset, Preset):
        return preset
    if preset == "auto":
        from .calibrate import auto_preset

        return auto_preset(frame)
    return get_preset(preset)


def denoise(
    frame: np.ndarray,
    preset: str | Preset = "auto",
    method: str | Schedule = "fast",
    device: str | torch.device | None = "auto",
    seed: int = 0,
    anchor_sigma: float = ANCHOR_SIGMA,
    on_step: Callable[[int], None] | None = None,
) -> np.ndarray:
    """Denoise one uint8/uint16 2D frame with FM2S; returns the same dtype and shape.

    preset: a paper preset name, "auto" (noise calibrated on the frame) or a `Preset`;
    method: "fast" (default), "paper" or a `Schedule`; anchor_sigma: the output keeps the raw
    frame's spatial frequencies below this scale in pixels, so region means stay the raw frame's
    (0 = off, the paper's behaviour; the median target otherwise darkens dim frames by up to ~13 %);
    on_step: called with the step count after every training step (progress; an exception it raises stops).
    """
    check_frame(frame)
    scaling = scaling_for(frame)
    p = _preset(preset, frame)
    unit = to_unit(frame, scaling)
    out, _ = denoise_unit(unit, p, _schedule(method), resolve_device(device), seed, on_step)
    return from_unit(anchor(out, unit, anchor_sigma).numpy(), scaling, frame.dtype)


def denoise_stack(
    data: np.ndarray,
    axes: str = "",
    preset: str | Preset = "auto",
    method: str | Schedule = "fast",
    device: str | torch.device | None = "auto",
    seed: int = 0,
    progress: Callable[[int, int], None] | None = None,
    anchor_sigma: float = ANCHOR_SIGMA,
    on_step: Callable[[int], None] | None = None,
) -> np.ndarray:
    """Denoise a 2D frame or an N-D stack (last two axes Y, X) plane by plane.

    One network per channel (the "C" axis of `axes`, if any) is warm-started from plane to plane:
    the first plane gets the full schedule, later planes WARM_FRACTION of its stage 2. With
    preset "auto" each channel's noise parameters are calibrated on its first plane.
    """
    if data.ndim == 2:
        return denoise(data, preset, method, device, seed, anchor_sigma, on_step)
    if data.ndim < 2:
        raise ValueError(f"expected a 2D frame or a stack, got shape {data.shape}")
    sched, dev = _schedule(method), resolve_device(device)
    presets: dict[int, Preset] = {}
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
        p = presets.get(channel) or presets.setdefault(channel, _preset(preset, plane))
        trainer = trainers.get(channel)
        if trainer is None:
            trainer = trainers[channel] = Trainer(new_network(p.n_chan, seed + channel, dev), p, dev, seed=seed)
            trainer.on_step = on_step
            plan = sched
        else:
            plan = replace(scaled(sched, WARM_FRACTION), stage1_steps=0)
        target = as_batch(make_target(unit, p, sched.target).numpy(), dev)
        trainer.fit(raw_t, target, plan)
        den = infer(trainer.net, raw_t, sched.tta)[0, 0].float().cpu().numpy()
        out[index] = from_unit(anchor(den, unit, anchor_sigma).numpy(), scaling, plane.dtype)
        if progress is not None:
            progress(i + 1, len(planes))
    return out
