"""One-shot denoising of a single frame: the library's main entry point (`fm2s_stream.denoise`)."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .anchor import anchor
from .blockmatch import block_matched
from .calibrate import NoiseEstimate, auto_preset, estimate_noise_or_none
from .devices import resolve_device
from .model import FM2SNet
from .presets import Preset, get_preset
from .scaling import check_frame, from_unit, quantize, scaling_for, to_unit
from .state import StateError, StateStore
from .training import SCHEDULES, Schedule, Trainer, TrainReport, as_batch, infer, make_target

__all__ = ["OFFLINE_INIT", "StackDenoiser", "average_stack", "channel_axis", "denoise", "denoise_kept", "denoise_plane",
           "denoise_stack", "denoise_unit", "init_for", "iter_denoised", "learn_channels", "new_network",
           "representative_plane", "start_network"]

# Stacks (benchmarks/stack.py, dev FMD fields as 4-plane stacks, seed 0; mean PSNR, s per plane after the
# one cold start): single-image default on every plane 32.94 dB, 13.0 s; learnt once + inference with
# TTA 8: 32.92, 0.26 s; + 50 fine-tune steps per plane: 32.87, 1.07 s; TTA 2: 32.90, 0.068 s; TTA 1: 32.90.
STACK_FINETUNE_STEPS = 0  # stage-2 steps per plane after its channel's one cold start (fine-tuning did not pay)
STACK_TTA = 2  # inference views per plane of a stack (8 costs 4x for +0.02 dB)
# the offline schedule starts from the generic network: +0.07 dB over random weights on the 12 dev FMD
# images after its 905 steps (33.01 vs 32.94, benchmarks/init_study.py, seed 0; 11 of 12 images >=)
OFFLINE_INIT = "generic"
log = logging.getLogger(__name__)
ANCHOR_SIGMA = 16.0  # outputs keep the raw frame's spatial frequencies below this scale (photometry)


def new_network(n_chan: int, seed: int, device: torch.device) -> FM2SNet:
    """A freshly initialised network, seeded without touching torch's global RNG."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = FM2SNet(n_chan)
    return net.to(device).to(memory_format=torch.channels_last)  # type: ignore[call-overload,no-any-return]


def start_network(n_chan: int, seed: int, device: torch.device, init: str = OFFLINE_INIT) -> FM2SNet:
    """A network to train from: the shipped generic one ("generic", if the package has it) or random."""
    if init not in ("generic", "random"):
        raise ValueError(f"init must be 'generic' or 'random', got {init!r}")
    net = new_network(n_chan, seed, device)
    if init == "generic":
        from .starting import load_generic

        load_generic(net)
    return net


def init_for(init: str | None, schedule: Schedule) -> str:
    """Where a network starts: as asked, else random weights for the authors' schedule (theirs) and
    OFFLINE_INIT for the others."""
    if init is not None:
        return init
    return "random" if schedule.faithful_output else OFFLINE_INIT


def denoise_unit(
    unit: np.ndarray,
    preset: Preset,
    schedule: Schedule,
    device: torch.device,
    seed: int = 0,
    on_step: Callable[[int], None] | None = None,
    init: str | None = None,
    prior: np.ndarray | None = None,
) -> tuple[np.ndarray, TrainReport]:
    """Train a network (started as `init` says) on a [0, 1] float frame and return its denoised version.

    prior: a classical estimate of the same frame ([0, 1], `classical_prior`); where the schedule gives
    it a weight, the output is blended with it, and where the injection is white (preset.rho 0) it is
    also the target (two-photon +0.07 dB; under correlated injection it cost widefield 0.2 dB: README
    "Quality").
    """
    blend = schedule.prior_weight if prior is not None else 0.0
    if prior is not None and blend > 0 and preset.rho == 0:
        target = np.ascontiguousarray(prior, np.float32)
    else:
        target = make_target(unit, preset, schedule.target).numpy()
    raw_t, tgt_t = as_batch(unit, device), as_batch(target, device)
    net = start_network(preset.n_chan, seed, device, init_for(init, schedule))
    trainer = Trainer(net, preset, device, seed=seed)
    trainer.on_step = on_step
    report = trainer.fit(raw_t, tgt_t, schedule)
    out = infer(net, raw_t, schedule.tta)[0, 0].float().cpu().numpy()
    if prior is not None and blend > 0:
        out = (1.0 - blend) * out + blend * prior
    return out, report


def classical_prior(frame: np.ndarray, schedule: Schedule, est: NoiseEstimate | None) -> np.ndarray | None:
    """The block-matched estimate of a camera frame in [0, 1] units, where the schedule uses one and the
    frame's noise law (`est`) holds for it (`blockmatch.block_matched` says when it does not); else None."""
    if schedule.prior_weight <= 0 or est is None:
        return None
    prior = block_matched(frame, est.a, est.b, est.rho)
    if prior.estimate is None:
        log.info("no block-matched prior: %s", prior.reason)
        return None
    return to_unit(prior.estimate, scaling_for(frame)).astype(np.float32)


def _schedule(method: str | Schedule) -> Schedule:
    if isinstance(method, Schedule):
        return method
    if method not in SCHEDULES:
        raise ValueError(f"unknown method {method!r}; choose one of {', '.join(SCHEDULES)}")
    return SCHEDULES[method]


def _preset(preset: str | Preset, frame: np.ndarray, est: NoiseEstimate | None = None) -> Preset:
    """A Preset object; "auto" calibrates the noise parameters on `frame` (see calibrate.auto_preset),
    from `est` where the caller has the frame's estimate already."""
    if isinstance(preset, Preset):
        return preset
    if preset == "auto":
        return auto_preset(frame, est=est)
    return get_preset(preset)


def denoise(
    frame: np.ndarray,
    preset: str | Preset = "auto",
    method: str | Schedule = "fast",
    device: str | torch.device | None = "auto",
    seed: int = 0,
    anchor_sigma: float = ANCHOR_SIGMA,
    on_step: Callable[[int], None] | None = None,
    init: str | None = None,
    state_dir: str | Path | None = None,
    channel: str = "default",
) -> np.ndarray:
    """Denoise one uint8/uint16 2D frame with FM2S; returns the same dtype and shape.

    preset: a paper preset name, "auto" (noise calibrated on the frame) or a `Preset`;
    method: "fast" (default), "paper" (the authors' code step for step, its output too: no anchoring,
    truncated to integers; their seed is `training.PAPER_SEED`) or a `Schedule`; anchor_sigma: the output keeps the raw
    frame's spatial frequencies below this scale in pixels, so region means stay the raw frame's
    (0 = off, the paper's behaviour; the median target otherwise darkens dim frames by up to ~13 %);
    on_step: called with the step count after every training step (progress; an exception it raises stops);
    init: "generic" (the shipped starting network) or "random" (the paper's; None: the method's, see `init_for`);
    state_dir: keep the learnt network as channel `channel` there, or use the one kept (`StackDenoiser`).
    With the `fast` schedule, a frame whose noise law holds also gets a block-matched estimate
    (`classical_prior`): the output is the mean of it and the network's, which learns towards it where
    its injection is white.
    """
    check_frame(frame)
    if state_dir is not None:
        return denoise_kept(frame, state_dir, channel, preset, method, device, seed, anchor_sigma, on_step, init)[0]
    scaling = scaling_for(frame)
    schedule = _schedule(method)
    est = estimate_noise_or_none(frame) if preset == "auto" or schedule.prior_weight > 0 else None
    p = _preset(preset, frame, est)
    unit = to_unit(frame, scaling)
    prior = classical_prior(frame, schedule, est)
    out, _ = denoise_unit(unit, p, schedule, resolve_device(device), seed, on_step, init, prior)
    if schedule.faithful_output:  # the authors' output: clamp [0, 1], scale, truncate (their .int()), no anchor
        values = np.floor(np.clip(out.astype(np.float64), 0.0, 1.0) * scaling.span + scaling.black)
        return quantize(values, frame.dtype)
    return from_unit(anchor(out, unit, anchor_sigma).numpy(), scaling, frame.dtype)


def denoise_kept(
    frame: np.ndarray,
    state_dir: str | Path,
    channel: str = "default",
    preset: str | Preset = "auto",
    method: str | Schedule = "fast",
    device: str | torch.device | None = "auto",
    seed: int = 0,
    anchor_sigma: float = ANCHOR_SIGMA,
    on_step: Callable[[int], None] | None = None,
    init: str | None = None,
) -> tuple[np.ndarray, dict[str, str]]:
    """`denoise` of one frame with channel `channel` kept in `state_dir`; also what happened to it
    (`StackDenoiser.notes`: resumed, saved, or why the saved state was not used)."""
    schedule = _schedule(method)
    one = StackDenoiser(preset, schedule, device, seed, anchor_sigma, 0, on_step, schedule.tta, init, state_dir,
                        [channel])
    one.learn(0, frame)
    return one.plane(0, frame), one.notes


def representative_plane(planes: list[np.ndarray]) -> int:
    """Index of the plane whose mean brightness is the median of the planes' (bleaching, an empty first frame)."""
    means = np.array([float(np.mean(p[::8, ::8])) for p in planes])
    return int(np.argsort(means)[len(means) // 2])


class StackDenoiser:
    """One network per channel, learnt once on a representative plane, then any plane of it denoised.

    `learn` runs the single-image schedule on that plane (noise calibrated on it with preset
    "auto"); `plane` runs `finetune_steps` stage-2 steps on the plane's own target (0 = inference
    only), then inference with `tta` views and anchoring. Planes of a stack share their channel's
    scene and noise, so one cold start serves them all (measured: see STACK_TTA).

    With `state_dir`, channels are kept by name (`names[c]`, else "default-<c>") in the same
    `StateStore` files the stream keeps: a channel found there, learnt on frames of the same dtype,
    is not learnt again (its saved network and noise parameters are used), and one learnt here is
    saved for the next run, `denoise` or `serve` alike. A state that cannot be used is reported in
    `notes` (file and reason) and the channel is learnt as without one.
    """

    def __init__(self, preset: str | Preset = "auto", method: str | Schedule = "fast",
                 device: str | torch.device | None = "auto", seed: int = 0, anchor_sigma: float = ANCHOR_SIGMA,
                 finetune_steps: int = STACK_FINETUNE_STEPS, on_step: Callable[[int], None] | None = None,
                 tta: int = STACK_TTA, init: str | None = None, state_dir: str | Path | None = None,
                 names: Sequence[str] = ()) -> None:
        self.preset, self.schedule, self.device = preset, _schedule(method), resolve_device(device)
        self.tta, self.init = tta, init_for(init, self.schedule)
        self.seed, self.anchor_sigma, self.finetune_steps, self.on_step = seed, anchor_sigma, finetune_steps, on_step
        self.trainers: dict[int, Trainer] = {}
        self.names = list(names)
        self.store = StateStore(state_dir) if state_dir is not None else None
        self.notes: dict[str, str] = {}  # channel name -> "resumed ...", "saved ...", why its state was not used

    def name_of(self, channel: int) -> str:
        """The name channel index `channel` is kept under in a state directory."""
        return self.names[channel] if channel < len(self.names) else f"default-{channel}"

    def learn(self, channel: int, plane: np.ndarray) -> None:
        """Train channel `channel`'s network on `plane` (uint8/uint16 2D) with the whole schedule,
        or take it from the state directory when it holds a usable one."""
        check_frame(plane)
        if self._resume(channel, plane):
            return
        unit = to_unit(plane, scaling_for(plane))
        p = _preset(self.preset, plane)
        net = start_network(p.n_chan, self.seed + channel, self.device, self.init)
        trainer = Trainer(net, p, self.device, seed=self.seed)
        trainer.on_step = self.on_step
        raw_t = as_batch(unit, self.device)
        trainer.fit(raw_t, as_batch(make_target(unit, p, self.schedule.target).numpy(), self.device), self.schedule)
        self.trainers[channel] = trainer
        self._save(channel, plane, trainer)

    def _note(self, name: str, message: str, problem: bool = False) -> None:
        self.notes[name] = f"{self.notes[name]}; {message}" if name in self.notes else message
        if problem:
            log.warning("channel %r: %s", name, message)

    def _resume(self, channel: int, plane: np.ndarray) -> bool:
        """Take channel `channel`'s trainer from the state directory; False (and why, in `notes`) if not."""
        if self.store is None:
            return False
        name = self.name_of(channel)
        try:
            saved = self.store.load(name)
        except StateError as exc:
            self._note(name, f"learnt anew: {exc}", problem=True)
            return False
        if saved is None:
            return False
        tensors, meta = saved
        path = self.store.path_for(name)
        if not meta.get("ready"):
            self._note(name, f"learnt anew: {path} holds an unfinished cold start", problem=True)
            return False
        if meta.get("dtype") != plane.dtype.str:
            self._note(name, f"learnt anew: {path} was learnt on {meta.get('dtype')} frames, these are "
                             f"{plane.dtype.str}", problem=True)
            return False
        try:
            preset = Preset.from_record(meta.get("preset"))
            net = new_network(preset.n_chan, self.seed + channel, self.device)
            net.load_state_dict({k: v.to(self.device) for k, v in tensors["net"].items()})
            trainer = Trainer(net, preset, self.device, seed=self.seed)
            trainer.load_optimizer(tensors["opt"])
        except Exception as exc:  # any mismatch of the weights or the noise record: learn instead
            self._note(name, f"learnt anew: {path}: weights do not fit ({type(exc).__name__}: {exc})", problem=True)
            return False
        trainer.on_step = self.on_step
        self.trainers[channel] = trainer
        self._note(name, f"resumed from {path} ({meta.get('frames_learnt', '?')} frames learnt, no cold start)")
        return True

    def _save(self, channel: int, plane: np.ndarray, trainer: Trainer) -> None:
        """Keep what channel `channel` learnt on `plane` for the next run (offline or streaming)."""
        if self.store is None:
            return
        name = self.name_of(channel)
        p = trainer.preset
        tensors = {"net": {k: v.detach().cpu() for k, v in trainer.net.state_dict().items()},
                   "opt": trainer.optimizer_record(), "steps": trainer.steps, "temporal_steps": 0,
                   "answer_from": 0}
        meta = {"channel": name, "n_chan": p.n_chan, "base": p.name, "preset": p.record(), "scaling": None,
                "shape": list(plane.shape), "dtype": plane.dtype.str, "frames_seen": 1, "frames_learnt": 1,
                "steps": trainer.steps, "ready": True}
        if self.store.save(name, tensors, meta):
            self._note(name, f"saved to {self.store.path_for(name)}")
        else:
            self._note(name, self.store.problems[-1] if self.store.problems else "not saved", problem=False)

    def plane(self, channel: int, plane: np.ndarray) -> np.ndarray:
        """The denoised plane (same dtype) with channel `channel`'s network (learnt first)."""
        check_frame(plane)
        trainer = self.trainers[channel]
        if self.finetune_steps:
            unit = to_unit(plane, scaling_for(plane))
            s = self.schedule
            target = as_batch(make_target(unit, trainer.preset, s.target).numpy(), self.device)
            trainer.set_lr(s.lr_final)
            trainer.noise_steps(target, self.finetune_steps, s.crop, s.batch)
        return denoise_plane(trainer.net, plane, self.tta, self.anchor_sigma)


def denoise_plane(net: FM2SNet, plane: np.ndarray, tta: int = STACK_TTA,
                  anchor_sigma: float = ANCHOR_SIGMA) -> np.ndarray:
    """Inference of a learnt network on one uint8/uint16 plane, anchored, in the plane's dtype.

    The one per-plane step of a stack, wherever it runs (this process or a Dask worker).
    """
    scaling = scaling_for(plane)
    unit = to_unit(plane, scaling)
    device = next(net.parameters()).device
    den = infer(net, as_batch(unit, device), tta)[0, 0].float().cpu().numpy()
    return from_unit(anchor(den, unit, anchor_sigma).numpy(), scaling, plane.dtype)


def channel_axis(axes: str, ndim: int) -> int | None:
    """Position of the C axis among a stack's leading axes, or None (one channel)."""
    return axes.index("C") if len(axes) == ndim and "C" in axes[:-2] else None


def iter_denoised(
    data: Any,
    axes: str,
    denoiser: StackDenoiser,
    start: int = 0,
    learnt: Callable[[int, int], None] | None = None,
) -> Iterator[tuple[tuple[int, ...], np.ndarray]]:
    """(index, denoised plane) of every plane of an N-D stack from plane number `start` on, in C order.

    Each channel's network is learnt (once, on its representative plane) before its first plane;
    `learnt(channel, plane number)` is called after each.
    """
    c_axis = channel_axis(axes, data.ndim)
    planes = list(np.ndindex(*data.shape[:-2]))
    for index in planes[start:]:
        channel = index[c_axis] if c_axis is not None else 0
        if channel not in denoiser.trainers:
            learn_channels(data, axes, denoiser, [channel], learnt)
        yield index, denoiser.plane(channel, np.asarray(data[index]))


def learn_channels(data: Any, axes: str, denoiser: StackDenoiser, channels: list[int] | None = None,
                   learnt: Callable[[int, int], None] | None = None) -> None:
    """Learn each channel (all by default) of a stack on its representative plane (among <= ~64 sampled)."""
    c_axis = channel_axis(axes, data.ndim)
    planes = list(np.ndindex(*data.shape[:-2]))
    wanted = channels if channels is not None else list(range(data.shape[c_axis])) if c_axis is not None else [0]
    for channel in wanted:
        mine = [i for i in planes if c_axis is None or i[c_axis] == channel]
        sample = mine[:: max(1, len(mine) // 64)]
        best = sample[representative_plane([np.asarray(data[i]) for i in sample])]
        denoiser.learn(channel, np.asarray(data[best]))
        if learnt is not None:
            learnt(channel, planes.index(best))


def average_stack(raw: Any, denoised: np.ndarray, axes: str, frames: int, non_causal: bool = True) -> np.ndarray:
    """Registered temporal average of a denoised stack along its T axis (past and future neighbours).

    Each series (every index of the other leading axes: a channel, a z, a position) is averaged on
    its own (`temporal.average_series`); the result has `denoised`'s dtype.
    """
    from .temporal import average_series

    if len(axes) != denoised.ndim or "T" not in axes[:-2]:
        raise ValueError(f"temporal averaging needs a T axis; this stack's axes are {axes!r}")
    t_axis = axes.index("T")
    raw_t, den_t = np.moveaxis(np.asarray(raw), t_axis, 0), np.moveaxis(denoised, t_axis, 0)
    out_t = np.empty_like(den_t)
    info = np.iinfo(denoised.dtype)
    for rest in np.ndindex(*den_t.shape[1:-2]):
        series = (slice(None), *rest)
        avg = average_series(list(raw_t[series]), list(den_t[series]), frames, non_causal=non_causal)
        out_t[series] = np.clip(np.rint(np.stack(avg)), info.min, info.max)
    return np.moveaxis(out_t, 0, t_axis)


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
    finetune_steps: int = STACK_FINETUNE_STEPS,
    tta: int = STACK_TTA,
    average: int = 1,
    init: str | None = None,
    state_dir: str | Path | None = None,
    names: Sequence[str] = (),
) -> np.ndarray:
    """Denoise a 2D frame (exactly `denoise`) or an N-D stack (last two axes Y, X) plane by plane.

    A stack gets one network per channel (the "C" axis of `axes`, if any), learnt once on a
    representative plane, then `finetune_steps` per plane and inference (`StackDenoiser`); with
    `average` > 1, a non-causal registered temporal average over up to that many frames along T
    (`average_stack`). With `state_dir`, channel c is kept there as `names[c]` (see `StackDenoiser`).
    """
    if data.ndim == 2:
        return denoise(data, preset, method, device, seed, anchor_sigma, on_step, init, state_dir,
                       names[0] if names else "default")
    if data.ndim < 2:
        raise ValueError(f"expected a 2D frame or a stack, got shape {data.shape}")
    denoiser = StackDenoiser(preset, method, device, seed, anchor_sigma, finetune_steps, on_step, tta, init,
                             state_dir, names)
    out = np.empty_like(data)
    total = int(np.prod(data.shape[:-2]))
    for i, (index, plane) in enumerate(iter_denoised(data, axes, denoiser)):
        out[index] = plane
        if progress is not None:
            progress(i + 1, total)
    return average_stack(data, out, axes, average) if average > 1 else out
