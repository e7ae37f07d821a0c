"""ChannelModel: one warm FM2S network per channel that denoises every frame and keeps learning.

Life of a channel: the first frame starts a *cold start* (stage 1, then stage-2 crop steps up to
`bootstrap_steps`, all on that frame); until it is done, frames are answered with the classical
pre-denoiser and flagged `bootstrap`. After that every frame gets full-frame inference, then a few *fine-tune*
steps on random crops of that frame with fresh FM2S noise injection. Each output keeps the raw
frame's low spatial frequencies (anchor: photometry) and static pixels of consecutive outputs are
averaged (TemporalAverage: flicker). With `temporal` on, some steps
are Noise2Noise-in-time: the current raw frame is mapped onto the previous raw frame of the same
position, after registration, and only when a motion guard says the two show the same scene.
A snapshot of the last good weights is kept; a failing or diverging step restores it.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field

import numpy as np
import torch
from scipy import ndimage

from .anchor import anchor
from .calibrate import auto_base, auto_preset, estimate_noise_or_none
from .devices import fast_inference_dtype
from .model import FM2SNet
from .offline import new_network
from .presets import Preset
from .registration import halve, overlap, refine_shift, register_shift
from .scaling import Scaling, quantize, scaling_for, to_unit
from .temporal import TemporalAverage
from .training import Trainer, as_batch, collapse_for_inference, make_target, random_crops, target_crops

STRUCTURE_FRACTION = 0.5

__all__ = ["ChannelConfig", "ChannelModel", "Prepared", "aligned_pair", "channel_config", "warm_up"]


@dataclass(frozen=True)
class ChannelConfig:
    """How each channel's network is bootstrapped and fine-tuned."""

    preset: Preset
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    seed: int = 0
    target: str = "mix"
    bootstrap_steps: int = 905
    bootstrap_crop: int = 128
    bootstrap_batch: int = 4
    bootstrap_lr: float = 2e-3
    bootstrap_lr_final: float = 1e-3
    finetune_crop: int = 96
    finetune_batch: int = 2
    finetune_lr: float = 1e-3
    train_bf16: bool = True  # bfloat16 autocast for training steps where native (see devices)
    temporal: bool = True
    motion_threshold: float = 3.0
    snapshot_every: int = 20
    inference_dtype: str = "auto"  # "auto" (bfloat16 where native, see devices), "float32", "bfloat16"
    anchor_sigma: float = 8.0  # keep the raw frame's spatial frequencies below this scale (px); 0 = off
    average_frames: int = 8  # motion-compensated average of unchanged pixels over up to N outputs; 1 = off
    average_threshold: float = 4.0  # restart a pixel's average beyond this many noise std of change
    average_registration: bool = True  # register the averaged history to each frame (stage drift, panning)
    max_positions: int = 32  # stage positions whose history (temporal pairs, averages) is kept
    auto_noise: bool = False  # calibrate noise parameters on the channel's frames (`--preset auto`)
    recalibrate_every: int = 100  # frames between re-estimates (smoothed) when auto_noise


def warm_up() -> None:
    """Pay the one-off costs of a process before the first frame does: torch's optimiser machinery
    (its first Adam imports torch._dynamo, ~1.2 s) and the compiled kernels (compiled on a machine's
    first run, several seconds; loaded from numba's cache after that)."""
    torch.optim.Adam([torch.zeros(1, requires_grad=True)])
    for dtype in (np.uint8, np.uint16):
        frame = np.full((16, 16), 100, dtype)
        TemporalAverage(2).apply(frame, frame.astype(np.float32))
        estimate_noise_or_none(frame)


def channel_config(preset: str, **kw: object) -> ChannelConfig:
    """A ChannelConfig for a preset name; "auto" calibrates each channel's noise on its own frames."""
    from .presets import get_preset

    auto = preset == "auto"
    return ChannelConfig(preset=get_preset("confocal" if auto else preset), auto_noise=auto, **kw)  # type: ignore[arg-type]


@dataclass
class Prepared:
    """A frame converted for the model: [0, 1] pixels, tensors, and what fine-tuning needs."""

    raw: np.ndarray
    unit: np.ndarray
    scaling: Scaling
    tensor: torch.Tensor  # (1, 1, H, W) on the device
    position: tuple[int, int]
    target: torch.Tensor | None = None  # stage-1 target, computed lazily
    previous: np.ndarray | None = None  # the previous frame of the same position, for temporal steps
    pair: tuple[torch.Tensor, torch.Tensor] | None = None  # (current, previous) aligned overlap
    pair_checked: bool = False
    averaged: float = 1.0  # mean frames averaged per pixel in this frame's output


class ChannelModel:
    """The warm network of one channel: `infer` answers now, `train_step` learns afterwards."""

    def __init__(self, name: str, config: ChannelConfig, init_from: ChannelModel | None = None,
                 first_frame: np.ndarray | None = None) -> None:
        self.name = name
        self.config = config
        self.device = config.device
        self.preset = config.preset
        self.base: str | None = None
        if config.auto_noise and first_frame is not None:  # the base (channels, median window) is fixed here
            est = estimate_noise_or_none(first_frame)
            self.base = auto_base(est) if est is not None else config.preset.name
            self.preset = auto_preset(first_frame, self.base)
        self.frames_seen = 0
        self.net: FM2SNet = new_network(self.preset.n_chan, config.seed, self.device)
        if init_from is not None and init_from.preset.n_chan == self.preset.n_chan:
            self.net.load_state_dict(init_from.net.state_dict())
        else:
            init_from = None
        self.trainer = Trainer(self.net, self.preset, self.device, seed=config.seed, lr=config.bootstrap_lr)
        self.trainer.bf16 = config.train_bf16 and fast_inference_dtype(self.device) == torch.bfloat16
        self.scaling: Scaling | None = None
        self.shape: tuple[int, int] | None = None
        self.bootstrap_done = init_from is not None and init_from.ready
        self.steps = 0
        self.temporal_steps = 0
        self.motion_rejects = 0
        self.restores = 0
        self.shape_changes = 0
        self._inference_net: FM2SNet | None = None
        self.inference_dtype = (
            fast_inference_dtype(self.device) if config.inference_dtype == "auto"
            else getattr(torch, config.inference_dtype)
        )
        self._previous: dict[tuple[int, int], np.ndarray] = {}
        self._bootstrap: Prepared | None = None  # the frame the cold start trains on
        self.average = TemporalAverage(config.average_frames, config.average_threshold,
                                       max_positions=config.max_positions, motion=config.average_registration)
        self._classical_history = False  # the temporal average holds pre-denoiser outputs (cold start)
        self._good_state = copy.deepcopy(self.net.state_dict())
        self._good_opt = copy.deepcopy(self.trainer.optimizer.state_dict())

    @property
    def ready(self) -> bool:
        """True once the cold start is over and the network answers instead of the pre-denoiser."""
        return self.bootstrap_done

    # -- answering ---------------------------------------------------------------------------------
    def prepare(self, pixels: np.ndarray, position: tuple[int, int] = (0, 0)) -> Prepared:
        """Convert a frame with this channel's (slowly adapting) intensity scaling."""
        shape = (int(pixels.shape[0]), int(pixels.shape[1]))
        if self.shape is not None and shape != self.shape:
            self.shape_changes += 1
            self._previous.clear()
            self.average.reset()
        self.shape = shape
        self.frames_seen += 1
        if self.base is not None and self.frames_seen % self.config.recalibrate_every == 0:
            self._recalibrate(pixels)
        self.scaling = self._update_scaling(pixels)
        unit = to_unit(pixels, self.scaling)
        tensor = as_batch(unit, self.device)
        return Prepared(pixels, unit, self.scaling, tensor, position)

    def _recalibrate(self, pixels: np.ndarray) -> None:
        """Re-estimate the noise parameters and move a third of the way there (log domain)."""
        new = auto_preset(pixels, self.base)
        old = self.preset
        mix = lambda a, b: math.exp((2 * math.log(a) + math.log(b)) / 3) if a > 0 and b > 0 else b  # noqa: E731
        self.preset = old.with_noise(mix(old.k_g, new.k_g), mix(old.k_p, new.k_p), mix(old.lambda_p, new.lambda_p))
        self.trainer.preset = self.trainer.injector.preset = self.preset

    def _update_scaling(self, pixels: np.ndarray) -> Scaling:
        """Per-channel scaling: fixed for uint8; for uint16 an exponential average over frames."""
        new = scaling_for(pixels)
        old = self.scaling
        if old is None or pixels.dtype == np.uint8:
            return new
        a = 0.05
        return Scaling((1 - a) * old.black + a * new.black, (1 - a) * old.white + a * new.white)

    def infer(self, prep: Prepared) -> tuple[np.ndarray, str]:
        """Denoised pixels (input dtype) and their status: "denoised" or "bootstrap".

        Either answer goes through the temporal average: during the cold start the classical
        pre-denoiser's outputs are averaged (a still or drifting field gains from time already), and
        that history is dropped when the network takes over, so its outputs are not mixed with them.
        """
        if not self.ready:
            out = make_target(prep.unit, self.preset, "gauss")
            camera = out * np.float32(prep.scaling.span) + np.float32(prep.scaling.black)
            camera, prep.averaged = self.average.apply(prep.raw, camera, prep.position)
            self._classical_history = True
            return quantize(camera, prep.raw.dtype), "bootstrap"
        if self._classical_history:
            self.average.reset()
            self._classical_history = False
        if self._inference_net is None:
            one = collapse_for_inference(self.net).to(self.inference_dtype)
            self._inference_net = one.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
        with torch.inference_mode():
            x = prep.tensor.to(self.inference_dtype).contiguous(memory_format=torch.channels_last)
            out = self._inference_net(x)[0, 0].float().cpu().numpy()
        camera = out.astype(np.float32) * np.float32(prep.scaling.span) + np.float32(prep.scaling.black)
        camera = anchor(camera, prep.raw, self.config.anchor_sigma)
        camera, prep.averaged = self.average.apply(prep.raw, camera, prep.position)
        return quantize(camera, prep.raw.dtype), "denoised"

    # -- learning ----------------------------------------------------------------------------------
    def _target(self, prep: Prepared) -> torch.Tensor:
        """The full-frame target (stage 1 only; later steps compute it per crop)."""
        if prep.target is None:
            t = make_target(prep.unit, self.preset, self.config.target)
            prep.target = as_batch(t, self.device)
        return prep.target

    def remember(self, prep: Prepared) -> None:
        """Keep this frame as its position's previous frame; link the one before it for temporal steps."""
        if not self.config.temporal:
            return
        prev = self._previous.pop(prep.position, None)
        self._previous[prep.position] = prep.unit  # most recently seen last
        while len(self._previous) > self.config.max_positions:
            self._previous.pop(next(iter(self._previous)))
        if prev is not None and prev.shape == prep.unit.shape:
            prep.previous = prev

    def _pair(self, prep: Prepared) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Registered (current, previous) overlap, computed once per frame; None if motion-guarded out."""
        if not prep.pair_checked and prep.previous is not None:
            prep.pair_checked = True
            pair = aligned_pair(prep.unit, prep.previous, self.config.motion_threshold)
            if pair is None:
                self.motion_rejects += 1
            else:
                prep.pair = (as_batch(pair[0], self.device)[0], as_batch(pair[1], self.device)[0])
        return prep.pair

    def train_step(self, prep: Prepared) -> bool:
        """One Adam step on this frame (cold start or fine-tune). False if it failed and was undone."""
        cfg = self.config
        try:
            if not self.ready:
                # the whole cold start trains on the channel's first frame, as the offline default
                # does: its target is computed once; frames arriving meanwhile are answered classically
                if self._bootstrap is None or self._bootstrap.raw.shape != prep.raw.shape:
                    self._bootstrap = prep
                loss = self._bootstrap_step(self._bootstrap)
                if self.ready:
                    self._bootstrap = None
            elif self.steps % 2 == 1 and (pair := self._pair(prep)) is not None:
                loss = self._temporal_step(pair)
            else:
                self.trainer.set_lr(cfg.finetune_lr)
                loss = self._noise_step(prep, cfg.finetune_crop, cfg.finetune_batch)
        except (RuntimeError, ValueError):
            self.restore()
            raise
        if not math.isfinite(loss):
            self.restore()
            return False
        self.steps += 1
        self._inference_net = None
        if self.steps % cfg.snapshot_every == 0:
            self.snapshot()
        return True

    def _bootstrap_step(self, prep: Prepared) -> float:
        cfg = self.config
        if self.steps < 5:  # stage 1: structure, full frame
            self.trainer.set_lr(1e-3)
            loss = self.trainer.structure_steps(prep.tensor, self._target(prep), 1)
        else:
            i = self.steps - 5
            n = max(1, cfg.bootstrap_steps - 5)
            lo = cfg.bootstrap_lr_final
            lr = lo + 0.5 * (cfg.bootstrap_lr - lo) * (1 + math.cos(math.pi * min(i, n) / n))
            self.trainer.set_lr(lr)
            loss = self._noise_step(prep, cfg.bootstrap_crop, cfg.bootstrap_batch)
        if self.steps + 1 >= cfg.bootstrap_steps:
            self.bootstrap_done = True
            self.snapshot()
        return loss

    def _noise_step(self, prep: Prepared, crop: int, batch: int) -> float:
        if not self.ready:  # the cold start's frame gets hundreds of steps: its target once, then crops
            y1 = random_crops(self._target(prep)[0].cpu(), crop, batch, self.trainer.crop_rng)
        else:  # a few steps per frame: the target of just the windows is cheaper
            y1 = target_crops(prep.unit, self.preset, self.config.target, crop, batch, self.trainer.crop_rng)
        y = self.trainer._replicate(y1)
        return self.trainer.step(self.trainer._replicate(self.trainer.injector(y1)), y)  # shared noise, as `fast`

    def _temporal_step(self, pair: tuple[torch.Tensor, torch.Tensor]) -> float:
        cfg = self.config
        stack = torch.cat(pair, dim=0)  # (2, h, w): same window in both
        crops = random_crops(stack, cfg.finetune_crop, cfg.finetune_batch, self.trainer.crop_rng)
        x = self.trainer._replicate(crops[:, :1])
        y = self.trainer._replicate(crops[:, 1:])
        self.trainer.set_lr(cfg.finetune_lr)
        self.temporal_steps += 1
        return self.trainer.step(x, y)

    def snapshot(self) -> None:
        """Remember the current weights as the last good state."""
        self._good_state = copy.deepcopy(self.net.state_dict())
        self._good_opt = copy.deepcopy(self.trainer.optimizer.state_dict())

    def restore(self) -> None:
        """Go back to the last good state (after a failed or diverging step)."""
        self.net.load_state_dict(self._good_state)
        self.trainer.optimizer.load_state_dict(self._good_opt)
        self._inference_net = None
        self.restores += 1

    def stats(self) -> dict[str, object]:
        """Counters for status lines and reports."""
        return {
            "ready": self.ready, "steps": self.steps, "temporal_steps": self.temporal_steps,
            "motion_rejects": self.motion_rejects, "restores": self.restores,
            "shape_changes": self.shape_changes, "scene_changes": self.average.scene_changes,
            "preset": {"name": self.preset.name, "n_chan": self.preset.n_chan, "k_g": round(self.preset.k_g, 3),
                       "k_p": round(self.preset.k_p, 3), "lambda_p": round(self.preset.lambda_p, 3)},
        }


def aligned_pair(
    cur: np.ndarray, prev: np.ndarray, threshold: float
) -> tuple[np.ndarray, np.ndarray] | None:
    """The overlapping windows of `cur` and the registered `prev`, or None if the scene changed.

    Motion guard: after alignment (and removal of a global intensity change), the difference of the
    two frames blurred (sigma 2) must either be explained by white noise (energy below `threshold`
    times the raw difference's variance x kappa, kappa = 1 / (4 pi sigma^2)) or be small next to the
    scene's own blurred structure (below STRUCTURE_FRACTION of its variance; spatially correlated
    noise, as in widefield data, fails the first test on static scenes). Measured on FMD: static
    pairs 0.03-0.24, a 3-pixel misregistration 0.29-0.40, a different scene 1.4-2.6.
    """
    h, w = cur.shape
    dy, dx = register_shift(ndimage.gaussian_filter(halve(cur), 1.0), ndimage.gaussian_filter(halve(prev), 1.0))
    dy, dx = refine_shift(cur, prev, 2 * dy, 2 * dx)  # registered at half resolution, refined to 1 pixel
    if abs(dy) > h // 4 or abs(dx) > w // 4:
        return None
    (ys, xs), (yp, xp) = overlap(h, w, dy, dx)
    a, b = cur[ys, xs], prev[yp, xp]
    if min(a.shape) < 32:
        return None
    diff = a - b
    diff = diff - float(diff.mean())  # a global intensity change (bleaching, lamp drift) is not motion
    blurred = ndimage.gaussian_filter(diff, 2.0)[8:-8, 8:-8]
    energy = float(np.mean(blurred**2))
    kappa = 1.0 / (4 * math.pi * 4.0)
    noise_explained = energy <= threshold * max(float(np.var(diff)) * kappa, 1e-12)
    structure = float(np.var(ndimage.gaussian_filter(a, 2.0)[8:-8, 8:-8]))
    small_change = energy <= STRUCTURE_FRACTION * max(structure, 1e-12)
    if not (noise_explained or small_change):
        return None
    mean_b = float(b.mean())
    if mean_b > 1e-6:  # the target must not teach a brightness change (bleaching, lamp drift)
        b = b * np.float32(float(a.mean()) / mean_b)
    return a, b

