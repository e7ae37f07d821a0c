"""Soak: a real `fm2s-stream serve` process fed at a fixed rate for a long time; RSS and latency per interval.

usage: python benchmarks/soak.py [--minutes 30] [--fps 20] [--size 512] [--channels 1] [--threads 2]
       [--interval 60] [--save DIR] [--json out.json]

A synthetic drifting 16-bit time-lapse (one per channel) is sent over loopback PUSH; results come
back on PULL. Each row covers --interval seconds: frames sent / received, lost so far, the server's
resident memory (VmRSS, from /proc), and end-to-end latency percentiles of that interval. Flat RSS
and latency columns are the pass criterion; the last line compares the first and last rows.
"""

from __future__ import annotations

import argparse
import json
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import zmq

from fm2s_stream.demo import free_port
from fm2s_stream.synthetic import Camera, TimeLapse


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--minutes", type=float, default=30.0)
    ap.add_argument("--fps", type=float, default=20.0)
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--channels", type=int, default=1)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--interval", type=float, default=60.0)
    ap.add_argument("--save", default=None)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()

    src, pub = f"tcp://127.0.0.1:{free_port()}", f"tcp://127.0.0.1:{free_port()}"
    cmd = [sys.executable, "-m", "fm2s_stream.cli", "serve", "--source", src, "--publish", pub,
           "--threads", str(args.threads), "--status-every", "0"]
    if args.save:
        cmd += ["--save", args.save]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    ctx: zmq.Context = zmq.Context.instance()
    push, pull = ctx.socket(zmq.PUSH), ctx.socket(zmq.PULL)
    push.connect(src)
    pull.connect(pub)
    shape = (args.size, args.size)
    lapses = [TimeLapse(shape, Camera(), seed=c) for c in range(args.channels)]
    frames = [[lapse.frame(t)[0] for t in range(50)] for lapse in lapses]  # a 50-frame loop per channel
    sent: dict[int, float] = {}
    latencies: list[tuple[float, float]] = []  # (receive time, latency ms)
    received = 0
    ready: set[str] = set()
    stop = threading.Event()

    def receive() -> None:
        nonlocal received
        while not stop.is_set():
            if pull.poll(100):
                head = json.loads(pull.recv_multipart()[0])
                now = time.perf_counter()
                latencies.append((now, 1000 * (now - sent[head["frame_id"]])))
                received += 1
                if head["fm2s"]["status"] == "denoised":
                    ready.add(head["channel"])

    thread = threading.Thread(target=receive, daemon=True)
    thread.start()
    time.sleep(0.5)
    # cold start of every channel first (not part of the soak): a frame per channel every second until
    # each answers network-denoised
    fid = 0
    while len(ready) < args.channels:
        for c in range(args.channels):
            head = {"v": 1, "dtype": "<u2", "shape": list(shape), "channel": f"ch{c}", "frame_id": fid, "t": 0}
            sent[fid] = time.perf_counter()
            push.send_multipart([json.dumps(head).encode(), frames[c][0].tobytes()])
            fid += 1
        time.sleep(1.0)
    time.sleep(1.0)
    print(f"soak: {args.minutes} min at {args.fps} fps, {args.size}^2 uint16, {args.channels} channel(s), "
          f"{args.threads} threads")
    print(f"{'min':>6} {'sent':>7} {'recv':>7} {'lost':>5} {'RSS MiB':>8} {'p50 ms':>7} {'p99 ms':>7} {'max ms':>7}")
    rows = []
    t0 = time.perf_counter()
    next_row, k = t0 + args.interval, 0
    end = t0 + 60 * args.minutes
    base_recv = received
    while time.perf_counter() < end:
        time.sleep(max(0.0, t0 + k / args.fps - time.perf_counter()))
        c = k % args.channels
        head = {"v": 1, "dtype": "<u2", "shape": list(shape), "channel": f"ch{c}", "frame_id": fid,
                "t": k // args.channels}
        sent[fid] = time.perf_counter()
        push.send_multipart([json.dumps(head).encode(), frames[c][(k // args.channels) % 50].tobytes()])
        fid, k = fid + 1, k + 1
        if time.perf_counter() >= next_row:
            lat = np.array([ms for at, ms in latencies if at >= next_row - args.interval])
            row = {"minute": (next_row - t0) / 60, "sent": k, "received": received - base_recv,
                   "rss_mib": rss_mib(proc.pid),
                   "p50_ms": float(np.percentile(lat, 50)) if lat.size else None,
                   "p99_ms": float(np.percentile(lat, 99)) if lat.size else None,
                   "max_ms": float(lat.max()) if lat.size else None}
            row["lost_so_far"] = max(0, k - row["received"] - int(args.fps * 2))  # 2 s may be in flight
            rows.append(row)
            print(f"{row['minute']:>6.1f} {k:>7} {row['received']:>7} {row['lost_so_far']:>5} {row['rss_mib']:>8.1f} "
                  f"{row['p50_ms'] or 0:>7.1f} {row['p99_ms'] or 0:>7.1f} {row['max_ms'] or 0:>7.1f}")
            next_row += args.interval
    time.sleep(3)
    stop.set()
    thread.join(2)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    report = json.loads(out.decode().strip().splitlines()[-1])
    total = k
    lost = total - (received - base_recv)
    print(f"sent {total}, received {received - base_recv}, lost {lost}; server counts {report['counts']}")
    if len(rows) >= 2:
        a, b = rows[0], rows[-1]
        print(f"first -> last interval: RSS {a['rss_mib']:.1f} -> {b['rss_mib']:.1f} MiB, "
              f"p50 {a['p50_ms']:.1f} -> {b['p50_ms']:.1f} ms, p99 {a['p99_ms']:.1f} -> {b['p99_ms']:.1f} ms")
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": rows, "lost": lost, "report": report}, indent=1))
    push.close(0)
    pull.close(0)


if __name__ == "__main__":
    main()
