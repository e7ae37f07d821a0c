"""The streaming pipeline: bounded queue -> worker (per-channel models, latency policy) -> sinks.

Sources call `submit` and nothing else. The worker publishes first and learns after: it runs
inference, hands the result to the sinks, then spends what is left of the latency budget on
fine-tune steps, stopping as soon as another frame waits. Under backlog it cuts fine-tuning first,
then runs inference only; the preview (lossy) sinks get only the newest frame. Lossless sinks
never drop: a full queue makes `submit` wait (backpressure); under a sustained backlog the preview
still gets a frame every PREVIEW_STARVATION_S. Every frame ends in exactly one of
the counters `denoised`, `bootstrap`, `raw` (passed through with a reason) or `rejected`.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import Counter, defaultdict, deque
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch

from .channel import ChannelConfig, ChannelModel, Prepared, warm_up
from .frame import Frame, FrameError, Result
from .sinks import FrameSink, SinkRelay

__all__ = ["FrameSource", "Pipeline", "PipelineConfig"]

log = logging.getLogger(__name__)
PREVIEW_STARVATION_S = 0.2  # under backlog the preview still gets a frame at least this often
COLD_START_BACKLOG = 4  # queued frames beyond which a cold start takes a step only every 4th frame


class FrameSource(Protocol):
    """Something that produces frames: it calls `pipeline.submit(frame)` and nothing else."""

    def start(self, pipeline: Pipeline) -> None:
        """Begin delivering frames to `pipeline`."""

    def stop(self) -> None:
        """Stop delivering; return once no more `submit` calls will come."""


@dataclass(frozen=True)
class PipelineConfig:
    """Queue, latency and threading policy of a pipeline."""

    channel: ChannelConfig
    budget_ms: float = 50.0
    queue_size: int = 64
    max_finetune_steps: int = 8
    threads: int = 2
    init_from_first_channel: bool = False
    cold_start: str = "classical"  # "classical": answer with the pre-denoiser meanwhile; "wait": train first


class Pipeline:
    """Owns the queue, the worker thread, the channel models and the sink relays."""

    def __init__(
        self,
        config: PipelineConfig,
        sinks: list[FrameSink] | None = None,
        previews: list[FrameSink] | None = None,
        relay_capacity: int = 256,
    ) -> None:
        self.config = config
        self.models: dict[str, ChannelModel] = {}
        self.relays = [SinkRelay(s, relay_capacity, lossless=True) for s in sinks or []]
        self.preview_relays = [SinkRelay(s, 2, lossless=False) for s in previews or []]
        self._queue: queue.Queue[Frame | None] = queue.Queue(maxsize=config.queue_size)
        self._worker = threading.Thread(target=self._run, name="fm2s-worker", daemon=True)
        self._lock = threading.Lock()
        self.counts: Counter[str] = Counter()
        self.compute: defaultdict[str, float] = defaultdict(float)  # seconds in inference and in training
        self.rejects: Counter[str] = Counter()
        self.latencies: deque[float] = deque(maxlen=100_000)
        self.started_at = 0.0
        self._running = False
        self._infer_ema = 0.0  # seconds, smoothed: what one inference costs
        self._step_ema = 0.0  # seconds, smoothed: what one fine-tune step costs
        self.max_frame_bytes = 0
        self._last_preview = 0.0

    # -- lifecycle ---------------------------------------------------------------------------------
    def start(self) -> Pipeline:
        """Open the sinks, warm up (so the first frame does not pay one-off costs), start the worker.

        The sinks open first: receivers that connect to them while this warms up are connected by the
        time the first result is published (a sink with no receiver does not wait for one).
        """
        for relay in self.relays + self.preview_relays:
            relay.start()
        try:
            warm_up()
        except Exception:  # only an optimisation: the first frame pays instead
            log.exception("warm-up failed")
        self.started_at = time.perf_counter()
        self._running = True
        self._worker.start()
        return self

    def stop(self, timeout: float | None = None) -> None:
        """Drain the queue (every frame submitted so far is processed), then close the sinks."""
        if not self._running:
            return
        self._queue.put(None)
        self._worker.join(timeout)
        self._running = False
        for relay in self.relays + self.preview_relays:
            relay.close(timeout)

    def __enter__(self) -> Pipeline:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- input -------------------------------------------------------------------------------------
    def submit(self, frame: Frame, block: bool = True, timeout: float | None = None) -> bool:
        """Validate and enqueue a frame; waits for room when `block` (backpressure).

        Returns False (and counts it) when the frame is invalid or the queue stayed full.
        """
        try:
            frame.validate()
        except FrameError as exc:
            self.reject(exc.kind, str(exc))
            return False
        try:
            self._queue.put(frame, block=block, timeout=timeout)
        except queue.Full:
            self.reject("queue_full", f"queue full, frame {frame.frame_id} of {frame.channel!r} not accepted")
            return False
        with self._lock:
            self.counts["in"] += 1
            self.max_frame_bytes = max(self.max_frame_bytes, frame.pixels.nbytes)
        return True

    def reject(self, kind: str, message: str) -> None:
        """Count and log a frame or message that could not be accepted (used by sources too)."""
        with self._lock:
            self.rejects[kind] += 1
            self.counts["rejected"] += 1
        log.warning("rejected (%s): %s", kind, message)

    @property
    def depth(self) -> int:
        """Frames waiting in the queue."""
        return self._queue.qsize()

    # -- worker ------------------------------------------------------------------------------------
    def model_for(self, channel: str, first_frame: np.ndarray | None = None) -> ChannelModel:
        """The channel's model, created on first use (optionally from the first channel's weights)."""
        model = self.models.get(channel)
        if model is None:
            donor = next(iter(self.models.values()), None) if self.config.init_from_first_channel else None
            model = ChannelModel(channel, self.config.channel, init_from=donor, first_frame=first_frame)
            self.models[channel] = model
            log.info("new channel %r (%s)", channel, "warm from " + donor.name if donor else "cold start")
        return model

    def _run(self) -> None:
        torch.set_num_threads(self.config.threads)
        # channels still in their cold start -> (model, its latest frame), most recently active last
        cold: dict[str, tuple[ChannelModel, Prepared]] = {}
        while True:
            try:
                frame = self._queue.get(timeout=0.01 if cold else 0.2)
            except queue.Empty:
                if cold:  # idle: finish cold starts, the most recently active channel first
                    name = next(reversed(cold))
                    model, prep = cold[name]
                    self._learn(model, prep, deadline=None, max_steps=10**9, until_ready=True)
                    if model.ready:
                        del cold[name]
                continue
            if frame is None:
                break
            done = self._process(frame)
            if done is not None:
                cold.pop(done[0].name, None)
                if not done[0].ready:
                    cold[done[0].name] = done
        log.debug("worker drained")

    def _process(self, frame: Frame) -> tuple[ChannelModel, Prepared] | None:
        backlog = self._queue.qsize()
        model: ChannelModel | None = None
        prep = None
        try:
            model = self.model_for(frame.channel, frame.pixels)
            t0 = time.perf_counter()
            prep = model.prepare(frame.pixels, (frame.p, frame.z))
            if not model.ready and self.config.cold_start == "wait":
                while not model.ready:
                    model.train_step(prep)
            pixels, status = model.infer(prep)
            elapsed = time.perf_counter() - t0
            self.compute["infer_s"] += elapsed
            if status == "denoised":
                self._infer_ema = elapsed if self._infer_ema == 0 else 0.9 * self._infer_ema + 0.1 * elapsed
            reason = None
        except Exception as exc:  # a broken frame or model must not stop the stream
            log.exception("denoising frame %s of %r failed; passing it raw", frame.frame_id, frame.channel)
            if model is not None:
                model.restore()
            pixels, status, reason = np.array(frame.pixels, copy=True), "raw", f"{type(exc).__name__}: {exc}"
        latency = (time.perf_counter() - frame.received) * 1000
        degraded = status != "denoised" or backlog > 0
        averaged = prep.averaged if prep is not None and status == "denoised" else 1.0
        result = Result(frame, pixels, status, degraded, model.steps if model else 0, latency, reason, averaged)
        self._emit(result, newest=backlog == 0)
        if model is None or prep is None or status == "raw":
            return None
        # learn after: fine-tune within the budget, only while no other frame waits
        try:
            model.remember(prep)
        except Exception:
            log.exception("temporal pairing failed for %r", frame.channel)
        if not model.ready:
            # a cold start progresses by at least one step per frame while the queue is short; under a
            # longer backlog by one step every COLD_START_BACKLOG frames, so that it still finishes
            # but its answers do not pile up seconds of latency
            at_least = int(backlog < COLD_START_BACKLOG or model.frames_seen % COLD_START_BACKLOG == 0)
            self._learn(model, prep, frame.received + self.config.budget_ms / 1000, 10**9, at_least=at_least)
        elif backlog == 0 and self._step_fits_budget():
            # a frame arriving mid-step waits at most one step: steps are only taken while
            # step + inference fits the budget, and they stop as soon as a frame waits
            self._learn(model, prep, None, self.config.max_finetune_steps)
        elif backlog == 0:
            # over budget: skip, but let the estimate decay so that one-off costs (kernel set-up,
            # a busy moment) do not switch fine-tuning off for good; the next step re-measures it
            self._step_ema *= 0.9
            with self._lock:
                self.counts["finetune_skipped"] += 1
        else:
            with self._lock:
                self.counts["finetune_skipped"] += 1
        return model, prep

    def buffered_bytes_bound(self, frame_bytes: int | None = None) -> int:
        """Most bytes of frame data this pipeline can hold at once: the queue, one frame in work,
        each lossless relay's results (raw + denoised pixels) and the previews' two."""
        n = frame_bytes if frame_bytes is not None else self.max_frame_bytes
        held = self.config.queue_size + 1 + sum(2 * r.capacity for r in self.relays)
        held += sum(2 * r.capacity for r in self.preview_relays)
        return held * n

    def sustainable_fps(self) -> float | None:
        """Frames per second at which every frame gets its full fine-tune (None until measured)."""
        if not self._infer_ema or not self._step_ema:
            return None
        return 1.0 / (self._infer_ema + self.config.max_finetune_steps * self._step_ema)

    def _step_fits_budget(self) -> bool:
        """True while one fine-tune step plus one inference fits the latency budget."""
        return (self._step_ema + self._infer_ema) * 1000 <= self.config.budget_ms

    def _learn(
        self, model: ChannelModel, prep: Prepared, deadline: float | None, max_steps: int, at_least: int = 0,
        until_ready: bool = False,
    ) -> None:
        """Train while no frame waits, until `deadline` or `max_steps` (but at least `at_least` steps);
        with `until_ready`, stop as soon as the cold start is over."""
        steps, t0 = 0, time.perf_counter()
        while steps < max_steps and not (until_ready and model.ready):
            if steps >= at_least and (
                not self._queue.empty() or (deadline is not None and time.perf_counter() > deadline)
            ):
                break
            t_step = time.perf_counter()
            try:
                model.train_step(prep)
            except Exception:
                log.exception("training step failed on channel %r; restored last good state", model.name)
                with self._lock:
                    self.counts["train_failures"] += 1
                return
            steps += 1
            if model.ready:
                dt = time.perf_counter() - t_step
                self._step_ema = dt if self._step_ema == 0 else 0.9 * self._step_ema + 0.1 * dt
        with self._lock:
            self.counts["train_steps"] += steps
            self.compute["train_s"] += time.perf_counter() - t0

    def _emit(self, result: Result, newest: bool) -> None:
        with self._lock:
            self.counts[result.status] += 1
            self.counts["out"] += 1
            if result.degraded:
                self.counts["degraded"] += 1
            self.latencies.append(result.latency_ms)
        for relay in self.relays:
            while not relay.put(result, timeout=1.0):
                log.warning("sink %s is full; waiting (backpressure)", relay.sink.name)
        now = time.perf_counter()
        if newest or now - self._last_preview > PREVIEW_STARVATION_S:
            # newest frame only, but never leave the preview frozen under a sustained backlog
            self._last_preview = now
            for relay in self.preview_relays:
                relay.put(result)
        else:
            with self._lock:
                self.counts["preview_skipped"] += 1

    # -- reporting ---------------------------------------------------------------------------------
    def stats(self) -> dict[str, object]:
        """A snapshot of counters, latency percentiles, queue depth, and per-channel/sink state."""
        with self._lock:
            lat = np.asarray(self.latencies, dtype=np.float64)
            counts = dict(self.counts)
            rejects = dict(self.rejects)
        elapsed = max(time.perf_counter() - self.started_at, 1e-9) if self.started_at else 0.0
        return {
            "counts": counts,
            "rejects": rejects,
            "compute_s": dict(self.compute),
            "fps": counts.get("out", 0) / elapsed if elapsed else 0.0,
            "p50_ms": float(np.percentile(lat, 50)) if lat.size else None,
            "p99_ms": float(np.percentile(lat, 99)) if lat.size else None,
            "queue": self.depth,
            "sustainable_fps": self.sustainable_fps(),
            "channels": {name: m.stats() for name, m in self.models.items()},
            "sinks": {r.sink.name: r.stats() for r in self.relays + self.preview_relays},
        }

    def status_line(self) -> str:
        """One line for a live terminal display."""
        s = self.stats()
        c = s["counts"]
        assert isinstance(c, dict)
        p50, p99 = s["p50_ms"], s["p99_ms"]
        chans = " ".join(f"{n}:{m.steps}{'' if m.ready else '*'}" for n, m in list(self.models.items()))
        lat = f"p50 {p50:.0f} ms p99 {p99:.0f} ms" if p50 is not None else "p50 - p99 -"
        return (f"in {c.get('in', 0)} out {c.get('out', 0)} rej {c.get('rejected', 0)} "
                f"{s['fps']:.1f} fps {lat} queue {s['queue']} steps [{chans}]")
