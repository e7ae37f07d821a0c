"""`fm2s-stream demo`: a synthetic 2-channel camera streamed over real ZMQ through the `serve` pipeline.

The camera's frames are rendered before streaming starts (a real camera is another device, and
rendering on the same two cores would distort the latency figures); then they are pushed at a fixed
rate into a StreamService, exactly the one `serve` runs, and the denoised frames are pulled back.
At the end: latency percentiles, fps, PSNR against the synthetic ground truth, OME-TIFF files, a
before/after PNG and a latency-over-time plot.
"""

from __future__ import annotations

import argparse
import json
import socket
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["add_demo_parser", "run_demo"]

CHANNELS = ("GFP", "mCherry")


def free_port() -> int:
    """A currently free TCP port on 127.0.0.1."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def new_run_dir(base: Path) -> Path:
    """base/run-NNN, the first that does not exist (a demo never overwrites an earlier run)."""
    base.mkdir(parents=True, exist_ok=True)
    for i in range(1000):
        d = base / f"run-{i:03d}"
        try:
            d.mkdir()
            return d
        except FileExistsError:
            continue
    raise RuntimeError(f"no free run directory under {base}")


def psnr(x: np.ndarray, gt: np.ndarray) -> float:
    """PSNR with the ground truth's dynamic range as the peak."""
    peak = float(gt.max() - gt.min())
    err = float(np.mean((x.astype(np.float64) - gt) ** 2))
    return 10 * np.log10(peak * peak / max(err, 1e-12))


def run_demo(
    out_dir: Path,
    seconds: float = 30.0,
    fps: float = 20.0,
    size: int = 512,
    preset: str = "auto",
    budget_ms: float | None = None,
    threads: int | None = None,
    device: str = "auto",
    seed: int = 0,
    say: Callable[[str], None] = print,
    cold_start_steps: int | None = None,
    average_frames: int | None = None,
    state: Path | None = None,
    init: str | None = None,
) -> dict[str, Any]:
    """Run the demo and return its report (also written to report.json in the run directory).

    None means serve's default (`ServiceOptions`)."""
    import zmq
    from scipy import ndimage

    from .figures import before_after_figure, latency_figure
    from .service import ServiceOptions, StreamService
    from .synthetic import Camera, TimeLapse
    from .wire import decode, encode

    run = new_run_dir(out_dir)
    n = int(seconds * fps)
    cam = Camera(gain=2.0, read_noise=3.0, offset=100.0, bit_depth=16, correlation=0.6)
    scenes = [TimeLapse((size, size), cam, seed=seed + i, drift=(0.15, 0.1), peak=120 + 60 * i)
              for i in range(len(CHANNELS))]
    say(f"rendering {n} frames ({len(CHANNELS)} channels, {size}x{size} uint16) ...")
    frames, truth = [], {}
    for i in range(n):
        c = i % len(CHANNELS)
        noisy, gt = scenes[c].frame(i // len(CHANNELS))
        frames.append((c, i // len(CHANNELS), noisy))
        truth[i] = gt
    src, pub = f"tcp://127.0.0.1:{free_port()}", f"tcp://127.0.0.1:{free_port()}"
    options = ServiceOptions(source=src, publish=pub, save=run, save_kind="both", preset=preset,
                             device=device, seed=seed, state=state)
    if cold_start_steps is not None:
        options.cold_start_steps = cold_start_steps
    if init is not None:
        options.init = init
    if budget_ms is not None:
        options.budget_ms = budget_ms
    if threads is not None:
        options.threads = threads
    if average_frames is not None:
        options.average_frames = average_frames
    service = StreamService(options).start()
    ctx: zmq.Context = zmq.Context.instance()
    pull = ctx.socket(zmq.PULL)
    pull.connect(pub)
    push = ctx.socket(zmq.PUSH)
    push.connect(src)
    received: dict[int, tuple[float, dict[str, Any], np.ndarray]] = {}
    sent: dict[int, float] = {}
    done = threading.Event()

    def receive() -> None:
        while not done.is_set() or len(received) < len(sent):
            if not pull.poll(100):
                if done.is_set() and time.perf_counter() - last_sent[0] > 30:
                    break
                continue
            parts = pull.recv_multipart(copy=False)
            frame = decode([p.buffer for p in parts])
            head = json.loads(bytes(parts[0].buffer))
            received[frame.frame_id] = (time.perf_counter(), head, np.array(frame.pixels))

    last_sent = [time.perf_counter()]
    receiver = threading.Thread(target=receive, daemon=True)
    receiver.start()
    time.sleep(0.3)  # let both connections settle
    say(f"streaming {n} frames at {fps:.0f} fps over {src} -> fm2s -> {pub} ...")
    from .frame import Frame

    t0 = time.perf_counter()
    for i, (c, t, noisy) in enumerate(frames):
        time.sleep(max(0.0, t0 + i / fps - time.perf_counter()))
        sent[i] = time.perf_counter()
        last_sent[0] = sent[i]
        push.send_multipart(encode(Frame(noisy, channel=CHANNELS[c], t=t, frame_id=i)), copy=False)
    stream_s = time.perf_counter() - t0
    done.set()
    receiver.join(60)
    report = service.stop()
    push.close(linger=0)
    pull.close(linger=0)

    lat = np.array([lat_of(received, sent, i) for i in sorted(received)])
    steady = [i for i in received if received[i][1]["fm2s"]["status"] == "denoised"]
    rows: dict[str, list[float]] = {"raw": [], "gauss1": [], "fm2s": []}
    for i in steady[-min(len(steady), 40):]:
        gt, raw = truth[i], frames[i][2]
        rows["raw"].append(psnr(raw, gt))
        rows["gauss1"].append(psnr(ndimage.gaussian_filter(raw.astype(np.float64), 1.0), gt))
        rows["fm2s"].append(psnr(received[i][2], gt))
    summary = {
        "frames_sent": n, "frames_received": len(received), "lost": n - len(received),
        "stream_seconds": round(stream_s, 2), "fps_out": round(len(received) / max(stream_s, 1e-9), 2),
        "latency_p50_ms": round(float(np.percentile(lat, 50)), 1) if lat.size else None,
        "latency_p99_ms": round(float(np.percentile(lat, 99)), 1) if lat.size else None,
        "steady_latency_p50_ms": round(float(np.percentile([lat_of(received, sent, i) for i in steady], 50)), 1)
        if steady else None,
        "denoised_frames": len(steady),
        "psnr_last_frames": {k: round(float(np.mean(v)), 2) if v else None for k, v in rows.items()},
        "files": report["files"], "counts": report["counts"], "channels": report["channels"],
    }
    if steady:
        i = steady[-1]
        (c, t, raw), gt, den = frames[i], truth[i], received[i][2]
        lo, hi = np.percentile(gt, [0.5, 99.8])
        before_after_figure([("raw", raw), ("fm2s", den), ("truth (noise-free)", gt)], run / "before_after.png",
                            f"channel {CHANNELS[c]}, frame t={t} (frame {i} of the stream)", (float(lo), float(hi)))
    points = [(sent[i] - t0, lat_of(received, sent, i), received[i][1]["fm2s"]["status"], CHANNELS[frames[i][0]])
              for i in sorted(received)]
    latency_figure(points, run / "latency.png", options.budget_ms)
    (run / "report.json").write_text(json.dumps(summary, indent=1, default=str))
    say(format_summary(summary, run))
    return summary


def lat_of(received: dict[int, Any], sent: dict[int, float], i: int) -> float:
    """End-to-end latency of frame i in ms."""
    return (received[i][0] - sent[i]) * 1000


def format_summary(s: dict[str, Any], run: Path) -> str:
    """The human-readable end-of-demo report."""
    p = s["psnr_last_frames"]
    lines = [
        "",
        f"frames: sent {s['frames_sent']}, received {s['frames_received']}, lost {s['lost']}, "
        f"denoised by the network {s['denoised_frames']} (the rest: classical, during cold start)",
        f"throughput: {s['fps_out']} fps; latency p50 {s['latency_p50_ms']} ms, p99 {s['latency_p99_ms']} ms "
        f"(network-denoised frames: p50 {s['steady_latency_p50_ms']} ms)",
        f"PSNR vs ground truth (last network-denoised frames): raw {p['raw']} dB, "
        f"Gaussian blur {p['gauss1']} dB, fm2s {p['fm2s']} dB",
        f"written to {run}: OME-TIFF (denoised + raw), before_after.png (raw | fm2s | truth), "
        "latency.png, report.json",
    ]
    return "\n".join(lines)


def add_demo_parser(sub: Any, add_model_args: Callable[[argparse.ArgumentParser], None]) -> None:
    """Register the `demo` sub-command."""
    from .service import ServiceOptions

    d = ServiceOptions()
    p = sub.add_parser("demo", help="synthetic 2-channel camera -> ZMQ -> fm2s -> ZMQ + OME-TIFF",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--seconds", type=float, default=30.0)
    p.add_argument("--cold-start-steps", "--bootstrap-steps", dest="cold_start_steps", type=int,
                   default=d.cold_start_steps, help="cold-start steps per channel, as for serve")
    p.add_argument("--fps", type=float, default=20.0, help="camera frames per second (channels alternate)")
    p.add_argument("--size", type=int, default=512)
    p.add_argument("--out", default="fm2s-demo-output", help="a new run-NNN folder is made inside")
    p.add_argument("--budget-ms", type=float, default=d.budget_ms)
    p.add_argument("--average", type=int, default=d.average_frames, metavar="N", help="as for serve; 1 = off")
    p.add_argument("--state", default=None, metavar="DIR",
                   help="as for serve: a second demo run with the same DIR starts both channels warm")
    p.add_argument("--init", default=d.init, metavar="auto|random|generic|CHANNEL", help="as for serve")
    add_model_args(p)

    def run(args: argparse.Namespace) -> int:
        run_demo(Path(args.out), args.seconds, args.fps, args.size, args.preset, args.budget_ms,
                 args.threads, args.device, args.seed, say=lambda m: print(m, file=sys.stdout, flush=True),
                 cold_start_steps=args.cold_start_steps, average_frames=args.average,
                 state=Path(args.state) if args.state else None, init=args.init)
        return 0

    p.set_defaults(func=run)
