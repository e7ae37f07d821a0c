"""Channel: one camera channel's state around its Learner: scaling, noise calibration, pairs, post-processing.

Life of a channel: its first frame starts a *cold start* (the offline default's schedule on that
frame, `Learner.cold_step`); until the network answers better than the classical pre-denoiser (a
sigma-1 Gaussian), frames are answered by that and flagged `bootstrap` on the wire. The network
answers once the cold start is done, or from the generic start earlier (`Learner.answers`), while
the cold start goes on. After the cold start every frame gets a few *fine-tune* steps. Every
answer goes through `PostProcess` (anchor -> registered temporal average). With `temporal` on,
every other fine-tune step is Noise2Noise in time: the current raw frame onto the previous raw
frame of the same position, after registration, and only when a motion guard says the two show
the same scene.

The data path per frame, each unit visited once: `prepare` (the frame's one upload, scaling) ->
`answer` (learner or classical, post-processing, the result's one download) -> the pipeline
publishes -> `learn_step` while the latency policy allows -> `maintain` (periodic noise
re-calibration, after the answer, on a bounded crop).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TypeVar

import numpy as np
import torch

from .anchor import anchor
from .calibrate import FieldNoise, NoiseEstimate, auto_base, auto_preset, estimate_noise_or_none
from .devices import download, upload
from .learner import Learner, cold_start_schedule
from .ops import float_and_affine, gaussian, halve, median, one_thread, overlap, rounded, shift_fraction
from .postprocess import PostProcess
from .presets import Preset, get_preset
from .registration import refine_shift, register_shift
from .scaling import Scaling, scaling_for
from .stages import StageClock
from .temporal import TemporalAverage

STRUCTURE_FRACTION = 0.5
CALIBRATION_SIDE = 1024  # noise is calibrated on a central crop of at most this side (cost bounded)
PAIR_SIDE = 512  # temporal pairs are registered and guarded on a central window of at most this side
SCALING_MEMORY = 0.95  # uint16 black/white levels: EMA weight of the old value, per frame
WARM_SIDE = 768  # warm-up field: its inference tiles take every tile shape of frames >= 512x512
RECALIBRATION_STEP = 1 / 3  # a re-estimate moves the noise parameters this far (log domain)

__all__ = ["Channel", "ChannelConfig", "Prepared", "aligned_pair", "channel_config", "warm_up"]


@dataclass(frozen=True)
class ChannelConfig:
    """How each channel's network is cold-started, fine-tuned and post-processed (one place for the defaults)."""

    preset: Preset
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    seed: int = 0
    target: str = "mix"
    # From the generic network, 100 steps of the offline schedule's shape nearly match 905 from random
    # weights (benchmarks/init_study.py, 12 dev FMD images: 32.92 vs 32.94 dB; 200: 32.97) and the network
    # answers ~2.5 s after a new channel's first 512x512 frame; fine-tuning on every frame goes on from
    # there (demo: 37.01 dB after 30 s, vs 36.68 with 200 steps, 36.26 from random weights). With init
    # "random" use 905.
    cold_start_steps: int = 100
    init: str = "auto"  # where a new channel's network starts: auto, random, generic, or a channel's name
    cold_start_crop: int = 128
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
    time_stages: bool = False  # record per-stage times (benchmarks; synchronises CUDA at each stage)


def warm_up() -> None:
    """Pay the one-off costs of a process before the first frame does: torch's optimiser machinery
    (its first Adam imports torch._dynamo, ~1.2 s) and the compiled kernels (compiled on a machine's
    first run, several seconds; loaded from numba's cache after that), for both camera dtypes. The
    averaging runs two frames of a moving 64x64 field, so that every kernel of its second frame on
    (registration, the three scales, the sub-pixel shift, the update) is compiled too, not only the
    first frame's. tests/test_pipeline.py checks that a stream compiles nothing after it."""
    torch.optim.Adam([torch.zeros(1, requires_grad=True)])
    rng = np.random.default_rng(0)
    field = rng.uniform(100, 200, (72, 72)).astype(np.float32)
    average = TemporalAverage(2)
    for shift in (0.0, 0.5):  # a half-pixel move: the fractional-shift path runs as well
        frame = torch.from_numpy(np.roll(field, int(shift * 4), axis=1)[:64, :64].copy())
        average.apply(frame, shift_fraction(frame, 0.0, shift))
    halve(frame)
    for dtype in (np.uint8, np.uint16):
        estimate_noise_or_none(np.full((16, 16), 100, dtype))
        # the frame path's host kernels per camera dtype: scaling in, anchoring, rounding out
        plain, _ = float_and_affine(torch.from_numpy(rng.integers(90, 110, (64, 64)).astype(dtype)), 1 / 4000, 0.0)
        rounded(anchor(plain, plain, 8.0), torch.uint8 if dtype == np.uint8 else torch.uint16)
    median(plain, 11)  # the wide median target of the widefield base (correlated noise); 3x3 is another kernel
    # a channel's first learning steps and answers at the stream's own shapes (torch prepares its
    # kernels per shape: the 256x256 stage-1 crop, 128x128 cold and 96x96 fine-tune crops, the
    # 261/266-pixel inference tiles of frames >= 512x512): measured, a first 512x512 cold step cost 138
    # ms and a first answer 53 ms after a 64x64 warm-up, 52 and 14 ms after this one
    learner = Learner(get_preset("confocal"), cold_start_schedule(8), torch.device("cpu"))
    unit = torch.from_numpy((rng.integers(0, 4000, (WARM_SIDE, WARM_SIDE)) / 4000).astype(np.float32))
    while not learner.ready:
        learner.cold_step(unit)
    learner.finetune_step(unit)
    learner.infer(unit)


def channel_config(preset: str, **kw: object) -> ChannelConfig:
    """A ChannelConfig for a preset name; "auto" calibrates each channel's noise on its own frames."""
    auto = preset == "auto"
    return ChannelConfig(preset=get_preset("confocal" if auto else preset), auto_noise=auto, **kw)  # type: ignore[arg-type]


def _central(a: _Image, side: int) -> _Image:
    """The central side x side window of a 2D array (the array itself when smaller)."""
    h, w = a.shape
    y, x = max(0, (h - side) // 2), max(0, (w - side) // 2)
    return a[y : y + side, x : x + side]


_Image = TypeVar("_Image", np.ndarray, torch.Tensor)


@dataclass
class Prepared:
    """A frame on the device: camera units, the [0, 1] domain, and what learning needs of it."""

    raw: np.ndarray  # the host frame as it came (its dtype is the answer's)
    camera: torch.Tensor  # (H, W) float32 camera units, on the device
    unit: torch.Tensor  # (H, W) float32 in the [0, 1] domain, on the device
    scaling: Scaling
    position: tuple[int, int]
    previous: torch.Tensor | None = None  # the previous unit frame of the same position (temporal steps)
    pair: tuple[torch.Tensor, torch.Tensor] | None = None  # (current, previous) aligned overlap
    pair_checked: bool = False
    shift: tuple[float, float] | None = None  # from the previous frame, as the temporal average registered it
    averaged: float = 1.0  # mean frames averaged per pixel in this frame's output
    still: bool = False  # the same field as its position's previous frame (as the temporal average saw it)


class Channel:
    """One channel: `prepare` and `answer` a frame now, `learn_step` afterwards, `maintain` now and then."""

    def __init__(self, name: str, config: ChannelConfig, first_frame: np.ndarray | None = None) -> None:
        self.name = name
        self.config = config
        self.device = config.device
        preset, self.base, noise = config.preset, None, None
        if config.auto_noise and first_frame is not None:  # the base (channels, median window) is fixed here
            crop = _central(first_frame, CALIBRATION_SIDE)
            noise = estimate_noise_or_none(crop)
            self.base = auto_base(noise) if noise is not None else config.preset.name
            preset = auto_preset(crop, self.base)
        self.learner = Learner(
            preset, cold_start_schedule(config.cold_start_steps, config.cold_start_crop), self.device,
            seed=config.seed, finetune_crop=config.finetune_crop, finetune_batch=config.finetune_batch,
            finetune_lr=config.finetune_lr, target=config.target, train_bf16=config.train_bf16,
            inference_dtype=config.inference_dtype, snapshot_every=config.snapshot_every)
        self.clock = StageClock(self.device, config.time_stages)
        self.post = PostProcess(config.anchor_sigma, config.average_frames, config.average_threshold,
                                config.max_positions, config.average_registration, noise, self.clock)
        # the camera's noise from this stream's still frames, by calibrate's multi-frame estimator: it
        # refines the average's change test and, with --preset auto, the re-calibrations
        self.field = FieldNoise()
        self.noise: NoiseEstimate | None = noise  # the latest estimate (single-frame until a field fit)
        self.frames_seen = 0  # in this run
        self.frames_before = 0  # learnt from in earlier runs (resumed state)
        self.motion_rejects = 0
        self.shape_changes = 0
        self._fitted_at = -(10**9)  # frames_seen at the latest multi-frame noise fit
        self.scaling: Scaling | None = None
        self.shape: tuple[int, int] | None = None
        self.dtype: str | None = first_frame.dtype.str if first_frame is not None else None
        self._previous: dict[tuple[int, int], torch.Tensor] = {}
        self._cold_frame: torch.Tensor | None = None  # the frame the cold start trains on (its first)

    @property
    def ready(self) -> bool:
        """True once the cold start is over and the network answers instead of the pre-denoiser."""
        return self.learner.ready

    @property
    def cold_progress(self) -> float:
        """Share of the cold start done, 0..1."""
        return self.learner.cold_progress

    @property
    def preset(self) -> Preset:
        """The noise parameters the channel injects with now."""
        return self.learner.preset

    @property
    def steps(self) -> int:
        """Training steps taken (cold start included)."""
        return self.learner.steps

    # -- answering ---------------------------------------------------------------------------------
    def prepare(self, pixels: np.ndarray, position: tuple[int, int] = (0, 0)) -> Prepared:
        """Upload a frame and map it with this channel's (slowly adapting) intensity scaling."""
        shape = (int(pixels.shape[0]), int(pixels.shape[1]))
        if self.shape is not None and shape != self.shape:
            self.shape_changes += 1
            self._previous.clear()
            self.post.reset()
        self.shape = shape
        self.dtype = pixels.dtype.str
        self.frames_seen += 1
        self.clock.start()
        frame = upload(pixels, self.device)
        self.clock.lap("transfer")
        self.scaling = self._update_scaling(pixels)
        camera, unit = float_and_affine(frame, 1.0 / self.scaling.span, -self.scaling.black / self.scaling.span)
        self.clock.lap("scaling")
        return Prepared(pixels, camera, unit, self.scaling, position)

    def _update_scaling(self, pixels: np.ndarray) -> Scaling:
        """Per-channel scaling: fixed for uint8; for uint16 an exponential average over frames."""
        new = scaling_for(pixels)  # percentiles of a <= 256x256 subsample, on the host
        old = self.scaling
        if old is None or pixels.dtype == np.uint8:
            return new
        a = 1 - SCALING_MEMORY
        return Scaling((1 - a) * old.black + a * new.black, (1 - a) * old.white + a * new.white)

    def answer(self, prep: Prepared) -> tuple[np.ndarray, str]:
        """Denoised pixels (input dtype) and their status: "denoised" (network) or "bootstrap" (classical)."""
        network = self.learner.answers
        span, black = prep.scaling.span, prep.scaling.black
        camera = self.learner.infer(prep.unit, span, black) if network else self._classical(prep)
        self.clock.lap("inference" if network else "classical")
        camera, prep.averaged = self.post.apply(prep.camera, camera, prep.position, network)
        prep.shift = self.post.measured_shift
        prep.still = self.post.still
        pixels = download(camera, prep.raw.dtype)
        self.clock.lap("quantisation")
        return pixels, "denoised" if network else "bootstrap"

    def answer_classically(self, prep: Prepared) -> tuple[np.ndarray, str]:
        """The classical pre-denoiser's answer ("bootstrap"), leaving the post-processing's history
        alone: for a frame shed under overload, between network answers whose average goes on."""
        pixels = download(self._classical(prep), prep.raw.dtype)
        self.clock.lap("classical")
        return pixels, "bootstrap"

    @staticmethod
    def _classical(prep: Prepared) -> torch.Tensor:
        """The classical pre-denoiser (a sigma-1 Gaussian) of the frame, in camera units."""
        return gaussian(prep.unit, 1.0) * prep.scaling.span + prep.scaling.black

    # -- learning ----------------------------------------------------------------------------------
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
            cur, prev = _central(prep.unit, PAIR_SIDE), _central(prep.previous, PAIR_SIDE)
            with one_thread(self.device.type == "cpu"):  # small operations: see ops.one_thread
                prep.pair = aligned_pair(cur, prev, self.config.motion_threshold, prep.shift)
            if prep.pair is None:
                self.motion_rejects += 1
        return prep.pair

    def learn_step(self, prep: Prepared) -> bool:
        """One step (cold start or fine-tune); False if it diverged and the last good state was restored."""
        learner = self.learner
        self.clock.start(frame=False)
        if not learner.ready:
            if self._cold_frame is None or self._cold_frame.shape != prep.unit.shape:
                self._cold_frame = prep.unit  # the whole cold start trains on the channel's first frame
            loss = learner.cold_step(self._cold_frame)
            if learner.ready:
                self._cold_frame = None
        elif learner.steps % 2 == 1 and (pair := self._pair(prep)) is not None:
            loss = learner.temporal_step(*pair)
        else:
            loss = learner.finetune_step(prep.unit)
        self.clock.lap("fine-tune step" if learner.ready else "cold-start step")
        return math.isfinite(loss)

    def restore(self) -> None:
        """Back to the last good weights (after a failed step or answer)."""
        self.learner.restore()

    def maintain(self, prep: Prepared) -> bool:
        """Work after the answer: the frame joins the multi-frame noise fit (a full window of still
        frames is fitted now, ~17 ms on 2 cores, and refines the temporal average's noise); every
        `recalibrate_every` frames (--preset auto) the FM2S noise parameters are re-derived, from the
        latest multi-frame fit if one came within that time, else from a bounded central crop of this
        frame, and move a third of the way there (log domain). True if that recalibration ran."""
        self.field.add(prep.raw, prep.still, prep.position)
        fitted = self.field.take()
        if fitted is not None:
            self.noise = fitted
            self._fitted_at = self.frames_seen
            self.post.set_noise(fitted)
        if self.base is None or self.frames_seen % self.config.recalibrate_every:
            return False
        crop = _central(prep.raw, CALIBRATION_SIDE)
        recent = self.noise if self.frames_seen - self._fitted_at < self.config.recalibrate_every else None
        new, old = auto_preset(crop, self.base, recent), self.learner.preset

        def mix(a: float, b: float) -> float:
            if a <= 0 or b <= 0:
                return b
            return math.exp((1 - RECALIBRATION_STEP) * math.log(a) + RECALIBRATION_STEP * math.log(b))

        self.learner.set_preset(old.with_noise(mix(old.k_g, new.k_g), mix(old.k_p, new.k_p),
                                               mix(old.lambda_p, new.lambda_p),
                                               rho=old.rho + RECALIBRATION_STEP * (new.rho - old.rho)))
        return True

    # -- persistent state --------------------------------------------------------------------------
    def learnt(self) -> tuple[dict[str, object], dict[str, object]]:
        """(tensors, metadata) of what this channel has learnt, for a `StateStore`; metadata is JSON-ready."""
        p = self.learner.preset
        meta: dict[str, object] = {
            "channel": self.name, "n_chan": p.n_chan, "base": self.base,
            "preset": p.record(),
            "scaling": None if self.scaling is None else [self.scaling.black, self.scaling.white],
            "shape": list(self.shape) if self.shape else None, "dtype": self.dtype,
            "frames_seen": self.frames_seen, "frames_learnt": self.frames_before + self.frames_seen,
            "steps": self.learner.steps, "ready": self.ready,
        }
        return self.learner.tensors(), meta

    def resume(self, tensors: dict[str, object], meta: dict[str, object]) -> str | None:
        """Continue from an earlier run's state; None if taken, else why not (the channel stays cold).

        Compatible means: the same number of network channels (the noise base) and the same pixel
        dtype (the intensity scaling and noise levels are in its units). The frame shape may differ:
        the network is fully convolutional; the scaling then re-adapts as usual. An unfinished cold
        start continues where it stopped (on this run's first frame).
        """
        if meta.get("n_chan") != self.learner.net.n_chan:
            return f"saved network has {meta.get('n_chan')} input channels, this channel's noise base needs " \
                   f"{self.learner.net.n_chan}"
        if meta.get("dtype") != self.dtype:
            return f"saved for {meta.get('dtype')} frames, these are {self.dtype}"
        preset, saved = self.learner.preset, meta.get("preset")
        if isinstance(saved, dict):  # checked before anything is loaded: a bad record leaves the channel cold
            try:
                preset = preset.with_noise(float(saved["k_g"]), float(saved["k_p"]), float(saved["lambda_p"]),
                                           rho=float(saved.get("rho", 0.0)))
            except (KeyError, TypeError, ValueError) as exc:
                return f"saved noise parameters unusable: {exc}"
        try:
            self.learner.load_tensors(tensors)
        except Exception as exc:  # any mismatch: the learner rolled back, the channel starts cold
            return f"weights do not fit: {exc}"
        self.learner.set_preset(preset)
        self.frames_before = int(meta.get("frames_learnt", 0) or 0)  # type: ignore[call-overload]
        scaling = meta.get("scaling")
        if isinstance(scaling, list) and len(scaling) == 2:
            self.scaling = Scaling(float(scaling[0]), float(scaling[1]))
        return None

    def stats(self) -> dict[str, object]:
        """Counters for status lines and reports."""
        p, n = self.learner.preset, self.noise
        return {
            "ready": self.ready, "steps": self.learner.steps, "temporal_steps": self.learner.temporal_steps,
            "cold_start_progress": round(self.learner.cold_progress, 3),
            "motion_rejects": self.motion_rejects, "restores": self.learner.restores,
            "shape_changes": self.shape_changes, "scene_changes": self.post.average.scene_changes,
            "preset": {"name": p.name, "n_chan": p.n_chan, "k_g": round(p.k_g, 3),
                       "k_p": round(p.k_p, 3), "lambda_p": round(p.lambda_p, 3), "rho": round(p.rho, 3)},
            # the camera noise law in use (var = a * level + b, camera units) and how many frames it came from
            "noise": None if n is None else {"a": round(n.a, 4), "b": round(n.b, 3), "rho": round(n.rho, 3),
                                             "frames": n.frames},
            "noise_fits": self.field.fits,
        }


def aligned_pair(cur: torch.Tensor, prev: torch.Tensor, threshold: float,
                 shift: tuple[float, float] | None = None) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The overlapping windows of `cur` and the registered `prev` ((H, W) tensors), or None if the scene changed.

    `shift` (cur[y] ~ prev[y - shift]) is the temporal average's sub-pixel registration of the same
    two frames where it ran, rounded here; else the pair registers itself (phase correlation at half
    resolution, refined to a pixel: 3 of its 6.2 ms at 512x512, and lost on a smooth field moved by
    (3, -2), where the average's registration is exact).

    Motion guard: after alignment (and removal of a global intensity change), the difference of the
    two frames blurred (sigma 2) must either be explained by white noise (energy below `threshold`
    times the raw difference's variance x kappa, kappa = 1 / (4 pi sigma^2)) or be small next to the
    scene's own blurred structure (below STRUCTURE_FRACTION of its variance; spatially correlated
    noise, as in widefield data, fails the first test on static scenes). Measured on FMD: static
    pairs 0.03-0.24, a 3-pixel misregistration 0.29-0.40, a different scene 1.4-2.6.
    """
    h, w = cur.shape
    if shift is not None:
        dy, dx = round(shift[0]), round(shift[1])
    else:
        dy, dx = register_shift(gaussian(halve(cur), 1.0), gaussian(halve(prev), 1.0))
        dy, dx = refine_shift(cur, prev, 2 * dy, 2 * dx)  # registered at half resolution, refined to 1 pixel
    if abs(dy) > h // 4 or abs(dx) > w // 4:
        return None
    (ys, xs), (yp, xp) = overlap(h, w, dy, dx)
    a, b = cur[ys, xs].contiguous(), prev[yp, xp].contiguous()
    if min(a.shape) < 32:
        return None
    diff = a - b
    diff = diff - diff.mean()  # a global intensity change (bleaching, lamp drift) is not motion
    blurred = gaussian(diff, 2.0)[8:-8, 8:-8]
    energy = float((blurred**2).mean())
    kappa = 1.0 / (4 * math.pi * 4.0)
    noise_explained = energy <= threshold * max(float(diff.var(correction=0)) * kappa, 1e-12)
    structure = float(gaussian(a, 2.0)[8:-8, 8:-8].var(correction=0))
    small_change = energy <= STRUCTURE_FRACTION * max(structure, 1e-12)
    if not (noise_explained or small_change):
        return None
    mean_b = float(b.mean())
    if mean_b > 1e-6:  # the target must not teach a brightness change (bleaching, lamp drift)
        b = b * (float(a.mean()) / mean_b)
    return a, b
