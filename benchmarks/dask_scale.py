"""Offline stacks on Dask: planes/s in one process and on a LocalCluster of 2 workers, side by side.

A synthetic 512x512 uint16 time-lapse (OME-Zarr, in a temporary directory) is learnt once; then the
same network denoises every plane in this process (torch on all cores), and on 2 worker processes
(1 thread each) that read and write the stores themselves. From the measured per-plane cost (also at
2048x2048) and the Dask overhead per plane it estimates a 1 TB stack (2048x2048 uint16, ~120,000
planes) on a 64-worker cluster.

    python benchmarks/dask_scale.py [--planes 240]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from fm2s_stream.adapters.dask_runner import BLOCK_PLANES, run_on_dask
from fm2s_stream.adapters.files import ImageInfo
from fm2s_stream.adapters.ngff import NgffWriter, read_ngff
from fm2s_stream.offline import StackDenoiser
from fm2s_stream.synthetic import Camera, TimeLapse

TB_PLANES = 120_000  # 1 TB of 2048x2048 uint16 planes (8 MiB each)
CLUSTER = 64


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--planes", type=int, default=240)
    args = ap.parse_args()
    torch.set_num_threads(2)
    lapse = TimeLapse((512, 512), Camera(gain=2.0, read_noise=3.0, offset=100.0, bit_depth=16), seed=0,
                      drift=(0.15, 0.1))
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "in.ome.zarr"
        w = NgffWriter(src, (args.planes, 512, 512), np.dtype(np.uint16), "TYX", ImageInfo())
        for t in range(args.planes):
            w.write(lapse.frame(t)[0])
        w.finish()
        data, axes, _ = read_ngff(src)
        denoiser = StackDenoiser(device="cpu")
        t0 = time.perf_counter()
        denoiser.learn(0, np.asarray(data[args.planes // 2]))
        learn_s = time.perf_counter() - t0
        net = denoiser.trainers[0].net
        out = NgffWriter(Path(tmp) / "one.ome.zarr", data.shape, np.dtype(data.dtype), axes, ImageInfo())
        t0 = time.perf_counter()
        for t in range(args.planes):
            out.write(denoiser.plane(0, np.asarray(data[t])))
        one_s = time.perf_counter() - t0
        torch.set_num_threads(1)
        t0 = time.perf_counter()
        for t in range(min(40, args.planes)):
            denoiser.plane(0, np.asarray(data[t]))
        per_plane_1t = (time.perf_counter() - t0) / min(40, args.planes)
        big = np.tile(np.asarray(data[0]), (4, 4))
        t0 = time.perf_counter()
        for _ in range(3):
            denoiser.plane(0, big)
        per_big_1t = (time.perf_counter() - t0) / 3
        torch.set_num_threads(2)
        summary = run_on_dask(src, Path(tmp) / "two.ome.zarr", data, axes, ImageInfo(), denoiser, workers=2,
                              say=lambda _line: None)
        del net
    dask_rate = summary["planes_per_s"]
    overhead = max(0.0, 2 / dask_rate - per_plane_1t)  # worker-seconds per plane beyond the compute itself
    print(f"\n{args.planes} planes of 512x512 uint16 (synthetic), one network learnt once in {learn_s:.1f} s")
    print(f"{'run':36s}{'planes/s':>10s}{'s/plane':>10s}")
    print("-" * 56)
    print(f"{'1 process (2 torch threads)':36s}{args.planes / one_s:10.1f}{one_s / args.planes:10.4f}")
    print(f"{'Dask LocalCluster, 2 workers x 1':36s}{dask_rate:10.1f}{1 / dask_rate:10.4f}")
    print(f"per-plane compute, 1 thread: 512x512 {per_plane_1t * 1000:.1f} ms, 2048x2048 {per_big_1t * 1000:.0f} ms")
    print(f"Dask overhead (read, write, scheduling) per plane and worker: {overhead * 1000:.1f} ms "
          f"(blocks of {BLOCK_PLANES} planes)")
    big_overhead = overhead * 16  # reads and writes scale with the plane's bytes
    est = TB_PLANES * (per_big_1t + big_overhead) / CLUSTER
    print(f"estimate, 1 TB ({TB_PLANES} planes of 2048x2048) on {CLUSTER} such 1-core workers: {est / 3600:.1f} h "
          f"(+ {learn_s:.0f} s per channel to learn; overhead taken to grow with plane size, x16)")


if __name__ == "__main__":
    main()
