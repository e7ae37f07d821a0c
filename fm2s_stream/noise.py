"""FM2S noise injection: tile-adaptive Poisson-Gaussian noise followed by a global Poisson pass.

Per tile of `stride` x `stride` pixels, with m = clamp(tile mean, 1e-5, 0.15): Poisson noise with
gain k_p/m (weaker in bright tiles), then Gaussian noise of std k_g*m/255 (stronger in bright
tiles), clamp to [0, 1]; then Poisson noise of level lambda_p over the whole image and clamp again.
A preset with rho > 0 (a camera whose noise correlates neighbours, e.g. widefield) then correlates
the injected noise the same way, so the network learns to remove the noise it will meet.
Vectorised over a batch, on whatever device the input lives; randomness only from `generator`.
On the CPU the Poisson draws come from `poisson`'s parallel sampler (torch's is serial: 55 ns a
draw, a fifth of a training step on two cores); the paper schedule keeps torch's.
"""

from __future__ import annotations

import math

import numba
import numpy as np
import torch
import torch.nn.functional as F

from .ops import host_kernels, to_host
from .presets import MAX_RHO, Preset

__all__ = ["M_MAX", "M_MIN", "POISSON_SAMPLERS", "NoiseInjector", "box_mean_variance", "correlate",
           "correlation_taps", "inject_noise", "poisson", "tile_means"]

M_MIN, M_MAX = 1e-5, 0.15


def tile_means(x: torch.Tensor, stride: int, pad: str = "replicate") -> torch.Tensor:
    """Per-pixel map of the clamped mean of the stride x stride tile each pixel falls in.

    `x` is (N, C, H, W); the image is padded right and bottom to a multiple of `stride`, by edge
    replication ("replicate") or with zeros ("zeros": the authors' code, whose border tiles then
    count the zeros in their mean).
    """
    h, w = x.shape[-2:]
    ph, pw = -h % stride, -w % stride
    if pad not in ("replicate", "zeros"):
        raise ValueError(f"pad must be 'replicate' or 'zeros', got {pad!r}")
    mode = {"replicate": "replicate", "zeros": "constant"}[pad]
    padded = F.pad(x, (0, pw, 0, ph), mode=mode) if (ph or pw) else x
    m = F.avg_pool2d(padded, stride).clamp_(M_MIN, M_MAX)
    m = m.repeat_interleave(stride, dim=-2).repeat_interleave(stride, dim=-1)
    return m[..., :h, :w]


def correlation_taps(rho: float) -> torch.Tensor:
    """The 3-tap filter [c, 1, c] / norm that gives white noise lag-1 correlation rho, variance kept."""
    rho = min(max(rho, 0.0), MAX_RHO)
    c = 0.0 if rho == 0 else (1.0 - math.sqrt(max(1.0 - 2.0 * rho * rho, 0.0))) / (2.0 * rho)  # 2c / (1 + 2c^2) = rho
    taps = torch.tensor([c, 1.0, c])
    return taps / torch.sqrt(torch.sum(taps**2))


def box_mean_variance(rho: float, size: int) -> float:
    """Variance of the size x size mean of unit-variance noise whose neighbours correlate by rho (the
    separable 3-tap model of `correlation_taps`): 1 / size^2 for white noise, more for correlated."""
    taps = correlation_taps(rho).tolist()
    lag = [sum(taps[i] * taps[i + d] for i in range(3 - d)) for d in range(3)]  # autocorrelation, lags 0-2
    one_axis = sum(lag[abs(i - j)] if abs(i - j) < 3 else 0.0 for i in range(size) for j in range(size))
    return float((one_axis / size**2) ** 2)


def correlate(noise: torch.Tensor, rho: float) -> torch.Tensor:
    """Noise (N, C, H, W) filtered along both axes so that neighbours correlate by rho (variance kept)."""
    k = correlation_taps(rho).to(noise.device, noise.dtype)
    n, c, h, w = noise.shape
    x = F.pad(noise.reshape(n * c, 1, h, w), (1, 1, 1, 1), mode="reflect" if min(h, w) > 1 else "replicate")
    x = F.conv2d(F.conv2d(x, k.view(1, 1, 1, 3)), k.view(1, 1, 3, 1))
    return x.reshape(n, c, h, w)


POISSON_SAMPLERS = ("parallel", "torch")
_GAMMA = np.uint64(0x9E3779B97F4A7C15)  # splitmix64's increment (the golden ratio in 64 bits)


@numba.njit(cache=True, inline="always")
def _mix(z: np.uint64) -> np.uint64:  # pragma: no cover - compiled
    """splitmix64's output function: a well-mixed 64-bit value of a 64-bit state."""
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


@numba.njit(cache=True, inline="always")
def _uniform(state: np.uint64) -> tuple[np.uint64, float]:  # pragma: no cover - compiled
    """(next state, a uniform draw in (0, 1)) of one element's splitmix64 stream."""
    state = state + _GAMMA
    return state, ((_mix(state) >> np.uint64(11)) + 0.5) * (1.0 / 9007199254740992.0)


@numba.njit(parallel=True, cache=True)
def _poisson_kernel(rate: np.ndarray, seed: np.uint64, out: np.ndarray) -> None:  # pragma: no cover - compiled
    """One Poisson draw per element of a flat float32 `rate` into `out`. Element i draws from its own
    splitmix64 stream, started at a hash of (seed, i): the result depends on the seed alone, not on
    the thread count. Rates below 10: multiplication of uniforms (Knuth); from 10: Hoermann's
    transformed rejection with squeeze (PTRS, 1993), ~1.2 uniform pairs a draw."""
    for i in numba.prange(rate.size):
        lam = np.float64(rate[i])  # float() of a float32 stays float32 in numba
        state = _mix(seed ^ (np.uint64(i) * _GAMMA))
        if not lam > 0.0:  # 0, negative and NaN rates give 0
            out[i] = 0.0
        elif lam > 1e15:  # beyond float32's resolution of the spread (and inf): the rate itself
            out[i] = lam
        elif lam < 10.0:
            limit, prod, k = math.exp(-lam), 1.0, -1
            while True:
                state, u = _uniform(state)
                prod *= u
                k += 1
                if prod <= limit:
                    break
            out[i] = k
        else:
            slam, loglam = math.sqrt(lam), math.log(lam)
            b = 0.931 + 2.53 * slam
            a = -0.059 + 0.02483 * b
            inv_alpha = 1.1239 + 1.1328 / (b - 3.4)
            vr = 0.9277 - 3.6224 / (b - 2.0)
            while True:
                state, u = _uniform(state)
                state, v = _uniform(state)
                u -= 0.5
                us = 0.5 - abs(u)
                k = math.floor((2.0 * a / us + b) * u + lam + 0.43)
                if us >= 0.07 and v <= vr:
                    break
                if k < 0.0 or (us < 0.013 and v > us):
                    continue
                if (math.log(v) + math.log(inv_alpha) - math.log(a / (us * us) + b)
                        <= -lam + k * loglam - math.lgamma(k + 1.0)):
                    break
            out[i] = k


def poisson(rate: torch.Tensor, generator: torch.Generator | None = None, sampler: str = "parallel") -> torch.Tensor:
    """Poisson draws of `rate` (float, any shape), like `torch.poisson`. "parallel": on the CPU, a numba
    sampler over all threads whose one seed comes from `generator` (reproducible for a seed whatever
    the thread count); "torch", or any other device: `torch.poisson` itself."""
    if sampler not in POISSON_SAMPLERS:
        raise ValueError(f"sampler must be one of {POISSON_SAMPLERS}, got {sampler!r}")
    if sampler == "torch" or not host_kernels(rate) or rate.dtype != torch.float32:
        return torch.poisson(rate, generator=generator)
    seed = int(torch.randint(0, 2**62, (1,), generator=generator).item())
    flat = to_host(rate).reshape(-1)
    out = np.empty_like(flat)
    _poisson_kernel(flat, np.uint64(seed), out)
    return torch.from_numpy(out).view(rate.shape)


def inject_noise(
    clean: torch.Tensor,
    stride: int,
    k_g: float,
    k_p: float,
    lambda_p: float,
    generator: torch.Generator | None = None,
    pad: str = "replicate",
    rho: float = 0.0,
    sampler: str = "parallel",
) -> torch.Tensor:
    """Return a noisy copy of `clean` ((N, C, H, W), values in [0, 1]) following FM2S's model
    (`pad`: how the tile map is padded, see `tile_means`; `sampler`: the Poisson sampler, see
    `poisson`). With rho > 0 the noise (noisy - clean) is then correlated between neighbours by rho
    (`correlate`), as a camera with correlated noise gives it."""
    if clean.dim() != 4:
        raise ValueError(f"expected an (N, C, H, W) tensor, got shape {tuple(clean.shape)}")
    x = clean.clamp(0.0, 1.0)
    m = tile_means(x, stride, pad)
    gain = k_p / m
    x = poisson(x * gain, generator, sampler) / gain
    if k_g > 0:
        x = x + torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype) * (m * (k_g / 255.0))
    x = x.clamp_(0.0, 1.0)
    x = poisson(x * lambda_p, generator, sampler) / lambda_p
    x = x.clamp_(0.0, 1.0)
    if rho > 0:
        x = (clean.clamp(0.0, 1.0) + correlate(x - clean.clamp(0.0, 1.0), rho)).clamp_(0.0, 1.0)
    return x


class NoiseInjector:
    """FM2S noise injection bound to one preset and one seeded generator (one per stream/model)."""

    def __init__(self, preset: Preset, seed: int = 0, device: torch.device | str = "cpu") -> None:
        self.preset = preset
        self.pad = "replicate"  # the tile map's padding (the paper schedule: "zeros", as the authors' code)
        self.sampler = "parallel"  # the Poisson sampler (the paper schedule: torch's, as the authors' code)
        self.generator = torch.Generator(device=torch.device(device))
        self.generator.manual_seed(seed)

    def __call__(self, clean: torch.Tensor) -> torch.Tensor:
        """A fresh noisy view of `clean`."""
        p = self.preset
        return inject_noise(clean, p.stride, p.k_g, p.k_p, p.lambda_p, self.generator, self.pad, p.rho, self.sampler)
