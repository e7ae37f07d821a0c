"""The FrameSink protocol and SinkRelay, the thread that keeps a slow or failing sink off the worker.

A lossless relay has a bounded queue and makes the worker wait when it is full (backpressure up to
the source); a lossy relay (preview) drops its oldest entry instead. A sink's exception is logged
and counted, never raised into the worker; frames it failed on are counted as `failed`.
A SinkChain runs several sinks in order on one relay, so that a frame is on disk before it is
published: whoever receives frame N over ZMQ knows frames up to N are saved (or reported missing).
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from typing import Protocol, runtime_checkable

from .frame import Result

__all__ = ["FrameSink", "Gaps", "MemorySink", "SinkChain", "SinkRelay"]

log = logging.getLogger(__name__)


@runtime_checkable
class FrameSink(Protocol):
    """Where results go: ZMQ, disk, a GUI. `write` may block; it runs on the relay's thread."""

    name: str

    def open(self) -> None:
        """Acquire resources (sockets, files)."""

    def write(self, result: Result) -> None:
        """Deliver one result; raise on failure (the relay counts it)."""

    def close(self) -> None:
        """Flush and release; called once, after the last write."""


class SinkRelay:
    """Runs one sink on its own thread behind a bounded deque."""

    def __init__(self, sink: FrameSink, capacity: int = 256, lossless: bool = True) -> None:
        self.sink = sink
        self.capacity = capacity
        self.lossless = lossless
        self._queue: collections.deque[Result] = collections.deque()
        self._cond = threading.Condition()
        self._closing = False
        self._thread = threading.Thread(target=self._run, name=f"sink-{sink.name}", daemon=True)
        self.written = 0
        self.failed = 0
        self.dropped = 0
        self.last_error: str | None = None

    def start(self) -> None:
        """Open the sink and start its thread."""
        self.sink.open()
        self._thread.start()

    def put(self, result: Result, timeout: float | None = None) -> bool:
        """Queue a result; lossless relays wait for room (up to `timeout`), lossy ones drop oldest."""
        with self._cond:
            if len(self._queue) >= self.capacity:
                if not self.lossless:
                    self._queue.popleft()
                    self.dropped += 1
                elif not self._cond.wait_for(lambda: len(self._queue) < self.capacity, timeout):
                    return False
            self._queue.append(result)
            self._cond.notify_all()
        return True

    @property
    def depth(self) -> int:
        """Results waiting for this sink."""
        return len(self._queue)

    def _run(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(lambda: bool(self._queue) or self._closing)
                if not self._queue:
                    break
                result = self._queue[0]
            try:
                self.sink.write(result)
                self.written += 1
            except Exception as exc:
                self.failed += 1
                if self.last_error != str(exc):
                    log.error("sink %s failed on frame %s: %s", self.sink.name, result.frame.frame_id, exc)
                self.last_error = str(exc)
            with self._cond:
                self._queue.popleft()
                self._cond.notify_all()

    def close(self, timeout: float | None = None) -> None:
        """Deliver what is queued, then close the sink."""
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        if self._thread.is_alive():
            self._thread.join(timeout)
        try:
            self.sink.close()
        except Exception as exc:
            log.error("sink %s failed to close: %s", self.sink.name, exc)
            self.last_error = str(exc)

    def stats(self) -> dict[str, object]:
        """Counters for reports."""
        return {"written": self.written, "failed": self.failed, "dropped": self.dropped,
                "queued": self.depth, "last_error": self.last_error}


class SinkChain:
    """Several sinks written in order, on one thread: each member gets every frame even if an
    earlier one failed on it; the first failure is re-raised once all members have had the frame."""

    def __init__(self, sinks: list[FrameSink]) -> None:
        if not sinks:
            raise ValueError("a SinkChain needs at least one sink")
        self.sinks = list(sinks)
        self.name = "+".join(s.name for s in self.sinks)

    def open(self) -> None:
        """Open every member, in order."""
        for sink in self.sinks:
            sink.open()

    def write(self, result: Result) -> None:
        """Deliver to each member in order; raise the first member's error afterwards."""
        first: Exception | None = None
        for sink in self.sinks:
            try:
                sink.write(result)
            except Exception as exc:
                first = first or exc
        if first is not None:
            raise first

    def close(self) -> None:
        """Close every member, even if one fails (the first error is raised afterwards)."""
        first: Exception | None = None
        for sink in self.sinks:
            try:
                sink.close()
            except Exception as exc:
                first = first or exc
        if first is not None:
            raise first


class MemorySink:
    """Keeps every result in memory, in arrival order (for the Python API, benchmarks and tests)."""

    def __init__(self, name: str = "memory") -> None:
        self.name = name
        self.results: list[Result] = []
        self.by_id: dict[int, Result] = {}
        self._cond = threading.Condition()

    def open(self) -> None:
        """Nothing to acquire."""

    def write(self, result: Result) -> None:
        """Store the result and wake waiters."""
        with self._cond:
            self.results.append(result)
            self.by_id[result.frame.frame_id] = result
            self._cond.notify_all()

    def wait_for(self, frame_id: int, timeout: float = 60.0) -> Result:
        """The result of `frame_id`, waiting for it up to `timeout` seconds (TimeoutError after)."""
        end = time.monotonic() + timeout
        with self._cond:
            while frame_id not in self.by_id:
                left = end - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"no result for frame {frame_id} within {timeout} s")
                self._cond.wait(left)
            return self.by_id[frame_id]

    def close(self) -> None:
        """Nothing to release; results stay readable."""


class Gaps(list):  # type: ignore[type-arg]  # a JSON-ready list of dicts in reports
    """The frames a file sink could not write, as runs: first/last frame id, count, reason, open.

    `record` extends the open run (or opens one, logging the reason once); `recovered` closes it when
    a frame is written again; `close` closes every run (the sink is done).
    """

    def __init__(self, name: str, where: object) -> None:
        super().__init__()
        self.name, self.where = name, where

    def last_reason(self, default: str = "disk unavailable") -> str:
        """The reason of the latest run (for frames refused while the sink waits to retry)."""
        return str(self[-1]["reason"]) if self else default

    def record(self, frame_id: int, reason: str) -> None:
        """Count frame `frame_id` as not written, for `reason`."""
        gap = self[-1] if self and self[-1]["open"] else None
        if gap is None:
            gap = {"first_frame_id": frame_id, "last_frame_id": frame_id, "count": 0, "reason": reason, "open": True}
            self.append(gap)
            log.error("%s: cannot write to %s (%s); frames are not saved until it recovers", self.name, self.where,
                      reason)
        gap["last_frame_id"] = frame_id
        gap["count"] += 1

    def recovered(self) -> None:
        """A frame was written: close the open run."""
        if self and self[-1]["open"]:
            self[-1]["open"] = False
            log.warning("%s: writing again (%d frames missing)", self.name, self[-1]["count"])

    def close(self) -> None:
        """Close every run."""
        for gap in self:
            gap["open"] = False
