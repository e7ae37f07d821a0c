"""FM2S two-stage training: schedules, pre-denoised targets, crop sampling and the trainer.

Stage 1 maps the raw frame to a pre-denoised target (learns structure); stage 2 maps fresh noise
injections of that target back to the target (aligns with the real noise). The `paper` schedule is
the authors' (full image, 5 + 450 x 5 Adam steps); `fast` trains on random crops with a decaying
learning rate and a better pre-denoised target, and is both much faster and better (README).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, replace

import numpy as np
import torch
import torch.nn.functional as F

from .devices import fast_inference_dtype
from .model import FM2SNet
from .noise import NoiseInjector
from .ops import gaussian, median
from .presets import Preset

__all__ = [
    "SCHEDULES",
    "Schedule",
    "TrainReport",
    "Trainer",
    "as_batch",
    "collapse_for_inference",
    "collapsed_parameters",
    "infer",
    "make_target",
    "random_crops",
    "target_crops",
]


@dataclass(frozen=True)
class Schedule:
    """How to train one network on one frame.

    stage1_steps: Adam steps raw -> target; rounds x steps_per_round: stage-2 steps, one fresh noise
    injection per round; crop/batch: random crops per step (crop None = the full frame);
    lr -> lr_final: cosine decay over stage 2; target: the pre-denoiser ("median" = the paper's);
    refine_steps: extra stage-2 steps whose target is the network's own output after stage 2;
    tta: inference averaged over this many flips/rotations of the frame (1, 2, 4 or 8);
    shared_noise: one noise draw replicated to all n_chan input channels (half the sampling cost at
    n_chan 2) instead of an independent draw per channel;
    bf16: train with bfloat16 autocast where the hardware runs it natively (~2x faster steps on CPUs
    with AMX; weights and the loss stay float32);
    tile_pad: padding of the noise's tile map ("zeros" in the authors' code, see noise.tile_means);
    poisson: the injection's Poisson sampler (noise.poisson: "parallel" on the CPU, or torch's);
    faithful_output: the authors' output: no photometric anchoring, clamp to [0, 1], truncation to
    integers (their `.int()`) instead of rounding;
    average_from: the network kept is the mean of its weights over the steps of stage 2 from this
    fraction of it on (stochastic weight averaging; 1.0: the last step's weights, as the paper);
    prior_weight: single frames only (`offline.denoise`): where the frame's noise law holds, its
    block-matched estimate (`blockmatch`) has this weight in the output, and is the target where the
    injection is white (0: unused).
    """

    name: str
    stage1_steps: int
    rounds: int
    steps_per_round: int
    crop: int | None
    batch: int
    lr: float
    lr_final: float
    target: str
    refine_steps: int = 0
    tta: int = 1
    bf16: bool = False
    shared_noise: bool = False
    tile_pad: str = "replicate"
    poisson: str = "parallel"
    faithful_output: bool = False
    average_from: float = 1.0
    prior_weight: float = 0.0

    @property
    def total_steps(self) -> int:
        """All Adam steps of both stages."""
        return self.stage1_steps + self.rounds * self.steps_per_round + self.refine_steps

    def lr_at(self, step: int) -> float:
        """Learning rate of step `step` (0-based, both stages): constant in stage 1, cosine over stage 2."""
        i = step - self.stage1_steps
        n = max(1, self.rounds * self.steps_per_round)
        if i < 0 or self.lr == self.lr_final:
            return self.lr
        return self.lr_final + 0.5 * (self.lr - self.lr_final) * (1 + math.cos(math.pi * min(i, n) / n))


PAPER_SEED = 3407  # the authors' torch.manual_seed (`denoise --method paper` uses it unless --seed is given)

SCHEDULES: dict[str, Schedule] = {
    # the authors' FM2S.py step for step (../shared/FINDINGS.md): full frame, 5 + 450 x 5 Adam steps at
    # 1e-3, independent noise per replicated channel, zero-padded tile map, torch's Poisson sampler,
    # truncated output
    "paper": Schedule("paper", 5, 450, 5, None, 1, 1e-3, 1e-3, "median", tile_pad="zeros", poisson="torch",
                      faithful_output=True),
    # fast: random crops, a cosine-decayed rate, the mix target, weights averaged over stage 2's second
    # half (README "Quality": one dev image's seed-to-seed spread, up to +-0.19 dB, falls to +-0.03 at most)
    # single frames whose noise law holds: the block-matched estimate is half the output, and the target
    # where the injection is white (README "Quality": two-photon +0.28 dB, widefield +0.16 over the network)
    "fast": Schedule("fast", 5, 900, 1, 128, 4, 2e-3, 1e-3, "mix", tta=8, bf16=True, shared_noise=True,
                     average_from=0.5, prior_weight=0.5),
}


def make_target(unit: torch.Tensor | np.ndarray, preset: Preset, kind: str) -> torch.Tensor:
    """The stage-1 pre-denoised target of a [0, 1] frame ((H, W), on its device; numpy arrays on the CPU).

    "median": the paper's median filter of window preset.w_size; "gauss": Gaussian sigma 1;
    "mix": the mean of both (sharper edges than the blur, less blotchy than the median);
    "gmed": the paper's median applied after a sigma-1 Gaussian (the best classical target on FMD).
    """
    x = torch.as_tensor(unit).float()
    if kind == "median":
        return median(x, preset.w_size)
    if kind == "gauss":
        return gaussian(x, 1.0)
    if kind == "gmed":
        return median(gaussian(x, 1.0), preset.w_size)
    if kind == "mix":
        return 0.5 * (median(x, preset.w_size) + gaussian(x, 1.0))
    raise ValueError(f"unknown target kind {kind!r}")


def random_crops(
    stack: torch.Tensor, size: int, batch: int, generator: torch.Generator
) -> torch.Tensor:
    """`batch` random size x size crops (same window across the channels of `stack`, (K, H, W))."""
    _, h, w = stack.shape
    ch, cw = min(size, h), min(size, w)
    ys = torch.randint(0, h - ch + 1, (batch,), generator=generator).tolist()
    xs = torch.randint(0, w - cw + 1, (batch,), generator=generator).tolist()
    return torch.stack([stack[:, y : y + ch, x : x + cw] for y, x in zip(ys, xs)])


def as_batch(image: np.ndarray, device: torch.device) -> torch.Tensor:
    """A 2D float array as a (1, 1, H, W) float32 tensor on `device`."""
    return torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32))[None, None].to(device)


def target_crops(
    unit: torch.Tensor, preset: Preset, kind: str, size: int, batch: int, generator: torch.Generator
) -> torch.Tensor:
    """`batch` random size x size windows of the pre-denoised target of a (H, W) frame, (batch, 1, size, size).

    The target is computed on each window plus a margin, not on the whole frame: the same values
    away from the frame's border, at a fraction of the cost (this runs on every fine-tune step).
    The windows stay on the frame's device; `generator` (CPU) only draws their positions.
    """
    h, w = unit.shape
    ch, cw = min(size, h), min(size, w)
    margin = max(preset.w_size // 2, 4) + 1
    ys = torch.randint(0, h - ch + 1, (batch,), generator=generator).tolist()
    xs = torch.randint(0, w - cw + 1, (batch,), generator=generator).tolist()
    out = []
    for y, x in zip(ys, xs):
        y0, x0 = max(0, y - margin), max(0, x - margin)
        window = unit[y0 : min(h, y + ch + margin), x0 : min(w, x + cw + margin)]
        out.append(make_target(window, preset, kind)[y - y0 : y - y0 + ch, x - x0 : x - x0 + cw])
    return torch.stack(out)[:, None]


@dataclass
class TrainReport:
    """What a training run did: steps, and the loss at the start and the end of stage 2."""

    steps: int
    first_loss: float
    last_loss: float


class Trainer:
    """Runs FM2S steps on one network; keeps its optimizer so training can resume (warm start)."""

    def __init__(
        self,
        net: FM2SNet,
        preset: Preset,
        device: torch.device,
        seed: int = 0,
        lr: float = 1e-3,
    ) -> None:
        self.net = net
        self.preset = preset
        self.device = device
        self.injector = NoiseInjector(preset, seed=seed, device=device)
        self.crop_rng = torch.Generator().manual_seed(seed + 1)
        self.optimizer = torch.optim.Adam(net.parameters(), lr=lr)
        self.steps = 0
        self.bf16 = False
        self.shared_noise = False
        self.on_step: Callable[[int], None] | None = None  # called after each step (progress; may raise to stop)

    def optimizer_record(self) -> dict[str, object]:
        """Adam's moments (CPU copies) and parameter groups: what `load_optimizer` takes back."""
        opt = self.optimizer.state_dict()
        state = {k: {n: t.detach().to("cpu", copy=True) if isinstance(t, torch.Tensor) else t for n, t in v.items()}
                 for k, v in opt["state"].items()}
        return {"state": state, "param_groups": opt["param_groups"]}

    def load_optimizer(self, record: object) -> None:
        """Continue Adam from `optimizer_record()` of an earlier run (raises on a mismatch)."""
        if not isinstance(record, dict):
            raise ValueError("optimiser record is not an object")
        state = {int(k): {n: (t.to(self.device) if isinstance(t, torch.Tensor) else t) for n, t in v.items()}
                 for k, v in record["state"].items()}
        self.optimizer.load_state_dict({"state": state, "param_groups": record["param_groups"]})

    def set_lr(self, lr: float) -> None:
        """Set the learning rate of every parameter group."""
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    def follow(self, schedule: Schedule) -> None:
        """Draw each step's noise as `schedule` says from now on: shared across the replicated
        channels or not, the tile map's padding, the Poisson sampler."""
        self.shared_noise = schedule.shared_noise
        self.injector.pad = schedule.tile_pad
        self.injector.sampler = schedule.poisson

    def set_preset(self, preset: Preset) -> None:
        """Inject noise of a new strength from now on (a channel's noise re-calibration)."""
        self.preset = self.injector.preset = preset

    def replicate(self, x: torch.Tensor) -> torch.Tensor:
        """(N, 1, H, W) -> (N, n_chan, H, W) channels_last on the device."""
        x = x.to(self.device, non_blocking=True).expand(-1, self.net.n_chan, -1, -1)
        return x.contiguous(memory_format=torch.channels_last)

    def noise_step(self, clean: torch.Tensor) -> float:
        """One stage-2 step: a fresh injection of the (N, 1, h, w) clean crops -> the crops."""
        y = self.replicate(clean)
        noisy = self.replicate(self.injector(clean)) if self.shared_noise else self.injector(y)
        return self.step(noisy, y)

    def step(self, inputs: torch.Tensor, target: torch.Tensor) -> float:
        """One Adam step of MSE(net(inputs), target) on (N, n_chan, H, W) tensors."""
        self.optimizer.zero_grad(set_to_none=True)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16):
            out = self.net(inputs)
        loss = F.mse_loss(out.float(), target)
        loss.backward()
        self.optimizer.step()
        self.steps += 1
        if self.on_step is not None:
            self.on_step(self.steps)
        return float(loss.detach())

    def structure_steps(self, raw: torch.Tensor, target: torch.Tensor, steps: int) -> float:
        """Stage 1: `steps` full-frame steps raw -> target ((1, 1, H, W) each)."""
        x, y = self.replicate(raw), self.replicate(target)
        loss = math.nan
        for _ in range(steps):
            loss = self.step(x, y)
        return loss

    def noise_steps(
        self,
        target: torch.Tensor,
        steps: int,
        crop: int | None,
        batch: int,
        lr_schedule: tuple[float, float] | None = None,
        steps_per_injection: int = 1,
        average_from: int | None = None,
    ) -> tuple[float, float]:
        """Stage 2: `steps` steps of injected(target) -> target, on crops or the full frame.

        Returns the first and last loss. With `lr_schedule` (lr0, lr1) the rate decays by cosine. With
        `average_from` the network ends with the mean of its weights after each step from that one on.
        """
        first = last = math.nan
        y = noisy = None
        mean: list[torch.Tensor] = []
        tgt = target[0]  # (1, H, W)
        for i in range(steps):
            if lr_schedule is not None:
                lr0, lr1 = lr_schedule
                self.set_lr(lr1 + 0.5 * (lr0 - lr1) * (1 + math.cos(math.pi * i / max(1, steps))))
            if i % steps_per_injection == 0:
                y1 = random_crops(tgt, crop, batch, self.crop_rng) if crop else tgt[None]
                y = self.replicate(y1)
                noisy = self.replicate(self.injector(y1)) if self.shared_noise else self.injector(y)
            assert y is not None and noisy is not None
            last = self.step(noisy, y)
            if i == 0:
                first = last
            if average_from is not None and i >= average_from:
                self._accumulate(mean, i - average_from + 1)
        if mean:
            with torch.no_grad():
                for p, m in zip(self.net.parameters(), mean):
                    p.copy_(m)
        return first, last

    def _accumulate(self, mean: list[torch.Tensor], count: int) -> None:
        """Fold the network's current weights into the running `mean` of `count` weight sets."""
        with torch.no_grad():
            params = [p.detach() for p in self.net.parameters()]
            if not mean:
                mean.extend(p.clone() for p in params)
                return
            for m, p in zip(mean, params):
                m.lerp_(p, 1.0 / count)

    def fit(self, raw: torch.Tensor, target: torch.Tensor, schedule: Schedule) -> TrainReport:
        """Both stages of `schedule` on one frame ((1, 1, H, W) raw and target in [0, 1])."""
        self.bf16 = schedule.bf16 and fast_inference_dtype(self.device) == torch.bfloat16
        self.follow(schedule)
        self.set_lr(schedule.lr)
        self.structure_steps(raw, target, schedule.stage1_steps)
        decay = None if schedule.lr == schedule.lr_final else (schedule.lr, schedule.lr_final)
        steps = schedule.rounds * schedule.steps_per_round
        first, last = self.noise_steps(
            target,
            steps,
            schedule.crop,
            schedule.batch,
            lr_schedule=decay,
            steps_per_injection=schedule.steps_per_round,
            average_from=int(schedule.average_from * steps),  # 1.0: from past the last step, so none
        )
        if schedule.refine_steps:
            refined = infer(self.net, raw)
            _, last = self.noise_steps(
                refined, schedule.refine_steps, schedule.crop, schedule.batch,
                lr_schedule=(schedule.lr / 4, schedule.lr_final),
            )
        return TrainReport(self.steps, first, last)


def collapsed_parameters(net: FM2SNet) -> list[torch.Tensor]:
    """The parameters of the 1-channel network exactly equivalent to `net` for inference, in the
    order of `FM2SNet(1).parameters()` (the middle conv's are `net`'s own: copy them, do not keep them).

    The input channels are identical replicas and the output is their mean, so the first conv's
    weights can be summed over input channels and the last conv's averaged over output channels:
    inference then costs the same for every n_chan.
    """
    (w0, b0), (w1, b1), (w2, b2) = ((c.weight, c.bias) for c in net.convs())
    assert b0 is not None and b1 is not None and b2 is not None
    with torch.no_grad():
        return [w0.sum(dim=1, keepdim=True), b0.detach(), w1.detach(), b1.detach(), w2.mean(dim=0, keepdim=True),
                b2.mean().reshape(1)]


def collapse_for_inference(net: FM2SNet) -> FM2SNet:
    """An exactly equivalent 1-channel network for inference (see `collapsed_parameters`)."""
    one = FM2SNet(1).to(next(net.parameters()).device)
    with torch.no_grad():
        for dst, src in zip(one.parameters(), collapsed_parameters(net), strict=True):
            dst.copy_(src)
    return one.eval()


@torch.inference_mode()
def infer(net: FM2SNet, raw: torch.Tensor, tta: int = 1) -> torch.Tensor:
    """Denoise a (1, 1, H, W) [0, 1] frame with `net` (collapsed to one channel first).

    With tta > 1 the output is the mean over the first `tta` of the 8 flips/rotations of the frame
    (the network is not rotation-equivariant, so the views' errors partly cancel).
    """
    one = collapse_for_inference(net) if net.n_chan > 1 else net
    one = one.to(memory_format=torch.channels_last)  # type: ignore[call-overload]  # (missing from torch's stubs)
    x = raw.to(next(one.parameters()).device)
    out = torch.zeros_like(x)
    views = [(k, flip) for flip in (False, True) for k in range(4)][: max(1, tta)]
    for k, flip in views:
        v = torch.rot90(x.flip(-1) if flip else x, k, dims=(-2, -1)).contiguous(memory_format=torch.channels_last)
        y = torch.rot90(one(v), -k, dims=(-2, -1))
        out += y.flip(-1) if flip else y
    return out / len(views)


def scaled(schedule: Schedule, factor: float) -> Schedule:
    """`schedule` with its stage-2 length multiplied by `factor` (for quick tests and budgets)."""
    return replace(schedule, rounds=max(1, round(schedule.rounds * factor)))
