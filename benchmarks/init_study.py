"""Where should a new channel's network start? PSNR after a cold start of S steps, per starting point.

Starting points: random weights (the engine before), the generic network shipped in the package
(`fm2s_stream/starting.py`, made by scripts/train_generic.py), and a donor: another channel's fully
trained network (here: trained on an image of another modality). Each cold start is the stream's
schedule shortened to S steps (`learner.cold_start_schedule`), on the 12 dev FMD images and 2
synthetic scenes, then the offline inference (TTA 8) and anchoring. PSNR dB on the 8-bit scale
(synthetic: on the scaled [0, 255] range of the truth).

    python benchmarks/init_study.py [--seed 0] [--steps 0,50,100,200,400,905] [--inits random,generic,donor]

The last row, "classical", is what the stream answers with until its network may answer: the
sigma-1 Gaussian of the frame (no steps).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from fm2s_stream.anchor import anchor
from fm2s_stream.calibrate import auto_preset
from fm2s_stream.learner import cold_start_schedule
from fm2s_stream.offline import ANCHOR_SIGMA, new_network
from fm2s_stream.ops import gaussian
from fm2s_stream.scaling import from_unit, scaling_for, to_unit
from fm2s_stream.starting import expand, generic_state
from fm2s_stream.synthetic import Camera, TimeLapse
from fm2s_stream.training import Trainer, as_batch, collapse_for_inference, infer, make_target

FMD = Path(__file__).resolve().parents[2] / "shared" / "data" / "fmd"
MODALITIES = ("Confocal_FISH", "TwoPhoton_MICE", "WideField_BPAE_G")
CPU = torch.device("cpu")


def psnr(x: np.ndarray, gt: np.ndarray, to8: tuple[float, float] = (0.0, 1.0)) -> float:
    lo, scale = to8
    err = np.mean(((x.astype(np.float64) - lo) * scale - (gt.astype(np.float64) - lo) * scale) ** 2)
    return float(10 * np.log10(255.0**2 / err))


def images(which: str) -> list[tuple[str, np.ndarray, np.ndarray, tuple[float, float]]]:
    """(name, raw, truth, (offset, scale) that put both on the 8-bit scale)."""
    out = []
    if FMD.is_dir() and which in ("all", "fmd"):
        for m in MODALITIES:
            for i in range(1, 5):
                raw = np.asarray(Image.open(FMD / "raw" / f"{m}_{i}.png"))
                gt = np.asarray(Image.open(FMD / "gt" / f"{m}_{i}.png"))
                out.append((f"{m}_{i}", raw, gt, (0.0, 1.0)))
    if which == "fmd":
        return out
    for k, cam in enumerate((Camera(gain=2.0, read_noise=3.0, offset=100.0, bit_depth=16, correlation=0.6),
                             Camera(gain=1.5, read_noise=2.0, offset=5.0, bit_depth=8))):
        noisy, truth = TimeLapse((512, 512), cam, seed=100 + k, peak=60.0).frame(0)
        lo, hi = float(truth.min()), float(truth.max())
        out.append((f"synthetic_{k}", noisy, truth, (lo, 255.0 / max(hi - lo, 1e-9))))
    return out


def run(raw: np.ndarray, init: dict[str, torch.Tensor] | None, steps: int, seed: int) -> np.ndarray:
    preset = auto_preset(raw)
    scaling = scaling_for(raw)
    unit = to_unit(raw, scaling)
    net = new_network(preset.n_chan, seed, CPU)
    if init is not None:
        net.load_state_dict(expand(init, preset.n_chan))
    raw_t = as_batch(unit, CPU)
    if steps:
        sched = cold_start_schedule(steps)
        target = as_batch(make_target(unit, preset, sched.target).numpy(), CPU)
        Trainer(net, preset, CPU, seed=seed).fit(raw_t, target, sched)
    den = infer(net, raw_t, 8)[0, 0].float().numpy()
    return from_unit(anchor(den, unit, ANCHOR_SIGMA).numpy(), scaling, raw.dtype)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--steps", default="0,50,100,200,400,905")
    ap.add_argument("--images", default="all", choices=["all", "fmd", "synthetic"])
    ap.add_argument("--inits", default="random,generic,donor", help="starting points to compare")
    args = ap.parse_args()
    torch.set_num_threads(2)
    steps = [int(s) for s in args.steps.split(",")]
    generic = generic_state()
    data = images(args.images)
    # donors: a fully trained network of another modality's first image (collapsed to one input channel)
    donors: dict[str, dict[str, torch.Tensor]] = {}
    donor_images = images("fmd") if args.images == "synthetic" else data
    wanted = args.inits.split(",")
    for m in MODALITIES if "donor" in wanted else ():
        for name, raw, _gt, _to8 in donor_images:
            if name == f"{m}_1":
                preset = auto_preset(raw)
                unit = to_unit(raw, scaling_for(raw))
                net = new_network(preset.n_chan, args.seed, CPU)
                sched = cold_start_schedule(905)
                Trainer(net, preset, CPU, seed=args.seed).fit(
                    as_batch(unit, CPU), as_batch(make_target(unit, preset, sched.target).numpy(), CPU), sched)
                donors[m] = collapse_for_inference(net).state_dict()
    inits = [i for i in ("random", "generic") if i in wanted] + (["donor"] if donors else [])
    classical: list[float] = []
    table: dict[str, dict[int, list[float]]] = {i: {s: [] for s in steps} for i in inits}
    t0 = time.perf_counter()
    for name, raw, gt, to8 in data:
        modality = next((m for m in MODALITIES if name.startswith(m)), None)
        donor_of = MODALITIES[(MODALITIES.index(modality) + 1) % 3] if modality else MODALITIES[0]
        row = []
        for init in inits:
            weights = None if init == "random" else generic if init == "generic" else donors.get(donor_of)
            for s in steps:
                value = psnr(run(raw, weights, s, args.seed), gt, to8)
                table[init][s].append(value)
                row.append(value)
        scaling = scaling_for(raw)
        blur = gaussian(torch.from_numpy(to_unit(raw, scaling)), 1.0).numpy()
        classical.append(psnr(from_unit(blur, scaling, raw.dtype), gt, to8))
        row.append(classical[-1])
        print(f"{name:20s} " + " ".join(f"{v:6.2f}" for v in row) + f"   ({time.perf_counter() - t0:.0f} s)",
              flush=True)
    print(f"\nmean PSNR dB over {len(data)} images ({args.images}), seed {args.seed}, by cold-start steps")
    print(f"{'start':10s}" + "".join(f"{s:>8d}" for s in steps))
    for init in inits:
        print(f"{init:10s}" + "".join(f"{np.mean(table[init][s]):8.2f}" for s in steps))
    print(f"{'classical':10s}{np.mean(classical):8.2f} (sigma-1 Gaussian, the cold start's answer)")
    n_fmd = sum(1 for d in data if not d[0].startswith("synthetic"))
    if 0 < n_fmd < len(data):
        print(f"\nFMD only ({n_fmd} images)")
        for init in inits:
            print(f"{init:10s}" + "".join(f"{np.mean(table[init][s][:n_fmd]):8.2f}" for s in steps))
        print(f"{'classical':10s}{np.mean(classical[:n_fmd]):8.2f}")


if __name__ == "__main__":
    main()
