"""The streaming pipeline: bounded queue -> worker (per-channel state, latency policy) -> sinks.

Sources call `submit` and nothing else. The worker publishes first and learns after: it answers a
frame (`Channel.answer`), hands the result to the sinks, then learns as the `LatencyPolicy` allows,
stopping as soon as another frame waits (a cold start always gets its guaranteed share). Idle time
goes to unfinished cold starts. The preview (lossy) sinks get only each channel's newest frame. Lossless sinks
never drop: a full queue makes `submit` wait (backpressure); under a sustained backlog the preview
still gets a frame every PREVIEW_STARVATION_S. Every frame ends in exactly one of the counters
`denoised`, `bootstrap`, `raw` (passed through with a reason) or `rejected`.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
from collections import Counter, defaultdict, deque
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import torch

from .channel import Channel, ChannelConfig, Prepared, warm_up
from .devices import keep_host_memory
from .frame import Frame, FrameError, Result
from .policy import LatencyPolicy, Plan
from .sinks import FrameSink, SinkRelay
from .starting import INITS
from .state import StateError, StateStore

__all__ = ["FrameSource", "Pipeline", "PipelineConfig", "default_threads"]

log = logging.getLogger(__name__)
PREVIEW_STARVATION_S = 0.2  # under backlog the preview still gets a frame at least this often
FPS_WINDOW = 100  # frames over which the streaming rate is measured
# what init "auto" starts a new channel from: benchmarks/init_study.py measured the generic network at
# least as good as random weights at every cold-start length (see the README's "Cold start")
AUTO_INIT = "generic"
IDLE_POLL_S = 0.001  # with cold starts pending, a quiet queue this long is idle time for them


def default_threads() -> int:
    """torch CPU threads for the worker: min(4, cores)."""
    return max(1, min(4, os.cpu_count() or 1))


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
    # > 0: a frame whose network answer would come out later than this after arrival, while a newer frame of its
    # channel waits, gets the classical answer (see policy.LatencyPolicy.shed); 0: every frame gets the network
    max_latency_ms: float = 0.0
    threads: int = field(default_factory=default_threads)
    # "classical": answer with the pre-denoiser meanwhile; "wait": train until the network answers
    cold_start: str = "classical"
    state_dir: str | None = None  # learnt channel state kept here between runs (StateStore); None = not kept
    save_state_every_s: float = 120.0  # while streaming, ready channels are saved this often (and at stop)


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
        self.channels: dict[str, Channel] = {}
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
        self.policy = LatencyPolicy(config.budget_ms, config.max_finetune_steps, config.max_latency_ms)
        self.state = StateStore(config.state_dir) if config.state_dir else None
        self.state_loaded: dict[str, str] = {}  # channel -> "resumed" or why its saved state was not used
        self._last_save = time.monotonic()
        self._out_times: deque[float] = deque(maxlen=FPS_WINDOW)  # when the last results were emitted
        self.max_frame_bytes = 0
        self._last_preview: dict[str, float] = {}  # per channel: when its last frame went to the preview
        self._cold: dict[str, tuple[Channel, Prepared]] = {}  # worker: unfinished cold starts, latest active last
        self._owed: dict[str, float] = {}  # worker: cold-start seconds owed to each channel (see _learn)

    # -- lifecycle ---------------------------------------------------------------------------------
    def start(self) -> Pipeline:
        """Open the sinks, warm up (so the first frame does not pay one-off costs), start the worker.

        The sinks open first: receivers that connect to them while this warms up are connected by the
        time the first result is published (a sink with no receiver does not wait for one).
        """
        for relay in self.relays + self.preview_relays:
            relay.start()
        keep_host_memory()
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
        self.save_state()
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
    def channel_for(self, name: str, first_frame: np.ndarray | None = None) -> Channel:
        """The channel's state, created on first use (optionally warm from the first channel's network)."""
        channel = self.channels.get(name)
        if channel is None:
            channel = Channel(name, self.config.channel, first_frame=first_frame)
            how = "resumed from its saved state" if self._resume(channel) else self._start(channel)
            self.channels[name] = channel
            log.info("new channel %r (%s)", name, how)
        return channel

    def _start(self, channel: Channel) -> str:
        """Start a new channel's network as `ChannelConfig.init` says; how it started (for the log)."""
        init = self.config.channel.init
        if init not in INITS:  # a channel's name: its trained network, no cold start
            donor = self.channels.get(init)
            if donor is not None and donor.ready and channel.learner.warm_from(donor.learner):
                return f"warm from channel {init!r}"
            log.warning("channel %r: channel %r has no trained network of its kind yet; starting %s",
                        channel.name, init, AUTO_INIT)
            init = "auto"
        if init == "auto":
            init = AUTO_INIT
        if init == "generic":
            if channel.learner.start_generic():
                return "cold start from the generic network"
            log.warning("channel %r: no generic network in this package; starting from random weights", channel.name)
        return "cold start from random weights"

    def _resume(self, channel: Channel) -> bool:
        """Continue the channel from its saved state when there is a usable one (else it starts cold)."""
        if self.state is None:
            return False
        try:
            saved = self.state.load(channel.name)
        except StateError as exc:
            self.state_loaded[channel.name] = str(exc)
            log.warning("channel %r starts cold: %s", channel.name, exc)
            return False
        if saved is None:
            return False
        why = channel.resume(saved[0], saved[1])
        self.state_loaded[channel.name] = why or "resumed"
        if why:
            log.warning("channel %r starts cold: %s: %s", channel.name, self.state.path_for(channel.name), why)
        return why is None

    def save_state(self) -> int:
        """Save every channel that has learnt anything (an unfinished cold start too); how many were saved."""
        if self.state is None:
            return 0
        saved = 0
        for channel in list(self.channels.values()):
            if channel.steps > 0:
                try:
                    tensors, meta = channel.learnt()
                except Exception:
                    log.exception("could not snapshot channel %r for saving", channel.name)
                    continue
                saved += self.state.save(channel.name, tensors, meta)
        self._last_save = time.monotonic()
        return saved

    def _save_if_due(self) -> None:
        if self.state is not None and time.monotonic() - self._last_save >= self.config.save_state_every_s:
            self.save_state()

    def _run(self) -> None:
        torch.set_num_threads(self.config.threads)
        cold = self._cold  # channels still in their cold start -> (channel, its latest frame)
        while True:
            try:
                frame = self._queue.get(timeout=IDLE_POLL_S if cold else 0.2)
            except queue.Empty:
                self._save_if_due()  # periodic saves go into idle time
                if cold:  # idle: finish cold starts, the most recently active channel first
                    name = next(reversed(cold))
                    channel, prep = cold[name]
                    self._learn(channel, prep, Plan(max_steps=10**9))
                    if channel.ready:
                        del cold[name]
                continue
            if frame is None:
                break
            done = self._process(frame)
            if done is not None:
                cold.pop(done[0].name, None)
                if not done[0].ready:
                    cold[done[0].name] = done
            if self._queue.empty():
                self._save_if_due()  # a stream that never idles still saves, after a frame, when none waits
        log.debug("worker drained")

    def _answer(self, frame: Frame) -> tuple[Result, Channel | None, Prepared | None]:
        """Answer one frame; any failure passes it raw with the reason (the stream never stops)."""
        backlog = self._queue.qsize()
        channel: Channel | None = None
        prep = None
        try:
            channel = self.channel_for(frame.channel, frame.pixels)
            prep = channel.prepare(frame.pixels, (frame.p, frame.z))
            if not channel.learner.answers and self.config.cold_start == "wait":
                while not channel.learner.answers:
                    channel.learn_step(prep)
            waited = time.perf_counter() - frame.received
            reason = None
            if channel.learner.answers and self.policy.shed(waited, self._queued(frame.channel)):
                pixels, status = channel.answer_classically(prep)
                reason = (f"overload: waited {waited * 1000:.0f} ms, the network's answer would pass "
                          f"max_latency_ms {self.config.max_latency_ms:g}; answered classically")
                prep = None  # nothing to learn from: the worker is behind
                with self._lock:
                    self.counts["shed"] += 1
            else:
                pixels, status = channel.answer(prep)
        except Exception as exc:  # a broken frame or model must not stop the stream
            log.exception("denoising frame %s of %r failed; passing it raw", frame.frame_id, frame.channel)
            if channel is not None:
                channel.restore()
            pixels, status, reason = np.array(frame.pixels, copy=True), "raw", f"{type(exc).__name__}: {exc}"
        latency = (time.perf_counter() - frame.received) * 1000
        degraded = status != "denoised" or backlog > 0
        averaged = prep.averaged if prep is not None and status == "denoised" else 1.0
        steps, progress = (channel.steps, channel.cold_progress) if channel else (0, 0.0)
        return Result(frame, pixels, status, degraded, steps, latency, reason, averaged, progress), channel, prep

    def _process(self, frame: Frame) -> tuple[Channel, Prepared] | None:
        self.policy.arrived(frame.channel, frame.received)
        t0 = time.perf_counter()
        result, channel, prep = self._answer(frame)
        answer_s = time.perf_counter() - t0
        self.compute["infer_s"] += answer_s
        if result.status == "denoised":
            self.policy.answered(answer_s)
        backlog = self._queue.qsize()
        self._emit(result, newest=backlog == 0 or not self._queued(frame.channel))
        if channel is None or prep is None or result.status == "raw":
            return None
        try:  # learn after: as the latency policy allows
            channel.remember(prep)
            # periodic work first: the steps after it then stop as the next frame is due, as always
            if channel.maintain(prep):
                with self._lock:
                    self.counts["recalibrations"] += 1
            plan = self.policy.plan(frame.received, backlog, channel.ready, answer_s, channel.frames_seen,
                                    answers=channel.learner.answers)
            if channel.ready and any(name != channel.name for name in self._cold):
                # another channel has not finished its cold start (it went quiet): the time between frames
                # is its idle time, not this ready channel's fine-tuning, which would take all of it
                with self._lock:
                    self.counts["finetune_yielded"] += 1
            elif plan.skipped:
                with self._lock:
                    self.counts["finetune_skipped"] += 1
            elif plan.max_steps:
                self._learn(channel, prep, plan)
        except Exception:
            log.exception("learning after frame %s of %r failed", frame.frame_id, frame.channel)
        return channel, prep

    def buffered_bytes_bound(self, frame_bytes: int | None = None) -> int:
        """Most bytes of frame data this pipeline can hold at once: the queue, one frame in work,
        each lossless relay's results (raw + denoised pixels) and the previews' two."""
        n = frame_bytes if frame_bytes is not None else self.max_frame_bytes
        held = self.config.queue_size + 1 + sum(2 * r.capacity for r in self.relays)
        held += sum(2 * r.capacity for r in self.preview_relays)
        return held * n

    def sustainable_fps(self) -> float | None:
        """Frames per second at which every frame gets its full fine-tune (None until measured)."""
        return self.policy.sustainable_fps()

    def _learn(self, channel: Channel, prep: Prepared, plan: Plan) -> None:
        """Train by `plan`: until its deadline, its step count or a waiting frame, but at least its
        guaranteed seconds. A plan made for a cold channel ends with its cold start (what it is owed
        then lapses): the next frame's plan is a ready channel's.

        The guaranteed seconds are owed to the channel and paid in whole steps: a step taken while a
        frame waits is charged against what is owed (a step longer than one frame's share runs on
        every few frames only, so the share stays COLD_SHARE), one taken while none waits is free."""
        steps, t0, cold = 0, time.perf_counter(), not channel.ready
        owed = self._owed.get(channel.name, 0.0) + plan.at_least_s
        while steps < plan.max_steps and not (cold and channel.ready):
            now = time.perf_counter()
            waiting = not self._queue.empty()
            if (waiting or (plan.deadline is not None and now > plan.deadline)) and not (plan.at_least_s and owed > 0):
                break
            was_ready = channel.ready
            try:
                channel.learn_step(prep)
            except Exception:
                log.exception("training step failed on channel %r; restored last good state", channel.name)
                channel.restore()
                with self._lock:
                    self.counts["train_failures"] += 1
                break
            steps += 1
            if plan.at_least_s and waiting:
                owed -= time.perf_counter() - now
            if was_ready:
                self.policy.stepped(time.perf_counter() - now)
        if plan.at_least_s:
            self._owed[channel.name] = 0.0 if channel.ready else owed
        with self._lock:
            self.counts["train_steps"] += steps
            self.compute["train_s"] += time.perf_counter() - t0

    def _queued(self, channel: str) -> bool:
        """True if a frame of `channel` waits in the queue (the preview is newest-frame-wins per channel)."""
        with self._queue.mutex:
            return any(f is not None and f.channel == channel for f in self._queue.queue)

    def _emit(self, result: Result, newest: bool) -> None:
        with self._lock:
            self.counts[result.status] += 1
            self.counts["out"] += 1
            if result.degraded:
                self.counts["degraded"] += 1
            self.latencies.append(result.latency_ms)
            self._out_times.append(time.perf_counter())
        for relay in self.relays:
            while not relay.put(result, timeout=1.0):
                log.warning("sink %s is full; waiting (backpressure)", relay.sink.name)
        now = time.perf_counter()
        last = self._last_preview.get(result.frame.channel, 0.0)
        if newest or now - last > PREVIEW_STARVATION_S:
            # each channel's newest frame only, but never leave the preview frozen under a sustained backlog
            self._last_preview[result.frame.channel] = now
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
            times = list(self._out_times)
        # the rate over the last FPS_WINDOW results, not the process lifetime (which counts start-up and idle time)
        fps = (len(times) - 1) / (times[-1] - times[0]) if len(times) > 1 and times[-1] > times[0] else 0.0
        return {
            "counts": counts,
            "rejects": rejects,
            "compute_s": dict(self.compute),
            "fps": fps,
            "p50_ms": float(np.percentile(lat, 50)) if lat.size else None,
            "p99_ms": float(np.percentile(lat, 99)) if lat.size else None,
            "queue": self.depth,
            "sustainable_fps": self.sustainable_fps(),
            "channels": {name: c.stats() for name, c in self.channels.items()},
            "state": None if self.state is None else {
                "dir": str(self.state.directory), "writable": self.state.writable, "saved": self.state.saved,
                "save_failures": self.state.save_failures, "loaded": dict(self.state_loaded)},
            "sinks": {r.sink.name: r.stats() for r in self.relays + self.preview_relays},
        }

    def status_line(self) -> str:
        """One line for a live terminal display."""
        s = self.stats()
        c = s["counts"]
        assert isinstance(c, dict)
        p50, p99 = s["p50_ms"], s["p99_ms"]
        chans = " ".join(f"{n}:{c.steps}{'' if c.ready else '*'}" for n, c in list(self.channels.items()))
        lat = f"p50 {p50:.0f} ms p99 {p99:.0f} ms" if p50 is not None else "p50 - p99 -"
        return (f"in {c.get('in', 0)} out {c.get('out', 0)} rej {c.get('rejected', 0)} "
                f"{s['fps']:.1f} fps {lat} queue {s['queue']} steps [{chans}]")
