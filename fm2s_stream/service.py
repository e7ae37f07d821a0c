"""StreamService: wires a ZMQ source, the pipeline and the ZMQ/TIFF sinks as `serve` and `demo` run them.

With both a save directory and a PUSH output, the TIFF sinks and the PUSH sink share one relay in
that order: a frame is published only after it was written (or its gap recorded), so a receiver
that got frame N knows every frame up to N survives a crash of the server.
"""

from __future__ import annotations

import logging
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path
from typing import Any

import zmq

from .adapters.curve import CurveKeys, start_authenticator
from .adapters.zmq import PreviewPubSink, ZmqPushSink, ZmqSource, check_endpoint
from .channel import ChannelConfig, channel_config
from .devices import resolve_device
from .pipeline import Pipeline, PipelineConfig, default_threads
from .sinks import FrameSink, SinkChain
from .tiffsink import TiffSink

__all__ = ["ServiceOptions", "StreamService", "default_of"]

log = logging.getLogger(__name__)

SAVE_FORMATS = ("ome-tiff", "ome-zarr")


def default_of(cls: type, name: str) -> Any:
    """The default of a dataclass field: argparse and the demo read defaults from here, never repeat them."""
    f = next(f for f in fields(cls) if f.name == name)
    return f.default if f.default is not MISSING else f.default_factory()  # type: ignore[misc,operator]


@dataclass
class ServiceOptions:
    """Everything `serve` needs to know (the CLI flags, one field each); model and latency defaults
    are the channel's and pipeline's own."""

    source: str = "tcp://127.0.0.1:5555"
    source_type: str = "pull"
    publish: str | None = "tcp://127.0.0.1:5556"
    preview: str | None = None
    save: Path | None = None
    save_kind: str = "denoised"
    save_format: str = "ome-tiff"  # or "ome-zarr" (extra [zarr])
    roll_every: int = 10_000
    pixel_size_um: float | None = None
    preset: str = "auto"
    budget_ms: float = PipelineConfig.budget_ms
    device: str = "auto"
    seed: int = ChannelConfig.seed
    threads: int = field(default_factory=default_threads)
    temporal: bool = ChannelConfig.temporal
    cold_start_steps: int = ChannelConfig.cold_start_steps
    init: str = ChannelConfig.init
    cold_start: str = PipelineConfig.cold_start
    average_frames: int = ChannelConfig.average_frames
    allow_remote: bool = False
    queue_size: int = PipelineConfig.queue_size
    max_finetune_steps: int = PipelineConfig.max_finetune_steps
    max_latency_ms: float = PipelineConfig.max_latency_ms
    state: Path | None = None  # learnt channel state kept here between runs (`--state DIR`)
    curve: Path | None = None  # CurveZMQ key directory (`fm2s-stream keys`): encrypt + authenticate
    extra_channel: dict[str, Any] = field(default_factory=dict)


class StreamService:
    """Owns the source, the pipeline and its sinks; `start` and `stop` (drain, finalise) them."""

    def __init__(self, options: ServiceOptions, context: zmq.Context | None = None) -> None:
        self.options = o = options
        self.curve = CurveKeys(o.curve) if o.curve else None
        for endpoint in (o.source, o.publish, o.preview):
            if endpoint:
                check_endpoint(endpoint, o.allow_remote, encrypted=self.curve is not None)
        self.auth = None
        if self.curve is not None:
            self.curve.load("server", secret=True)  # fail now, with a clear message, if keys are missing
            # a context of its own: its authenticator must not judge other sockets of this process
            self.context = zmq.Context()
            self.auth = start_authenticator(self.context, self.curve)
        else:
            self.context = context or zmq.Context.instance()
        channel = channel_config(
            o.preset,
            device=resolve_device(o.device),
            seed=o.seed,
            temporal=o.temporal,
            cold_start_steps=o.cold_start_steps,
            init=o.init,
            average_frames=o.average_frames,
            **o.extra_channel,
        )
        config = PipelineConfig(channel=channel, budget_ms=o.budget_ms, threads=o.threads, queue_size=o.queue_size,
                                max_finetune_steps=o.max_finetune_steps, max_latency_ms=o.max_latency_ms,
                                cold_start=o.cold_start,
                                state_dir=str(o.state) if o.state else None)
        self.files: list[Any] = []  # TiffSink or ZarrSink per kind saved
        if o.save is not None:
            if o.save_format not in SAVE_FORMATS:
                raise ValueError(f"save format must be one of {SAVE_FORMATS}, got {o.save_format!r}")
            if o.save_format == "ome-zarr":
                from .adapters.ngff import ZarrSink as sink_class
            else:
                sink_class = TiffSink  # type: ignore[assignment]
            kinds = ("denoised", "raw") if o.save_kind == "both" else (o.save_kind,)
            for kind in kinds:
                self.files.append(sink_class(o.save, kind, roll_every=o.roll_every, pixel_size_um=o.pixel_size_um))
        self.push = ZmqPushSink(o.publish, self.context, curve=self.curve) if o.publish else None
        durable: list[FrameSink] = [*self.files, *([self.push] if self.push else [])]
        sinks: list[FrameSink] = [SinkChain(durable)] if durable else []
        previews: list[FrameSink] = [PreviewPubSink(o.preview, self.context, self.curve)] if o.preview else []
        self.pipeline = Pipeline(config, sinks, previews)
        self.source = ZmqSource(o.source, o.source_type, bind=True, context=self.context, curve=self.curve)

    def start(self) -> StreamService:
        """Open sinks, start the worker, then start receiving."""
        self.pipeline.start()
        self.source.start(self.pipeline)
        log.info("serving: source %s (%s) -> %s", self.options.source, self.options.source_type,
                 ", ".join(r.sink.name for r in self.pipeline.relays + self.pipeline.preview_relays))
        return self

    def stop(self) -> dict[str, Any]:
        """Stop receiving, process every queued frame, finalise files; return the final report."""
        self.source.stop()
        self.pipeline.stop()
        if self.auth is not None:
            self.auth.stop()
        return self.report()

    def report(self) -> dict[str, Any]:
        """Pipeline stats plus the source's and sinks' own counters."""
        stats = self.pipeline.stats()
        stats["source"] = {"received": self.source.received, "malformed": self.source.malformed}
        if self.push is not None:
            stats["publish"] = self.push.stats()
        stats["files"] = {t.kind: t.stats() for t in self.files}
        stats["memory_bound_mb"] = self.memory_bound_bytes() / 2**20
        return stats

    def memory_bound_bytes(self, frame_bytes: int | None = None) -> int:
        """Most frame data the service buffers: the pipeline's bound plus the ZMQ high-water marks."""
        n = frame_bytes if frame_bytes is not None else self.pipeline.max_frame_bytes
        zmq_msgs = self.source.rcvhwm + (self.push.sndhwm if self.push else 0)
        return self.pipeline.buffered_bytes_bound(n) + zmq_msgs * n
