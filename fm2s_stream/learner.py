"""Learner: one channel's network, optimiser, schedule position and snapshots; `infer` and the three steps.

It answers (`infer`, tiled on the CPU so that large frames stay in cache) and learns: the cold start
follows the offline default's `Schedule` step for step (stage 1, then stage-2 crop steps with its
cosine learning rate) on the channel's first frame; afterwards every frame gets fine-tune steps on
random crops with fresh FM2S noise, and, with temporal pairs, Noise2Noise steps in time. Every
tensor it touches lives on its device; it uses the `Trainer`'s public API only.
A snapshot of the last good weights is kept; a failing or diverging step restores it.
"""

from __future__ import annotations

import copy
import math
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace

import torch

from .devices import fast_inference_dtype
from .model import FM2SNet, fused_for_cpu, load_answering
from .presets import Preset
from .training import (
    SCHEDULES,
    Schedule,
    Trainer,
    collapse_for_inference,
    collapsed_parameters,
    make_target,
    random_crops,
    target_crops,
)

__all__ = ["HALO", "Learner", "answering_copy", "cold_start_schedule"]

HALO = 5  # receptive-field radius of the network (5x5, 3x3, 5x5 convolutions): tiles overlap by this
TILE = 256  # CPU inference tile side, measured fastest on frames up to 512 wide (2 cores, bf16): 512^2 whole
# 13.3 ms, tiles of 128 / 256 / 512: 9.5 / 6.8 / 13.6 ms (large frames fall out of cache)
WHOLE_MAX_PIXELS = (TILE + 2 * HALO) ** 2  # CPU frames up to one tile (with its margin) run whole
# from STRIP_MIN_WIDTH wide, tiles are strips of STRIP_ROWS rows across the frame (up to STRIP_MAX_WIDTH):
# oneDNN's convolutions run faster on long rows. Fused network, 2 cores: 1024^2 in 256^2 tiles 28.9-30.4 ms,
# in 128 x 1024 strips 23.1-25.7 (64 / 96 / 176 / 256 rows: 27.7-29.1 / 25.9 / 24.5 / 25.2); 2048^2
# 106-120 vs 97-101 ms; at 512^2 strips are slower (10.5-11.9 vs 9.7 ms)
STRIP_MIN_WIDTH = 1024
STRIP_MAX_WIDTH = 2048
STRIP_ROWS = 128
# stage 1 of a cold start runs on the full frame up to this side, on such crops beyond. 256 costs a quarter
# of 512's step (a 512x512 step blocked frames for 50-200 ms) for the same result: generic start, 100
# steps, 12 dev FMD images + 2 synthetic scenes, seed 0: 32.877 / 32.557 dB (256) vs 32.873 / 32.507 (512)
STAGE1_CROP = 256


_TILE_POOL: ThreadPoolExecutor | None = None
_TILE_POOL_LOCK = threading.Lock()


def _tile_pool() -> ThreadPoolExecutor:
    """Threads that run CPU inference tiles side by side, one torch thread each (created on first use)."""
    global _TILE_POOL
    with _TILE_POOL_LOCK:
        if _TILE_POOL is None:
            _TILE_POOL = ThreadPoolExecutor(max_workers=max(1, torch.get_num_threads()),
                                            thread_name_prefix="fm2s-tile")
        return _TILE_POOL


def answering_copy(net: FM2SNet, dtype: torch.dtype, device: torch.device) -> torch.nn.Module:
    """The network as `Learner.infer` runs it: collapsed to one channel, in `dtype`, channels-last,
    and on the CPU fused (`fused_for_cpu`)."""
    one = collapse_for_inference(net).to(dtype).to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    return fused_for_cpu(one) if device.type == "cpu" else one


def cold_start_schedule(steps: int, crop: int | None = None) -> Schedule:
    """The offline default (`fast`) schedule, shortened or lengthened to `steps` steps in all."""
    fast = SCHEDULES["fast"]
    return replace(fast, name=f"cold start ({steps})", rounds=max(1, steps - fast.stage1_steps), steps_per_round=1,
                   crop=crop or fast.crop)


class Learner:
    """The network of one channel and everything needed to keep training it."""

    def __init__(self, preset: Preset, schedule: Schedule, device: torch.device, seed: int = 0,
                 finetune_crop: int = 96, finetune_batch: int = 2, finetune_lr: float = 1e-3,
                 target: str = "mix", train_bf16: bool = True, inference_dtype: str = "auto",
                 snapshot_every: int = 20) -> None:
        from .offline import new_network

        self.device = device
        self.schedule = schedule
        self.finetune = (finetune_crop, finetune_batch, finetune_lr)
        self.target_kind = target
        self.snapshot_every = snapshot_every
        self.net: FM2SNet = new_network(preset.n_chan, seed, device)
        self.trainer = Trainer(self.net, preset, device, seed=seed, lr=schedule.lr)
        self.trainer.bf16 = train_bf16 and fast_inference_dtype(device) == torch.bfloat16
        self.trainer.follow(schedule)
        self.inference_dtype = (fast_inference_dtype(device) if inference_dtype == "auto"
                                else getattr(torch, inference_dtype))
        self.steps = 0  # all steps taken (cold start included)
        self.answer_from = schedule.total_steps  # steps after which the network answers (cold start or not)
        self.temporal_steps = 0
        self.restores = 0
        self._cold_target: torch.Tensor | None = None  # (1, H, W) target of the cold start's frame
        self._inference_net: torch.nn.Module | None = None
        self._stale = True  # the inference copy lags the network (refreshed, in place, before the next answer)
        self._good = self._state()

    @property
    def preset(self) -> Preset:
        """The noise model the injector uses now."""
        return self.trainer.preset

    @property
    def ready(self) -> bool:
        """True once the cold start's schedule is done."""
        return self.steps >= self.schedule.total_steps

    @property
    def answers(self) -> bool:
        """True once the network's answer beats the classical one: from `answer_from` steps on, which
        for a generic start comes before the cold start is over (`starting.GENERIC_ANSWER_STEPS`)."""
        return self.ready or self.steps >= self.answer_from

    @property
    def cold_progress(self) -> float:
        """Share of the cold start done, 0..1."""
        return min(1.0, self.steps / max(1, self.schedule.total_steps))

    def set_preset(self, preset: Preset) -> None:
        """Inject noise of a re-calibrated strength from now on."""
        self.trainer.set_preset(preset)

    def start_generic(self) -> bool:
        """Start from the generic network shipped in the package (`starting.py`); False if none is."""
        from .starting import GENERIC_ANSWER_STEPS, load_generic

        if not load_generic(self.net):
            return False
        self.answer_from = min(self.answer_from, GENERIC_ANSWER_STEPS)
        self._stale = True
        self.snapshot()
        return True

    def warm_from(self, other: Learner) -> bool:
        """Start from another channel's trained weights (same n_chan); True if taken."""
        if other.net.n_chan != self.net.n_chan:
            return False
        self.net.load_state_dict(other.net.state_dict())
        self.steps = max(self.steps, other.steps if other.ready else 0)
        self._stale = True
        self.snapshot()
        return True

    # -- answering ---------------------------------------------------------------------------------
    def infer(self, unit: torch.Tensor, gain: float = 1.0, offset: float = 0.0) -> torch.Tensor:
        """The network's answer for a (H, W) [0, 1] frame on the device, float32 (H, W), mapped by
        gain * answer + offset (back to camera units, in each tile while it is in cache).

        On the CPU frames larger than a tile are run tile by tile (square tiles, or strips across
        frames from STRIP_MIN_WIDTH wide), each with a HALO-pixel margin of frame around it (the
        network's receptive field; at the frame's edges the convolutions pad as they do on the whole
        frame), so the result is the whole-frame answer. The tiles run on as many threads as torch
        has, one torch thread each: whole tiles in parallel instead of every convolution split across
        cores and waiting for both (measured at 512x512: 8.3 vs 17.7 ms; 1024x1024: 26.4 vs 30.2 ms).
        On a GPU the whole frame runs at once.
        """
        net = self._answering_net()
        h, w = unit.shape
        x = unit.to(self.inference_dtype)[None, None]
        if self.device.type != "cpu" or h * w <= WHOLE_MAX_PIXELS:
            with torch.inference_mode():
                return net(x.contiguous(memory_format=torch.channels_last))[0, 0].float() * gain + offset
        out = torch.empty((h, w), dtype=torch.float32)

        rows, cols = TILE, TILE
        if w >= STRIP_MIN_WIDTH:  # strips across the frame, in equal pieces where it is wider than the maximum
            rows, cols = STRIP_ROWS, math.ceil(w / math.ceil(w / STRIP_MAX_WIDTH))

        def run(tile: tuple[int, int]) -> None:
            y, x0 = tile
            y1, x1 = min(h, y + rows), min(w, x0 + cols)
            ya, xa = max(0, y - HALO), max(0, x0 - HALO)
            with torch.inference_mode():
                part = net(x[:, :, ya : min(h, y1 + HALO), xa : min(w, x1 + HALO)].contiguous())
                window = part[0, 0, y - ya : y - ya + y1 - y, x0 - xa : x0 - xa + x1 - x0]
                torch.add(window.float().mul_(gain), offset, out=out[y:y1, x0:x1])

        tiles = [(y, x0) for y in range(0, h, rows) for x0 in range(0, w, cols)]
        threads = torch.get_num_threads()
        if threads == 1:
            for tile in tiles:
                run(tile)
            return out
        pool = _tile_pool()
        torch.set_num_threads(1)
        try:
            list(pool.map(run, tiles))
        finally:
            torch.set_num_threads(threads)
        return out

    def _answering_net(self) -> torch.nn.Module:
        """The collapsed network in the inference dtype and layout (fused on the CPU). Built once;
        after learning its weights are overwritten in place (0.1 instead of 1.7 ms per step at 1024)."""
        if self._inference_net is None:
            self._inference_net = answering_copy(self.net, self.inference_dtype, self.device)
        elif self._stale:
            load_answering(self._inference_net, collapsed_parameters(self.net))
        self._stale = False
        return self._inference_net

    # -- learning ----------------------------------------------------------------------------------
    def cold_step(self, unit: torch.Tensor) -> float:
        """One step of the cold start on the channel's cold-start frame ((H, W), [0, 1], on the device)."""
        s = self.schedule
        if self._cold_target is None or self._cold_target.shape[-2:] != unit.shape:
            self._cold_target = make_target(unit, self.preset, s.target)[None]
        self.trainer.set_lr(s.lr_at(self.steps))
        if self.steps < s.stage1_steps:  # stage 1: structure, on the full frame or a large crop of it
            stack = torch.stack([unit, self._cold_target[0]])
            crop = random_crops(stack, STAGE1_CROP, 1, self.trainer.crop_rng)
            loss = self.trainer.structure_steps(crop[:, :1], crop[:, 1:], 1)
        else:
            loss = self.trainer.noise_step(random_crops(self._cold_target, s.crop or 128, s.batch,
                                                        self.trainer.crop_rng))
        loss = self._after_step(loss)
        if self.ready:
            self._cold_target = None
            self.snapshot()
        return loss

    def finetune_step(self, unit: torch.Tensor) -> float:
        """One stage-2 step on random crops of this frame (their targets computed on the windows)."""
        crop, batch, lr = self.finetune
        self.trainer.set_lr(lr)
        clean = target_crops(unit, self.preset, self.target_kind, crop, batch, self.trainer.crop_rng)
        return self._after_step(self.trainer.noise_step(clean))

    def temporal_step(self, current: torch.Tensor, previous: torch.Tensor) -> float:
        """One Noise2Noise step in time: crops of the current raw frame -> the same crops of the previous one."""
        crop, batch, lr = self.finetune
        stack = torch.stack([current, previous])
        crops = random_crops(stack, crop, batch, self.trainer.crop_rng)
        self.trainer.set_lr(lr)
        self.temporal_steps += 1
        return self._after_step(self.trainer.step(self.trainer.replicate(crops[:, :1]),
                                                  self.trainer.replicate(crops[:, 1:])))

    def _after_step(self, loss: float) -> float:
        if not math.isfinite(loss):
            self.restore()
            return loss
        self.steps += 1
        self._stale = True
        if self.steps % self.snapshot_every == 0:
            self.snapshot()
        return loss

    # -- persistent state --------------------------------------------------------------------------
    def tensors(self) -> dict[str, object]:
        """What the network has learnt: weights, optimiser moments (CPU copies, which later steps leave
        alone), step counts."""
        return {"net": {k: v.detach().to("cpu", copy=True) for k, v in self.net.state_dict().items()},
                "opt": self.trainer.optimizer_record(),
                "steps": self.steps, "temporal_steps": self.temporal_steps, "answer_from": self.answer_from}

    def load_tensors(self, state: dict[str, object]) -> None:
        """Continue from `tensors()` of an earlier run; on any mismatch it raises and the learner is as it was."""
        try:
            self.net.load_state_dict({k: v.to(self.device) for k, v in state["net"].items()})  # type: ignore[attr-defined]
            self.trainer.load_optimizer(state["opt"])
            steps = int(state["steps"])  # type: ignore[call-overload]  # a cold start continues from here
            temporal_steps = int(state.get("temporal_steps", 0))  # type: ignore[call-overload]
            answer_from = int(state.get("answer_from", self.schedule.total_steps))  # type: ignore[call-overload]
        except Exception:
            self.net.load_state_dict(self._good[0])  # back to the last good state: nothing half-loaded
            self.trainer.optimizer.load_state_dict(self._good[1])
            raise
        self.steps, self.temporal_steps, self.answer_from = steps, temporal_steps, answer_from
        self._stale = True
        self._cold_target = None
        self.snapshot()

    # -- snapshots ---------------------------------------------------------------------------------
    def _state(self) -> tuple[dict[str, torch.Tensor], dict[str, object]]:
        return copy.deepcopy(self.net.state_dict()), copy.deepcopy(self.trainer.optimizer.state_dict())

    def snapshot(self) -> None:
        """Remember the current weights and optimiser moments as the last good state."""
        self._good = self._state()

    def restore(self) -> None:
        """Go back to the last good state (after a failed or diverging step)."""
        self.net.load_state_dict(self._good[0])
        self.trainer.optimizer.load_state_dict(self._good[1])
        self._stale = True
        self.restores += 1
