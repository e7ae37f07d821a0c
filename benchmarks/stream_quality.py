"""Streaming quality on FMD: each field's 4 raw exposures as a 4-frame time-lapse through the pipeline.

usage: python benchmarks/stream_quality.py --data ../shared/data/fmd [--methods stream,stream-notemporal,fast,gauss1]
       [--paper] [--threads 2] [--fps 2] [--max-steps 30] [--json out.json]

For each field (one channel per modality, its paper preset) frame 1 starts the channel's cold start;
the benchmark waits for it (reported separately as the cold-start cost), then sends frames 2-4 at
--fps (a time-lapse rate), each fine-tuned for at most --max-steps steps within its frame period.
PSNR per frame index is printed next to the single-image default (`fast`, run per frame), a Gaussian
blur and, with --paper, the reference schedule. Compute per frame is the pipeline worker's inference
plus fine-tune time for frames 2-4, against the single-image default's time per frame.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from quality import classical, load, preset_for, psnr

from fm2s_stream.channel import ChannelConfig
from fm2s_stream.frame import Frame
from fm2s_stream.offline import denoise
from fm2s_stream.pipeline import Pipeline, PipelineConfig
from fm2s_stream.presets import get_preset
from fm2s_stream.sinks import MemorySink


def stream_field(raws: list[np.ndarray], preset: str, temporal: bool, threads: int, period: float,
                 max_steps: int) -> dict[str, Any]:
    sink = MemorySink()
    cfg = PipelineConfig(ChannelConfig(get_preset(preset), temporal=temporal), threads=threads,
                         max_finetune_steps=max_steps, budget_ms=1000 * period)
    out: dict[str, Any] = {"psnr": [], "pixels": []}
    with Pipeline(cfg, sinks=[sink]) as pipe:
        t0 = time.perf_counter()
        pipe.submit(Frame(raws[0], channel=preset, t=0, frame_id=0))
        while not (pipe.channels.get(preset) and pipe.channels[preset].ready):
            time.sleep(0.01)
        out["cold_start_s"] = time.perf_counter() - t0
        c0 = dict(pipe.compute)
        for t in range(1, len(raws)):
            pipe.submit(Frame(raws[t], channel=preset, t=t, frame_id=t))
            sink.wait_for(t, timeout=600)
            time.sleep(period)  # the rest of the frame period: fine-tuning happens here
        c1 = dict(pipe.compute)
    out["compute_s_per_frame"] = sum(c1.get(k, 0) - c0.get(k, 0) for k in ("infer_s", "train_s")) / (len(raws) - 1)
    out["pixels"] = [sink.by_id[t].pixels for t in range(len(raws))]
    out["status"] = [sink.by_id[t].status for t in range(len(raws))]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=Path("../shared/data/fmd"))
    ap.add_argument("--methods", default="stream,stream-notemporal,fast,gauss1")
    ap.add_argument("--paper", action="store_true", help="also run the reference schedule (slow)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--only", default="", help="keep fields whose name contains this")
    ap.add_argument("--fps", type=float, default=2.0, help="time-lapse frame rate")
    ap.add_argument("--max-steps", type=int, default=30, help="fine-tune steps per frame at most")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    if not (args.data / "raw").is_dir():
        print(f"no data at {args.data}: nothing to benchmark", file=sys.stderr)
        raise SystemExit(0)
    torch.set_num_threads(args.threads)
    methods = args.methods.split(",") + (["paper"] if args.paper else [])
    fields = sorted({p.stem.rsplit("_", 1)[0] for p in (args.data / "raw").glob("*_4.png")})
    fields = [f for f in fields if args.only in f]
    table: list[dict[str, Any]] = []
    print(f"{'field':20s} {'method':18s} {'t=1':>6s} {'t=2':>6s} {'t=3':>6s} {'t=4':>6s} {'mean 2-4':>8s} "
          f"{'s/frame':>8s}  notes")
    for field in fields:
        raws = [load(args.data / "raw" / f"{field}_{k}.png") for k in range(1, 5)]
        gt = load(args.data / "gt" / f"{field}_1.png")
        preset = preset_for(field)
        for m in methods:
            note = ""
            if m.startswith("stream"):
                r = stream_field(raws, preset, m == "stream", args.threads, 1 / args.fps, args.max_steps)
                outs, sec = r["pixels"], r["compute_s_per_frame"]
                note = f"cold start {r['cold_start_s']:.1f} s, frame 1 {r['status'][0]}"
            else:
                outs, times = [], []
                for raw in raws:
                    t0 = time.perf_counter()
                    outs.append(denoise(raw, preset, m, device="cpu") if m in ("fast", "paper") else classical(m, raw))
                    times.append(time.perf_counter() - t0)
                sec = float(np.mean(times[1:]))
            scores = [psnr(o, gt) for o in outs]
            row = {"field": field, "method": m, "psnr": scores, "mean_t234": float(np.mean(scores[1:])),
                   "seconds_per_frame": sec, "note": note}
            table.append(row)
            print(f"{field:20s} {m:18s} " + " ".join(f"{s:6.2f}" for s in scores)
                  + f" {row['mean_t234']:8.2f} {sec:8.3f}  {note}", flush=True)
    print("\nmean over fields, frames 2-4:")
    fast_s = [r["seconds_per_frame"] for r in table if r["method"] == "fast"]
    for m in methods:
        rows = [r for r in table if r["method"] == m]
        sec = np.mean([r["seconds_per_frame"] for r in rows])
        share = f" ({100 * sec / np.mean(fast_s):.2f}% of fast's compute per frame)" if fast_s else ""
        print(f"  {m:18s} {np.mean([r['mean_t234'] for r in rows]):6.2f} dB  {sec:.3f} s/frame{share}")
    if args.json:
        args.json.write_text(json.dumps(table, indent=1))


if __name__ == "__main__":
    main()
