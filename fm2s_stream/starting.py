"""Where a channel's network starts: random weights, the generic network shipped in the package, or a donor.

The generic network (`generic_fm2s.npz`, ~14 KB, float32 arrays read with `allow_pickle=False`) was
trained by `scripts/train_generic.py` on the project's own synthetic scenes across cameras, signal
levels and structures (seeded, reproducible; nothing is ever downloaded). It is a 1-input-channel
network; `expand` makes an n-channel one that computes the same function (the inverse of
`training.collapse_for_inference`).
"""

from __future__ import annotations

from importlib import resources

import numpy as np
import torch

from .model import FM2SNet

__all__ = ["GENERIC_ANSWER_STEPS", "GENERIC_FILE", "INITS", "expand", "generic_state", "load_generic"]

GENERIC_FILE = "generic_fm2s.npz"
# From the generic network, the network answers after this many cold-start steps while the rest of the
# cold start goes on. benchmarks/init_study.py (seed 0, --steps 0,5,10,20,30,50,100), PSNR dB against the
# classical answer (sigma-1 Gaussian): after 50 steps 32.80 vs 30.95 on the 12 dev FMD images (each
# image above it: confocal +0.5, two-photon +1.1 to +1.9, widefield +3.4), 27.87 vs 27.49 on the 16-bit
# correlated synthetic scene, 31.01 vs 31.41 on the 8-bit one (above it from ~100 steps); at 30 steps
# two of 14 are below it, at 0 steps most are.
GENERIC_ANSWER_STEPS = 50
INITS = ("auto", "random", "generic")  # besides a channel name (start from that channel's network)


def generic_state() -> dict[str, torch.Tensor] | None:
    """The shipped generic network's weights (1 input channel), or None if the package has none."""
    try:
        data = resources.files("fm2s_stream").joinpath(GENERIC_FILE).read_bytes()
    except (FileNotFoundError, OSError):
        return None
    import io

    with np.load(io.BytesIO(data), allow_pickle=False) as npz:
        return {k: torch.from_numpy(np.array(npz[k], dtype=np.float32)) for k in npz.files}


def expand(state: dict[str, torch.Tensor], n_chan: int) -> dict[str, torch.Tensor]:
    """A 1-channel network's weights for an n_chan network computing the same function.

    The first layer splits its weights evenly over the inputs (which FM2S feeds the same frame with
    independent noise); the last layer repeats its single output for every output channel.
    """
    if n_chan == 1:
        return dict(state)
    out = dict(state)
    first, last = "body.0.weight", "body.4.weight"
    out[first] = state[first].repeat(1, n_chan, 1, 1) / n_chan
    out[last] = state[last].repeat(n_chan, 1, 1, 1)
    out["body.4.bias"] = state["body.4.bias"].repeat(n_chan)
    return out


def load_generic(net: FM2SNet) -> bool:
    """Load the generic weights into `net` (any n_chan); False if none are shipped."""
    state = generic_state()
    if state is None:
        return False
    net.load_state_dict(expand(state, net.n_chan))
    return True
