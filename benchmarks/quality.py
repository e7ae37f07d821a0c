"""Quality benchmark on real data with ground truth: PSNR/SSIM and time per image, side by side.

usage: python benchmarks/quality.py --data ../shared/data/fmd [--methods raw,median3,median5,gauss1,paper,fast]
       [--max-images N] [--only SUBSTR] [--seeds N] [--first-seed 0] [--json out.json] [--fast KEY=VALUE,...]
       e.g. --methods gauss1,auto,bm3d-oracle,bm3d-cal --seeds 3 (the default against BM3D, pip install ".[bench]")

Methods: raw, median3, median5, gauss1 (classical); paper, fast (FM2S schedules, each image's paper
preset); auto (fast, noise calibrated on the image: the default); net (the default without its
block-matched prior: the network alone); blockmatch (that prior alone: our own BM3D-class filter in the
stabilised domain of the calibrated law, `fm2s_stream.blockmatch`; the raw frame where it declines);
fast16 / auto16 (the image as a 16-bit camera would give it: x64 + offset 400 + read noise 16 ADU,
denoised, mapped back to 8-bit levels).
`--fast` overrides fields of the fast schedule (e.g. `rounds=300,target=median`) for experiments.
Every method runs on the same images in one process, so timings compare on the same machine state.

The classical competitor is BM3D given the right noise model (PyPI `bm3d`, non-commercial licence:
`pip install ".[bench]"`, never a runtime dependency), in the two recipes of ../shared/FINDINGS.md:
- `bm3d-gat-*`: generalized Anscombe transform with the Poisson-Gaussian law var = a * level + b,
  BM3D at sigma 1 in the transformed domain, asymptotically unbiased inverse (confocal, two-photon);
- `bm3d-psd-*`: BM3D with the noise's power spectrum (spatially correlated noise: widefield);
- `bm3d-*` (no recipe named): the modality's recipe (widefield: psd, else gat).
`*-oracle` fits the noise law from the raw - ground-truth residual (an upper bound for BM3D);
`*-cal` takes it from our own single-frame `calibrate` (a, b, and the lag-1 correlation rho, whose
separable AR(1) spectrum stands in for the measured one): what a user could run.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from scipy import ndimage

from fm2s_stream.offline import denoise
from fm2s_stream.training import SCHEDULES, Schedule


def load(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path))


def psnr(x: np.ndarray, gt: np.ndarray, peak: float = 255.0) -> float:
    err = np.mean((x.astype(np.float64) - gt.astype(np.float64)) ** 2)
    return float(10 * np.log10(peak * peak / err))


def ssim(x: np.ndarray, gt: np.ndarray, peak: float = 255.0) -> float:
    """Gaussian-window SSIM (sigma 1.5), as in Wang et al. 2004."""
    a, b = x.astype(np.float64), gt.astype(np.float64)
    f = lambda v: ndimage.gaussian_filter(v, 1.5, truncate=3.5)  # noqa: E731
    mu_a, mu_b = f(a), f(b)
    va, vb, cov = f(a * a) - mu_a**2, f(b * b) - mu_b**2, f(a * b) - mu_a * mu_b
    c1, c2 = (0.01 * peak) ** 2, (0.03 * peak) ** 2
    s = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a**2 + mu_b**2 + c1) * (va + vb + c2))
    return float(s.mean())


SCALE16, OFFSET16, READ16 = 64.0, 400.0, 16.0  # 16-bit version: ADU = 64 x 8-bit level + 400 + N(0, 16)


def to16(raw: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A 16-bit version of an 8-bit frame: scaled, with a camera offset and extra read noise."""
    adu = raw.astype(np.float64) * SCALE16 + OFFSET16 + rng.normal(0.0, READ16, raw.shape)
    return np.clip(np.rint(adu), 0, 65535).astype(np.uint16)


def preset_for(name: str) -> str:
    low = name.lower()
    for key, preset in (("confocal", "confocal"), ("twophoton", "twophoton"), ("widefield", "widefield")):
        if low.startswith(key):
            return preset
    return "srdtrans"


def oracle_law(raw: np.ndarray, gt: np.ndarray, bins: int = 16) -> tuple[float, float]:
    """(a, b) of var(raw - gt) = a * gt + b, fitted over quantile bins of gt (8-bit units)."""
    r, g = raw.astype(np.float64).ravel(), gt.astype(np.float64).ravel()
    edges = np.unique(np.quantile(g, np.linspace(0, 1, bins + 1)))
    idx = np.clip(np.searchsorted(edges, g, side="right") - 1, 0, len(edges) - 2)
    levels, variances, weights = [], [], []
    for k in range(len(edges) - 1):
        sel = idx == k
        if sel.sum() > 100:
            levels.append(g[sel].mean())
            variances.append((r[sel] - g[sel]).var())
            weights.append(sel.sum())
    a, b = np.polyfit(levels, variances, 1, w=np.sqrt(weights))
    return max(float(a), 1e-6), float(b)


def oracle_psd(raw: np.ndarray, gt: np.ndarray) -> np.ndarray:
    """bm3d's sigma_psd of the residual: |FFT2|^2 of the zero-mean (raw - gt) / 255, 9x9-smoothed (wrap)."""
    n = (raw.astype(np.float64) - gt.astype(np.float64)) / 255.0
    return ndimage.uniform_filter(np.abs(np.fft.fft2(n - n.mean())) ** 2, 9, mode="wrap")


def calibrated_psd(shape: tuple[int, int], variance: float, rho: float) -> np.ndarray:
    """The same array from a variance and a lag-1 correlation: a separable AR(1) spectrum (mean 1) x N x var."""
    def ar1(n: int) -> np.ndarray:
        f = np.fft.fftfreq(n)
        return (1 - rho**2) / (1 - 2 * rho * np.cos(2 * np.pi * f) + rho**2)
    return shape[0] * shape[1] * variance * np.outer(ar1(shape[0]), ar1(shape[1]))


def bm3d_gat(raw: np.ndarray, a: float, b: float) -> np.ndarray:
    """BM3D in the generalized Anscombe domain of var = a * level + b (8-bit levels), inverted back."""
    import bm3d

    from fm2s_stream.blockmatch import stabilize, unstabilize

    d = stabilize(raw, a, b)
    lo, span = d.min(), max(d.max() - d.min(), 1e-9)
    d_hat = np.asarray(bm3d.bm3d((d - lo) / span, sigma_psd=1.0 / span)) * span + lo
    return np.maximum(unstabilize(d_hat, a, b), 0.0)


def bm3d_psd(raw: np.ndarray, psd: np.ndarray) -> np.ndarray:
    """BM3D of raw / 255 with the noise power spectrum `psd` (bm3d's convention), back to 8-bit levels."""
    import bm3d

    return np.asarray(bm3d.bm3d(raw.astype(np.float64) / 255.0, sigma_psd=psd)) * 255.0


def bm3d_method(method: str, raw: np.ndarray, gt: np.ndarray, preset: str) -> np.ndarray:
    """One BM3D recipe (`bm3d-[gat|psd-]oracle|cal`) on an 8-bit frame."""
    parts = method.split("-")
    recipe = parts[1] if len(parts) == 3 else "psd" if preset == "widefield" else "gat"
    if parts[-1] == "oracle":
        a, b = oracle_law(raw, gt)
        psd = oracle_psd(raw, gt)
    else:
        from fm2s_stream.calibrate import estimate_noise

        est = estimate_noise(raw)
        a, b = max(est.a, 1e-6), est.b
        mean_var = float(np.mean(np.maximum(a * raw.astype(np.float64) + b, 1e-6))) / 255.0**2
        psd = calibrated_psd(raw.shape, mean_var, est.rho)
    out = bm3d_gat(raw, a, b) if recipe == "gat" else bm3d_psd(raw, psd)
    return np.clip(out, 0, 255)


def classical(method: str, raw: np.ndarray) -> np.ndarray:
    f = raw.astype(np.float64)
    if method == "raw":
        return raw
    if method.startswith("median"):
        return ndimage.median_filter(raw, size=int(method[6:]))
    if method == "gauss1":
        return np.clip(np.rint(ndimage.gaussian_filter(f, 1.0)), 0, 255).astype(raw.dtype)
    raise ValueError(method)


def pairs(data: Path) -> list[tuple[str, Path, Path]]:
    if (data / "raw").is_dir():
        raw_dir, gt_dir = data / "raw", data / "gt"
    else:
        raw_dir, gt_dir = data / "noisy", data / "gt"
    out = []
    for r in sorted(raw_dir.glob("*.png")):
        g = gt_dir / r.name
        if g.exists():
            out.append((r.stem, r, g))
    return out


def parse_overrides(text: str) -> dict[str, Any]:
    fields = {f.name: f.type for f in dataclasses.fields(SCHEDULES["fast"])}
    out: dict[str, Any] = {}
    for item in filter(None, text.split(",")):
        key, value = item.split("=")
        if key not in fields:
            raise SystemExit(f"unknown schedule field {key!r}")
        current = getattr(SCHEDULES["fast"], key)
        if isinstance(current, bool):
            out[key] = value.lower() in ("1", "true", "yes")
        elif isinstance(current, str):
            out[key] = value
        else:
            out[key] = None if value == "None" else type(current or 0)(value)
    return out


def run_method(m: str, raw: np.ndarray, preset: str, fast: Schedule, seed: int, gt: np.ndarray) -> np.ndarray:
    """One method's output for one image, on the 8-bit scale of `raw` (`gt` only for the oracle recipes)."""
    if m.startswith("bm3d"):
        return bm3d_method(m, raw, gt, preset)
    if m in ("paper", "fast"):  # the paper's schedule as published: no photometric anchoring
        return denoise(raw, preset, fast if m == "fast" else "paper", device="cpu", seed=seed,
                       anchor_sigma=16.0 if m == "fast" else 0.0)
    if m == "auto":
        return denoise(raw, "auto", fast, device="cpu", seed=seed)
    if m == "net":
        alone = dataclasses.replace(fast, prior_weight=0.0)
        return denoise(raw, "auto", alone, device="cpu", seed=seed)
    if m == "blockmatch":
        from fm2s_stream.blockmatch import block_matched
        from fm2s_stream.calibrate import estimate_noise

        est = estimate_noise(raw)
        prior = block_matched(raw, est.a, est.b, est.rho)
        if prior.estimate is None:
            print(f"  blockmatch declined: {prior.reason}", file=sys.stderr)
            return raw
        return np.clip(prior.estimate, 0, 255)
    if m in ("fast16", "auto16"):  # the same frame as a 16-bit camera would give it
        raw16 = to16(raw, np.random.default_rng(seed))
        out16 = denoise(raw16, "auto" if m == "auto16" else preset, fast, device="cpu", seed=seed)
        return (out16.astype(np.float64) - OFFSET16) / SCALE16
    return classical(m, raw)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=Path("../shared/data/fmd"))
    ap.add_argument("--methods", default="raw,median3,median5,gauss1,fast")
    ap.add_argument("--max-images", type=int, default=0)
    ap.add_argument("--only", default="", help="keep images whose name contains this")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--fast", default="", help="override fast-schedule fields, e.g. rounds=300")
    ap.add_argument("--preset", default="", help="force one preset for all images")
    ap.add_argument("--seeds", type=int, default=1,
                    help="run each FM2S method with seeds 0..N-1 and report the mean (one run is +-0.2 dB per image)")
    ap.add_argument("--first-seed", type=int, default=0, help="seeds start here (the authors' is 3407)")
    args = ap.parse_args()
    if not args.data.is_dir():
        print(f"no data at {args.data}: nothing to benchmark", file=sys.stderr)
        raise SystemExit(0)
    torch.set_num_threads(args.threads)
    methods = args.methods.split(",")
    if any(m.startswith("bm3d") for m in methods):
        if not hasattr(np, "trapz"):  # bm4d 4.x (under bm3d) calls np.trapz, which numpy 2 removed
            np.trapz = np.trapezoid  # type: ignore[attr-defined]
        try:
            import bm3d  # noqa: F401
        except ImportError:
            print("bm3d is not installed (pip install '.[bench]'); leaving out the BM3D methods", file=sys.stderr)
            methods = [m for m in methods if not m.startswith("bm3d")]
    fast = dataclasses.replace(SCHEDULES["fast"], **parse_overrides(args.fast))
    images = [p for p in pairs(args.data) if args.only in p[0]]
    if args.max_images:
        images = images[: args.max_images]
    rows: list[dict[str, object]] = []
    head = " ".join(f"{m:>19s}" for m in methods)
    print(f"{'image':24s} {head}   (PSNR dB [+- half range over seeds] / seconds)")
    for name, rp, gp in images:
        raw, gt = load(rp), load(gp)
        preset = args.preset or preset_for(name)
        cells = []
        for m in methods:
            runs = []
            n_seeds = args.seeds if m in ("paper", "fast", "auto", "net", "fast16", "auto16") else 1
            for seed in range(args.first_seed, args.first_seed + n_seeds):
                t0 = time.perf_counter()
                out = run_method(m, raw, preset, fast, seed, gt)
                runs.append((psnr(out, gt), ssim(out, gt), time.perf_counter() - t0))
            p, s, dt = (float(np.mean(v)) for v in zip(*runs))
            row = {"image": name, "method": m, "preset": preset, "psnr": p, "ssim": s, "seconds": dt,
                   "psnr_runs": [r[0] for r in runs]}
            rows.append(row)
            spread = f"+-{(max(r[0] for r in runs) - min(r[0] for r in runs)) / 2:.2f}" if len(runs) > 1 else ""
            cells.append(f"{p:6.2f}{spread}/{dt:5.1f}s")
        print(f"{name:24s} " + " ".join(f"{c:>19s}" for c in cells), flush=True)
    print("\nmean PSNR / SSIM by group")
    def group_of(image: object) -> str:
        return str(image).rsplit("_", 1)[0] if "_" in str(image) else ""

    groups = sorted({group_of(r["image"]) for r in rows} - {""})  # images without a modality: the mean only
    for m in methods:
        line = []
        for g in [*groups, ""]:
            sel = [r for r in rows if r["method"] == m and (not g or group_of(r["image"]) == g)]
            line.append(f"{np.mean([r['psnr'] for r in sel]):6.2f}/{np.mean([r['ssim'] for r in sel]):.3f}")
        print(f"{m:10s} " + "  ".join(f"{(g or 'mean')[:18]:>18s} {c}" for g, c in zip([*groups, ""], line)))
    if args.json:
        args.json.write_text(json.dumps({"schedule_fast": dataclasses.asdict(fast), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
