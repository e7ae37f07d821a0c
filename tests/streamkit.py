"""Helpers for stream tests: a running StreamService on free loopback ports and a ZMQ client."""

from __future__ import annotations

import json
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import zmq

from fm2s_stream.adapters.curve import CurveKeys, secure_client
from fm2s_stream.demo import free_port
from fm2s_stream.frame import Frame
from fm2s_stream.service import ServiceOptions, StreamService
from fm2s_stream.wire import encode

FAST_CHANNEL = {"cold_start_steps": 12, "cold_start_crop": 32, "finetune_crop": 32}
FAULT_ROWS: list[dict[str, Any]] = []  # the fault matrix, printed at the end of the test run


def fault_row(fault: str, frames_in: int, out: int, written: int | str, flagged: int, note: str = "") -> None:
    """Record one row of the fault matrix (conftest prints the table in the terminal summary)."""
    FAULT_ROWS.append({"fault": fault, "in": frames_in, "out": out, "written": written, "flagged": flagged,
                       "note": note})


def start_service(save: Path | None = None, **kw: Any) -> StreamService:
    extra = dict(FAST_CHANNEL)
    extra.update(kw.pop("extra_channel", {}))
    cold_steps = extra.pop("cold_start_steps")
    opts = ServiceOptions(
        source=f"tcp://127.0.0.1:{free_port()}", publish=f"tcp://127.0.0.1:{free_port()}", save=save,
        threads=1, cold_start_steps=cold_steps, extra_channel=extra, **kw,
    )
    return StreamService(opts).start()


class Client:
    """PUSH frames to the service, PULL results back on a thread."""

    def __init__(self, service: StreamService, curve: CurveKeys | None = None) -> None:
        ctx = zmq.Context.instance()
        self.push = ctx.socket(zmq.PUSH)
        self.push.setsockopt(zmq.LINGER, 0)
        self.pull = ctx.socket(zmq.PULL)
        self.pull.setsockopt(zmq.LINGER, 0)
        if curve is not None:
            secure_client(self.push, curve)
            secure_client(self.pull, curve)
        self.push.connect(service.options.source)
        assert service.options.publish
        self.pull.connect(service.options.publish)
        self.results: list[tuple[dict[str, Any], np.ndarray]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._recv, daemon=True)
        self._thread.start()
        time.sleep(0.3)

    def _recv(self) -> None:
        while not self._stop.is_set():
            if self.pull.poll(50):
                head, body = self.pull.recv_multipart()
                h = json.loads(head)
                self.results.append((h, np.frombuffer(body, np.dtype(h["dtype"])).reshape(h["shape"])))

    def send(self, frame: Frame) -> None:
        self.push.send_multipart(encode(frame), copy=False)

    def send_raw(self, parts: list[bytes]) -> None:
        self.push.send_multipart(parts)

    def wait(self, n: int, timeout: float = 60) -> bool:
        end = time.monotonic() + timeout
        while len(self.results) < n and time.monotonic() < end:
            time.sleep(0.02)
        return len(self.results) >= n

    def close(self) -> None:
        self._stop.set()
        self._thread.join(2)
        self.push.close()
        self.pull.close()


def noisy_frames(n: int, shape: tuple[int, int] = (64, 64), seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    base = rng.uniform(20, 200, shape)
    return [(rng.poisson(base) * 4 + 100).astype(np.uint16) for _ in range(n)]


def serve_command(*args: str) -> list[str]:
    """`fm2s-stream serve ARGS` as the installed package runs it (see OUTSIDE)."""
    import sys

    return [sys.executable, "-m", "fm2s_stream.cli", "serve", *args]


# subprocesses start outside the checkout: `python -m` puts its working directory first on sys.path,
# where the checkout's fm2s_stream/ folder would shadow the installed package (which alone has adapters/)
OUTSIDE = Path(tempfile.gettempdir())


def spawn_serve(save: Path | None, *extra: str, **popen: Any) -> tuple[Any, str, str]:
    """A real `fm2s-stream serve` process on free loopback ports: (Popen, source, publish)."""
    import subprocess

    src, pub = f"tcp://127.0.0.1:{free_port()}", f"tcp://127.0.0.1:{free_port()}"
    cmd = serve_command("--source", src, "--publish", pub, "--threads", "1", "--status-every", "0", *extra)
    if save is not None:
        cmd += ["--save", str(save)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=OUTSIDE, **popen)
    return proc, src, pub


def stop_serve(proc: Any, timeout: float = 120) -> dict[str, Any]:
    """SIGTERM, wait, check exit code 0, and return the final JSON report."""
    import signal

    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, err.decode()[-3000:]
    return json.loads(out.decode().strip().splitlines()[-1])


def rss_bytes(pid: int) -> int:
    """Resident set size of a process (Linux /proc)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


def header(i: int, shape: tuple[int, int], channel: str = "c", t: int | None = None) -> bytes:
    """A wire-format header for a uint16 frame."""
    return json.dumps({"v": 1, "dtype": "<u2", "shape": list(shape), "frame_id": i, "channel": channel,
                       "t": i if t is None else t}).encode()
