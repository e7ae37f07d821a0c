"""Offline stacks: learn once per channel, then per plane only inference (and optional fine-tune steps).

On the dev FMD fields (4 raw exposures of one field = a 4-plane stack; ground truth: the 50-frame
average) it compares, per modality: the single-image default on every plane (`denoise`), and the
stack path (`StackDenoiser`: the same schedule once, on the representative plane) with 0 or more
fine-tune steps per plane and with fewer TTA views. PSNR on the 8-bit scale; seconds per plane
after the one cold start, and that cold start's seconds.

    python benchmarks/stack.py [--seed 0] [--quick]
"""

from __future__ import annotations

import argparse
import copy
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from fm2s_stream import denoise
from fm2s_stream.offline import STACK_TTA, StackDenoiser
from fm2s_stream.temporal import average_series

FMD = Path(__file__).resolve().parents[2] / "shared" / "data" / "fmd"
FIELDS = ("Confocal_FISH", "TwoPhoton_MICE", "WideField_BPAE_G")


def psnr(x: np.ndarray, gt: np.ndarray) -> float:
    err = np.mean((x.astype(np.float64) - gt.astype(np.float64)) ** 2)
    return float(10 * np.log10(255.0**2 / err))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quick", action="store_true", help="skip the single-image default (the slow row)")
    args = ap.parse_args()
    if not FMD.is_dir():
        print(f"no FMD data at {FMD}; nothing to measure")
        return
    torch.set_num_threads(2)
    variants = [("stack, 0 steps/plane, tta 8", 0, 8), ("stack, 50 steps/plane, tta 8", 50, 8),
                ("stack, 0 steps/plane, tta 2 (default)", 0, 2), ("stack, 0 steps/plane, tta 1", 0, 1)]
    rows: dict[str, dict[str, list[float]]] = {}
    times: dict[str, list[float]] = {}
    learn_s: list[float] = []
    for field in FIELDS:
        raw = np.stack([np.asarray(Image.open(FMD / "raw" / f"{field}_{i}.png")) for i in range(1, 5)])
        gt = [np.asarray(Image.open(FMD / "gt" / f"{field}_{i}.png")) for i in range(1, 5)]
        if not args.quick:
            t0 = time.perf_counter()
            outs = [denoise(p, seed=args.seed, device="cpu") for p in raw]
            times.setdefault("single-image default, every plane", []).append((time.perf_counter() - t0) / 4)
            rows.setdefault("single-image default, every plane", {}).setdefault(field, []).extend(
                psnr(o, g) for o, g in zip(outs, gt))
        base = StackDenoiser(seed=args.seed, device="cpu")
        t0 = time.perf_counter()
        base.learn(0, raw[1])  # a middle plane, as the CLI's representative choice would
        learn_s.append(time.perf_counter() - t0)
        for name, steps, tta in variants:
            d = copy.deepcopy(base)
            d.finetune_steps, d.tta = steps, tta
            t0 = time.perf_counter()
            outs = [d.plane(0, p) for p in raw]
            elapsed = (time.perf_counter() - t0) / 4
            times.setdefault(name, []).append(elapsed)
            rows.setdefault(name, {}).setdefault(field, []).extend(psnr(o, g) for o, g in zip(outs, gt))
            if tta != STACK_TTA or steps:
                continue
            for label, non_causal in (("causal", False), ("non-causal", True)):  # the default + time averaging
                t0 = time.perf_counter()
                avg = average_series(list(raw), outs, 8, non_causal=non_causal)
                key = f"  + {label} registered average (8)"
                times.setdefault(key, []).append(elapsed + (time.perf_counter() - t0) / 4)
                rows.setdefault(key, {}).setdefault(field, []).extend(
                    psnr(np.clip(np.rint(a), 0, 255), g) for a, g in zip(avg, gt))
    print(f"\nFMD dev fields as 4-plane stacks, seed {args.seed}; PSNR dB (8-bit) mean over the 4 planes")
    head = f"{'mode':38s}" + "".join(f"{f.split('_')[0]:>12s}" for f in FIELDS) + f"{'mean':>9s}{'s/plane':>9s}"
    print(head)
    print("-" * len(head))
    for name, per in rows.items():
        means = [float(np.mean(per[f])) for f in FIELDS]
        print(f"{name:38s}" + "".join(f"{m:12.2f}" for m in means) + f"{np.mean(means):9.2f}"
              f"{np.mean(times[name]):9.3f}")
    print(f"one cold start per channel (stack modes): {np.mean(learn_s):.1f} s")


if __name__ == "__main__":
    main()
