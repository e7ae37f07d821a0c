"""Scientific fidelity of the denoised stream: photometry, clipping, flicker, drift, transients.

usage: python benchmarks/fidelity.py [--frames 500] [--size 256] [--fps 20] [--threads 2]
       [--data ../shared/data/fmd] [--max-images 12] [--json out.json]

Scenes (synthetic, known ground truth, 16-bit camera: gain 2 ADU/e-, read noise 2 e-, offset 100,
spatially correlated noise), each streamed through the real Pipeline at --fps after its cold start:
  static      a still field for --frames frames, with the registered temporal average (default) and
              without it (--average 1): photometry per frame (worst frame), flicker, drift, PSNR;
  transient   a still field where three cells brighten by 50 % for 5 frames and one region steps up
              by 30 % for good: the fraction of each change the output shows, frame by frame;
  motion      a field drifting by (0.3, 0.2) px/frame and one panning by (2, -1.5) px/frame: PSNR with
              averaging off, on without registration, and on (the default, registered);
  bright      a 16-bit scene whose peaks reach ~60,000 ADU: clipped pixels, peak photometry;
  fmd         real FMD images (if --data exists): `fast` offline denoising, photometry vs ground
              truth and vs the raw frame.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fm2s_stream.channel import ChannelConfig
from fm2s_stream.demo import psnr
from fm2s_stream.fidelity import clipped_fraction, flicker_ratio, mean_drift, photometry, play
from fm2s_stream.pipeline import PipelineConfig
from fm2s_stream.presets import get_preset
from fm2s_stream.synthetic import Camera, TimeLapse, make_scene
from fm2s_stream.temporal import TemporalAverage

CAMERA = Camera(gain=2.0, read_noise=2.0, offset=100.0, bit_depth=16, correlation=0.7)


def config(args: argparse.Namespace, **channel: Any) -> PipelineConfig:
    return PipelineConfig(ChannelConfig(get_preset("confocal"), **channel), threads=args.threads)


def static(args: argparse.Namespace, average: int) -> dict[str, Any]:
    rng = np.random.default_rng(1)
    electrons = make_scene((args.size, args.size), rng, peak=60, background=3)
    truth = CAMERA.ideal(electrons)
    raws = [CAMERA.expose(electrons, rng) for _ in range(args.frames)]
    results = play(raws, config(args, average_frames=average), args.fps)
    den = [r.pixels for r in results if r.status == "denoised"]
    raw = [raws[i] for i, r in enumerate(results) if r.status == "denoised"]
    worst: dict[str, dict[str, float]] = {}
    for d in den:
        for region, errs in photometry(d, truth, CAMERA.offset).items():
            w = worst.setdefault(region, {"adu": 0.0, "signal": 0.0})
            for k, v in errs.items():
                w[k] = max(w[k], abs(v), key=abs)
    settle = min(10, len(den) // 4)
    return {
        "frames": len(den), "worst_photometry": worst,
        "mean_photometry": photometry(np.mean(den, axis=0), truth, CAMERA.offset),
        "raw_mean_vs_denoised": float(np.mean(den) / np.mean(raw) - 1),
        "flicker": flicker_ratio(den[settle:], raw[settle:]),
        "drift_signal": mean_drift(den, CAMERA.offset), "drift_raw": mean_drift(raw, CAMERA.offset),
        "psnr_raw": psnr(raw[-1], truth), "psnr_last": psnr(den[-1], truth),
        "clipped": max(clipped_fraction(d) for d in den),
        "frames_averaged": float(np.mean([r.averaged for r in results[settle:]])),
    }


def transient(args: argparse.Namespace) -> dict[str, Any]:
    rng = np.random.default_rng(2)
    shape = (args.size, args.size)
    base = make_scene(shape, rng, peak=60, background=3, cells=0, filaments=10, puncta=40)
    yy, xx = np.mgrid[0 : shape[0], 0 : shape[1]]
    cells = [np.hypot(yy - cy, xx - cx) < 10 for cy, cx in ((60, 60), (60, 190), (190, 60))]
    for c in cells:
        base = base + 30.0 * c  # cells of 30 e- on the background
    step = (yy > 170) & (xx > 170)
    n = 160
    pulse = range(60, 65)
    truths, raws = [], []
    for t in range(n):
        e = base.copy()
        if t in pulse:
            for c in cells:
                e[c] *= 1.5
        if t >= 100:
            e[step] *= 1.3
        truths.append(CAMERA.ideal(e))
        raws.append(CAMERA.expose(e, rng))
    out: dict[str, Any] = {}
    mask = np.logical_or.reduce(cells)
    runs = {}
    for average in (8, 1):
        runs[f"average {average}"] = [r.pixels.astype(float) for r in play(raws, config(args, average_frames=average),
                                                                          args.fps)]
    # the averaging stage alone: the same network outputs (of the `average 1` run), averaged afterwards,
    # so the network's own run-to-run differences do not blur the comparison
    avg = TemporalAverage(8)
    tensor = lambda a: torch.from_numpy(np.asarray(a, np.float32))  # noqa: E731
    runs["average 8 on the average-1 outputs"] = [avg.apply(tensor(r), tensor(d))[0].numpy().astype(float)
                                                  for r, d in zip(raws, runs["average 1"])]
    for label, px in runs.items():

        def shown(t: int, m: np.ndarray, before: int, px: list[np.ndarray] = px) -> float:
            gain = truths[t][m].mean() - truths[before][m].mean()
            return float((px[t][m].mean() - px[before][m].mean()) / gain)

        out[label] = {
            "pulse_shown": [shown(t, mask, 55) for t in pulse],
            "step_shown": [shown(t, step, 95) for t in range(100, 104)],
            "after_pulse": float((px[70][mask].mean() - truths[70][mask].mean())
                                 / (truths[60][mask].mean() - truths[55][mask].mean())),
        }
    return out


def moving(args: argparse.Namespace) -> dict[str, Any]:
    """PSNR of a drifting and of a panning field, averaging off / on without registration / on."""
    out: dict[str, Any] = {}
    for label, drift in (("drift 0.3, 0.2 px/frame", (0.3, 0.2)), ("pan 2, -1.5 px/frame", (2.0, -1.5))):
        lapse = TimeLapse((args.size, args.size), CAMERA, seed=4, drift=drift, peak=60, background=3, margin=96)
        shots = [lapse.frame(t) for t in range(120)]
        raws = [s[0] for s in shots]
        row = {"raw": float(np.mean([psnr(r, t) for r, t in shots[20:]]))}
        for name, kw in (("average 1", {"average_frames": 1}),
                         ("average 8, unregistered", {"average_frames": 8, "average_registration": False}),
                         ("average 8", {"average_frames": 8})):
            results = play(raws, config(args, **kw), args.fps)
            row[name] = float(np.mean([psnr(r.pixels, t) for r, (_, t) in zip(results[20:], shots[20:])]))
        out[label] = row
    return out


def bright(args: argparse.Namespace) -> dict[str, Any]:
    rng = np.random.default_rng(3)
    cam = Camera(gain=100.0, read_noise=2.0, offset=100.0, bit_depth=16)
    electrons = make_scene((args.size, args.size), rng, peak=600, background=20)
    truth = cam.ideal(electrons)
    raws = [cam.expose(electrons, rng) for _ in range(60)]
    results = play(raws, config(args), args.fps)
    den = [r.pixels for r in results if r.status == "denoised"]
    top = truth >= np.percentile(truth, 99.9)
    return {
        "max_truth": float(truth.max()), "max_denoised": int(max(d.max() for d in den)),
        "clipped_raw": max(clipped_fraction(r) for r in raws),
        "clipped_denoised": max(clipped_fraction(d) for d in den),
        "peak_photometry": float(np.mean([d[top].mean() for d in den]) / truth[top].mean() - 1),
        "photometry": photometry(np.mean(den, axis=0), truth, cam.offset),
    }


def fmd(args: argparse.Namespace) -> list[dict[str, Any]]:
    sys.path.insert(0, str(Path(__file__).parent))
    from quality import load, pairs, preset_for

    from fm2s_stream.offline import denoise

    rows = []
    for name, raw_path, gt_path in pairs(Path(args.data))[: args.max_images]:
        raw, gt = load(raw_path), load(gt_path)
        out = denoise(raw, preset=preset_for(name), method="fast", seed=0)
        ph = photometry(out, gt)
        rows.append({"image": name, **{f"{k}_vs_gt": v["adu"] for k, v in ph.items()},
                     "vs_raw": float(out.astype(float).mean() / raw.astype(float).mean() - 1),
                     "gt_vs_raw": float(gt.astype(float).mean() / raw.astype(float).mean() - 1)})
    return rows


def pct(x: float) -> str:
    return f"{100 * x:+.2f}%"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--frames", type=int, default=500)
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--fps", type=float, default=20.0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--data", default="../shared/data/fmd")
    ap.add_argument("--max-images", type=int, default=12)
    ap.add_argument("--only", default="static,transient,motion,bright,fmd")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    only = set(args.only.split(","))
    report: dict[str, Any] = {}
    if "static" in only:
        print(f"static field, {args.frames} frames of {args.size}^2 uint16 at {args.fps} fps (photometry: worst frame)")
        print(f"{'average':>8} {'all adu':>8} {'bright':>8} {'dark':>8} {'all sig':>8} {'brt sig':>8} {'drk sig':>8} "
              f"{'flicker':>8} {'drift':>8} {'raw dr':>8} {'clip':>6} {'n avg':>6} {'PSNR raw/out':>13}")
        for average in (8, 1):
            r = report[f"static average {average}"] = static(args, average)
            w = r["worst_photometry"]
            print(f"{average:>8} {pct(w['all']['adu']):>8} {pct(w['bright']['adu']):>8} {pct(w['dark']['adu']):>8} "
                  f"{pct(w['all']['signal']):>8} {pct(w['bright']['signal']):>8} {pct(w['dark']['signal']):>8} "
                  f"{r['flicker']:>8.3f} {pct(r['drift_signal']):>8} {pct(r['drift_raw']):>8} {r['clipped']:>6.4f} "
                  f"{r['frames_averaged']:>6.2f} {r['psnr_raw']:>6.2f}/{r['psnr_last']:.2f}")
    if "transient" in only:
        r = report["transient"] = transient(args)
        print("\ntransients (fraction of the true change the output shows; 1.0 = all of it)")
        for k, v in r.items():
            print(f"  {k}: pulse frames 60-64 {' '.join(f'{x:.2f}' for x in v['pulse_shown'])}; "
                  f"step frames 100-103 {' '.join(f'{x:.2f}' for x in v['step_shown'])}; "
                  f"5 frames after the pulse {v['after_pulse']:+.2f}")
    if "motion" in only:
        r = report["motion"] = moving(args)
        print(f"\nmoving field, {args.size}^2, 120 frames at {args.fps} fps: PSNR (dB) of frames 20-119")
        cols = list(next(iter(r.values())))
        print(f"{'scene':<24}" + "".join(f"{c:>25}" for c in cols))
        for label, row in r.items():
            print(f"{label:<24}" + "".join(f"{row[c]:>25.2f}" for c in cols))
    if "bright" in only:
        r = report["bright"] = bright(args)
        print(f"\nbright 16-bit scene: max truth {r['max_truth']:.0f} ADU, max denoised {r['max_denoised']}, "
              f"clipped raw {r['clipped_raw']:.5f} denoised {r['clipped_denoised']:.5f}, "
              f"top 0.1% pixels {pct(r['peak_photometry'])}, "
              f"bright quarter {pct(r['photometry']['bright']['adu'])}")
    if "fmd" in only and Path(args.data).is_dir():
        rows = report["fmd"] = fmd(args)
        print("\nFMD (fast, offline): mean intensity error, camera units")
        print(f"{'image':<22} {'all vs gt':>9} {'bright':>8} {'dark':>8} {'vs raw':>8} {'gt vs raw':>9}")
        for row in rows:
            print(f"{row['image']:<22} {pct(row['all_vs_gt']):>9} {pct(row['bright_vs_gt']):>8} "
                  f"{pct(row['dark_vs_gt']):>8} {pct(row['vs_raw']):>8} {pct(row['gt_vs_raw']):>9}")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
