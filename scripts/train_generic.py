"""Train the generic starting network shipped as fm2s_stream/generic_fm2s.npz (seeded, reproducible).

FM2S's own training, run on one 1-input-channel network across many of the project's synthetic
scenes (fm2s_stream.synthetic): cells, filaments and puncta at several signal levels, cameras of
8 and 16 bits with white and spatially correlated noise. Per scene: the noise calibrated on the
frame (`auto_preset`), its pre-denoised target, a few structure steps raw -> target, then stage-2
steps of fresh noise injections of the target -> target. Takes ~1-2 min on 2 CPU cores.

    python scripts/train_generic.py [--out fm2s_stream/generic_fm2s.npz] [--scenes 36] [--steps 120]
"""

from __future__ import annotations

import argparse
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from fm2s_stream.calibrate import auto_preset
from fm2s_stream.offline import new_network
from fm2s_stream.scaling import scaling_for, to_unit
from fm2s_stream.synthetic import Camera, TimeLapse
from fm2s_stream.training import SCHEDULES, Trainer, as_batch, make_target

SEED = 20261201


def scenes(n: int, rng: np.random.Generator) -> list[np.ndarray]:
    """n noisy 256x256 frames of varied structure, signal and camera."""
    out = []
    for i in range(n):
        bits = 8 if i % 3 == 0 else 16
        cam = Camera(gain=float(rng.uniform(0.5, 6.0)) if bits == 16 else float(rng.uniform(0.8, 3.0)),
                     read_noise=float(rng.uniform(0.5, 6.0)), offset=float(rng.uniform(0, 20 if bits == 8 else 400)),
                     bit_depth=bits, correlation=float(rng.choice([0.0, 0.0, 0.6, 1.0])))
        lapse = TimeLapse((256, 256), cam, seed=int(rng.integers(1 << 30)), peak=float(rng.uniform(8, 250)),
                          cells=int(rng.integers(0, 10)), filaments=int(rng.integers(0, 80)),
                          puncta=int(rng.integers(0, 300)), psf_sigma=float(rng.uniform(0.9, 2.2)))
        out.append(lapse.frame(0)[0])
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    default = Path(__file__).resolve().parents[1] / "fm2s_stream" / "generic_fm2s.npz"
    ap.add_argument("--out", type=Path, default=default)
    ap.add_argument("--scenes", type=int, default=36)
    ap.add_argument("--steps", type=int, default=120, help="stage-2 steps per scene")
    args = ap.parse_args()
    torch.manual_seed(SEED)
    rng = np.random.default_rng(SEED)
    fast = SCHEDULES["fast"]
    device = torch.device("cpu")
    frames = scenes(args.scenes, rng)
    trainer: Trainer | None = None
    for k, frame in enumerate(frames):
        preset = replace(auto_preset(frame), n_chan=1)
        unit = to_unit(frame, scaling_for(frame))
        raw_t = as_batch(unit, device)
        target = as_batch(make_target(unit, preset, fast.target).numpy(), device)
        if trainer is None:
            trainer = Trainer(new_network(1, SEED, device), preset, device, seed=SEED)
        trainer.set_preset(preset)
        trainer.set_lr(fast.lr)
        trainer.structure_steps(raw_t, target, 2)
        lr1 = fast.lr_final if k == len(frames) - 1 else fast.lr
        _first, last = trainer.noise_steps(target, args.steps, fast.crop, fast.batch, lr_schedule=(fast.lr, lr1))
        print(f"scene {k + 1}/{len(frames)}: {frame.dtype} {preset.name}, loss {last:.5f}")
    assert trainer is not None
    state = {k: v.detach().cpu().float().contiguous().numpy() for k, v in trainer.net.state_dict().items()}
    np.savez(args.out, **state)
    print(f"wrote {args.out} ({args.out.stat().st_size} bytes, {sum(v.size for v in state.values())} weights)")


if __name__ == "__main__":
    main()
