"""Calibration accuracy on synthetic frames with known camera noise, and the FMD reference ratio.

usage: python benchmarks/calibration.py [--data ../shared/data/fmd] [--size 512] [--draws 20]

Part 1: a grid of gains (0.5-20 ADU/e-) x read noise (1-10 e-) x offsets, at 16 bit (and 8 bit where
the range allows), white and spatially correlated noise: estimated gain and read noise (given the
offset) against the truth: per cell the bias (mean error over the noise draws), the single-frame spread
(sd) and the share of single frames within 10 %. Part 2 (with data): per FMD image, the real noise
variance at the median level next to what each paper preset injects there (the ratio that
`fm2s_stream.calibrate.REFERENCE_RATIO` summarises).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

from fm2s_stream.calibrate import estimate_noise, preset_variance
from fm2s_stream.presets import get_preset
from fm2s_stream.scaling import scaling_for
from fm2s_stream.synthetic import Camera, make_scene


def synthetic_grid(size: int, draws: int) -> int:
    """Print the grid; return the number of cells whose bias (mean error over draws) exceeds 10 %."""
    print(f"{'bits':>4s} {'gain':>6s} {'read e':>6s} {'offset':>6s} {'corr':>4s} | {'gain est':>8s} {'bias %':>6s} "
          f"{'sd %':>5s} {'<=10%':>5s} {'worst %':>7s} {'read est':>8s} {'err %':>6s} {'rho':>5s} {'ms':>6s}"
          f"   (gain est, read est, rho: first draw; bias, sd, <=10% and worst over {draws} draws)")
    biased, cells, all_errs = 0, 0, []
    scene = make_scene((size, size), np.random.default_rng(0), peak=300, background=10)
    estimate_noise(Camera().expose(np.full((64, 64), 50.0), np.random.default_rng(0)))  # compile the kernel first
    for bits, gains in ((16, (0.5, 2.0, 5.0, 20.0)), (8, (0.5, 0.8))):
        for gain in gains:
            for read in (1.0, 3.0, 10.0):
                for corr in (0.0, 0.7):
                    offset = 100.0 if bits == 16 else 10.0
                    electrons = scene * (0.5 if bits == 8 else 1.0)
                    cam = Camera(gain=gain, read_noise=read, offset=offset, bit_depth=bits, correlation=corr)
                    errs, first, ms = [], None, 0.0
                    for draw in range(draws):
                        frame = cam.expose(electrons, np.random.default_rng(100 + draw))
                        t0 = time.perf_counter()
                        est = estimate_noise(frame)
                        ms = ms or (time.perf_counter() - t0) * 1000
                        first = first or est
                        errs.append(100 * (est.a / gain - 1))
                    assert first is not None
                    e = np.array(errs)
                    all_errs.extend(errs)
                    bias = float(e.mean())
                    cells += 1
                    biased += abs(bias) > 10
                    r_est = first.read_noise_electrons(offset)
                    r_err = 100 * (r_est / read - 1)
                    print(f"{bits:4d} {gain:6.1f} {read:6.1f} {offset:6.0f} {corr:4.1f} | {first.a:8.3f} {bias:6.1f} "
                          f"{e.std():5.1f} {np.mean(np.abs(e) <= 10) * 100:4.0f}% {e[np.argmax(np.abs(e))]:7.1f} "
                          f"{r_est:8.2f} {r_err:6.1f} {first.rho:5.2f} {ms:6.2f}"
                          + ("  bias > 10 %" if abs(bias) > 10 else ""))
    errs_all = np.abs(np.array(all_errs))
    rms = np.sqrt(np.mean(errs_all**2))
    print(f"cells with a bias beyond 10 %: {biased} of {cells}; single frames within 10 %: "
          f"{np.mean(errs_all <= 10) * 100:.1f} % of {errs_all.size}; rms error {rms:.1f} %")
    return biased


def fmd_ratios(data: Path) -> None:
    print(f"\n{'image':24s} {'a':>7s} {'b':>7s} {'rho':>5s} {'real var@median':>15s} "
          + " ".join(f"{'ratio ' + p:>16s}" for p in ("confocal", "twophoton", "widefield")))
    ratios: dict[str, list[float]] = {"white": [], "correlated": []}
    for path in sorted((data / "raw").glob("*.png")):
        from PIL import Image

        frame = np.asarray(Image.open(path))
        est = estimate_noise(frame)
        sc = scaling_for(frame)
        x = (est.median_level - sc.black) / sc.span
        real = est.observed_variance(est.median_level) / sc.span**2
        own = {"Confocal": "confocal", "TwoPhoton": "twophoton", "WideField": "widefield"}[path.stem.split("_")[0]]
        row = {p: preset_variance(get_preset(p), x) / real for p in ("confocal", "twophoton", "widefield")}
        ratios["correlated" if own == "widefield" else "white"].append(row[own])
        print(f"{path.stem:24s} {est.a:7.3f} {est.b:7.2f} {est.rho:5.2f} {real:15.6f} "
              + " ".join(f"{row[p]:16.2f}" for p in row))
    for kind, values in ratios.items():
        print(f"geometric mean of each image's own-preset ratio, {kind} noise: {np.exp(np.mean(np.log(values))):.2f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=Path("../shared/data/fmd"))
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--draws", type=int, default=20, help="noise draws per grid cell")
    args = ap.parse_args()
    synthetic_grid(args.size, args.draws)
    if (args.data / "raw").is_dir():
        fmd_ratios(args.data)
    else:
        print(f"no FMD data at {args.data}; skipped part 2", file=sys.stderr)


if __name__ == "__main__":
    main()
