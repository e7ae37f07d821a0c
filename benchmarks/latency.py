"""End-to-end latency and throughput of `serve`'s pipeline over loopback ZMQ, side by side.

usage: python benchmarks/latency.py [--sizes 256,512,1024,2048] [--channels 1,2] [--fps 20] [--n 200]
       [--device cpu] [--threads 2] [--stages] [--json out.json]

For each configuration a StreamService (the one `serve` runs) is started, warmed up until every
channel has finished its cold start, then fed N synthetic uint16 frames at a fixed rate; latency is
sent -> denoised frame received. Rows with fine-tune on and off. The last column compares the
worker's compute per frame with the reference per-image FM2S schedule (2255 full-frame Adam steps,
timed here on the same frame size). With --stages, a second table gives the worker's milliseconds
per frame in each stage of the engine (transfer, scaling, inference, anchoring, registration,
averaging, quantisation, fine-tune) next to the network's arithmetic limit: its FLOPs at this size
divided by the best rate this device reaches on the network (a 256x256 tile, in cache).
"""

from __future__ import annotations

import argparse
import json
import threading
import time
from collections import defaultdict
from typing import Any

import numpy as np
import torch
import zmq

from fm2s_stream.demo import free_port
from fm2s_stream.frame import Frame
from fm2s_stream.model import FM2SNet
from fm2s_stream.presets import get_preset
from fm2s_stream.service import ServiceOptions, StreamService
from fm2s_stream.synthetic import Camera, TimeLapse
from fm2s_stream.training import SCHEDULES, collapse_for_inference
from fm2s_stream.wire import encode


def reference_seconds(size: int, n_chan: int, threads: int) -> float:
    """Seconds the paper's per-image schedule needs at this size (median of timed full-frame steps)."""
    torch.set_num_threads(threads)
    net = FM2SNet(n_chan).to(memory_format=torch.channels_last)  # type: ignore[call-overload]  # not in the stubs
    opt = torch.optim.Adam(net.parameters(), 1e-3)
    x = torch.rand(1, n_chan, size, size).contiguous(memory_format=torch.channels_last)
    times = []
    for _ in range(4 if size <= 1024 else 2):
        t = time.perf_counter()
        opt.zero_grad()
        torch.nn.functional.mse_loss(net(x), x).backward()
        opt.step()
        times.append(time.perf_counter() - t)
    return float(np.median(times[1:] if len(times) > 2 else times)) * SCHEDULES["paper"].total_steps


def network_limit_ms(size: int, device: str, threads: int) -> float:
    """Milliseconds the network's arithmetic needs at size x size at the best rate measured on this device."""
    from fm2s_stream.devices import fast_inference_dtype
    from fm2s_stream.learner import answering_copy

    torch.set_num_threads(threads)
    dev = torch.device(device)
    dtype = fast_inference_dtype(dev)
    net = answering_copy(FM2SNet(2).to(dev), dtype, dev)  # the network as the engine runs it
    # the network's own arithmetic (the CPU forms hold padded weights outside their parameters)
    one = collapse_for_inference(FM2SNet(2))
    flop_per_px = 2 * sum(p.numel() for n_, p in one.named_parameters() if n_.endswith("weight"))
    tile = 256 if dev.type == "cpu" else 2048
    x = torch.rand(1, 1, tile, tile, device=dev).to(dtype).contiguous(memory_format=torch.channels_last)
    best = float("inf")
    with torch.inference_mode():
        for _ in range(8):
            t = time.perf_counter()
            net(x)
            if dev.type == "cuda":
                torch.cuda.synchronize()
            best = min(best, time.perf_counter() - t)
    rate = flop_per_px * tile * tile / best
    return 1000 * flop_per_px * size * size / rate


def run(size: int, channels: int, finetune: bool, fps: float, n: int, device: str, threads: int,
        stages: bool = False) -> dict[str, Any]:
    cam = Camera(gain=2.0, read_noise=3.0, offset=100.0, correlation=0.6)
    lapses = [TimeLapse((size, size), cam, seed=c, peak=150) for c in range(channels)]
    distinct = [[lapse.frame(t)[0] for t in range(6)] for lapse in lapses]
    opts = ServiceOptions(source=f"tcp://127.0.0.1:{free_port()}", publish=f"tcp://127.0.0.1:{free_port()}",
                          preset="confocal", threads=threads, device=device, budget_ms=50,
                          max_finetune_steps=8 if finetune else 0, extra_channel={"time_stages": stages})
    service = StreamService(opts).start()
    ctx: zmq.Context = zmq.Context.instance()
    push, pull = ctx.socket(zmq.PUSH), ctx.socket(zmq.PULL)
    push.connect(opts.source)
    assert opts.publish
    pull.connect(opts.publish)
    got: dict[int, tuple[float, str]] = {}
    stop = threading.Event()

    def receive() -> None:
        while not stop.is_set():
            if pull.poll(50):
                head = json.loads(pull.recv_multipart()[0])
                got[head["frame_id"]] = (time.perf_counter(), head["fm2s"]["status"])

    th = threading.Thread(target=receive, daemon=True)
    th.start()
    time.sleep(0.3)
    fid = 0
    # warm-up: until every channel answers with its network (cold start done), at up to 4 frames per
    # second per channel and never more than one time point in flight (a frame is sent once the last one
    # is back), so that a slow engine (2048x2048 on 2 cores) leaves no backlog for the measured phase
    end = time.monotonic() + 180
    while (time.monotonic() < end and not all(
        m.ready for m in service.pipeline.channels.values()
    )) or len(service.pipeline.channels) < channels:
        for c in range(channels):
            push.send_multipart(encode(Frame(distinct[c][fid % 6], channel=f"c{c}", frame_id=fid)), copy=False)
            fid += 1
        time.sleep(0.25)
        while len(got) < fid and time.monotonic() < end:
            time.sleep(0.02)
    drained = time.monotonic() + 60
    while len(got) < fid and time.monotonic() < drained:
        time.sleep(0.02)
    time.sleep(1.0)  # a few fine-tune steps on the last warm-up frames, then a quiet start
    first = fid
    counts0 = dict(service.pipeline.counts)
    for ch in service.pipeline.channels.values():
        ch.clock.reset()
    compute0 = dict(service.pipeline.compute)
    sent: dict[int, float] = {}
    t0 = time.perf_counter()
    for i in range(n):
        time.sleep(max(0.0, t0 + i / fps - time.perf_counter()))
        c = i % channels
        sent[fid] = time.perf_counter()
        push.send_multipart(encode(Frame(distinct[c][i % 6], channel=f"c{c}", frame_id=fid)), copy=False)
        fid += 1
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not all(i in got for i in sent):
        time.sleep(0.02)
    elapsed = max(got[i][0] for i in sent if i in got) - t0
    stop.set()
    th.join(2)
    stage_ms: dict[str, float] = defaultdict(float)
    for ch in service.pipeline.channels.values():
        for k, v in ch.clock.mean_ms().items():
            stage_ms[k] += v / len(service.pipeline.channels)
    report = service.stop()
    push.close(0)
    pull.close(0)
    lat = np.array([(got[i][0] - sent[i]) * 1000 for i in sent if i in got])
    counts = report["counts"]
    train_steps = counts.get("train_steps", 0) - counts0.get("train_steps", 0)
    compute = sum(report["compute_s"].get(k, 0) - compute0.get(k, 0) for k in ("infer_s", "train_s")) / n
    return {
        "size": size, "channels": channels, "finetune": finetune, "fps_in": fps, "sent": n,
        "lost": sum(i not in got for i in sent), "fps_out": round(sum(i in got for i in sent) / elapsed, 2),
        "p50_ms": round(float(np.percentile(lat, 50)), 1), "p99_ms": round(float(np.percentile(lat, 99)), 1),
        "steps_per_frame": round(train_steps / n, 2),
        "skipped_finetune": counts.get("finetune_skipped", 0) - counts0.get("finetune_skipped", 0),
        "warmup_frames": first, "compute_s_per_frame": compute, "stage_ms": dict(stage_ms),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="256,512,1024,2048")
    ap.add_argument("--channels", default="1,2")
    ap.add_argument("--fps", type=float, default=20.0)
    ap.add_argument("--n", type=int, default=200)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--finetune", default="on,off")
    ap.add_argument("--big-fps", type=float, default=5.0, help="frame rate above 1024x1024 on the CPU")
    ap.add_argument("--stages", action="store_true", help="also print milliseconds per engine stage")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    devices = [args.device] + (["cuda"] if args.device == "cpu" and torch.cuda.is_available() else [])
    rows = []
    head = (f"{'device':6s} {'size':>5s} {'ch':>2s} {'tune':>4s} {'fps in':>6s} {'fps out':>7s} {'lost':>4s} "
            f"{'p50 ms':>7s} {'p99 ms':>7s} {'steps/fr':>8s} {'skipped':>7s} {'compute/frame vs paper':>23s}")
    print(head)
    for device in devices:
        for size in map(int, args.sizes.split(",")):
            ref = reference_seconds(size, get_preset("confocal").n_chan, args.threads)
            for channels in map(int, args.channels.split(",")):
                for ft in args.finetune.split(","):
                    big_cpu = size > 1024 and device == "cpu"  # 2048 on 2 cores: a short run at a few fps
                    n = max(20, args.n // 10) if big_cpu else args.n
                    fps = min(args.fps, args.big_fps) if big_cpu else args.fps
                    r = run(size, channels, ft == "on", fps, n, device, args.threads, args.stages)
                    r["device"], r["reference_s"] = device, round(ref, 1)
                    ratio = r["compute_s_per_frame"] / ref if ref else float("nan")
                    r["compute_ratio"] = ratio
                    rows.append(r)
                    print(f"{device:6s} {size:5d} {channels:2d} {ft:>4s} {fps:6.1f} {r['fps_out']:7.2f} "
                          f"{r['lost']:4d} {r['p50_ms']:7.1f} {r['p99_ms']:7.1f} {r['steps_per_frame']:8.2f} "
                          f"{r['skipped_finetune']:7d} {r['compute_s_per_frame'] * 1000:8.1f} ms = "
                          f"{100 * ratio:6.3f}%", flush=True)
    if args.stages:
        names = ["transfer", "scaling", "inference", "anchoring", "registration", "averaging", "quantisation",
                 "fine-tune step"]
        print("\nms per frame in each stage (worker), next to the network's arithmetic limit")
        print(f"{'device':6s} {'size':>5s} {'ch':>2s} " + " ".join(f"{n[:10]:>10s}" for n in names)
              + f" {'net limit':>9s}")
        limits: dict[tuple[str, int], float] = {}
        for r in rows:
            key = (r["device"], r["size"])
            if key not in limits:
                limits[key] = network_limit_ms(r["size"], r["device"], args.threads)
            r["network_limit_ms"] = limits[key]
            print(f"{r['device']:6s} {r['size']:5d} {r['channels']:2d} "
                  + " ".join(f"{r['stage_ms'].get(n, 0.0):10.1f}" for n in names) + f" {limits[key]:9.1f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
