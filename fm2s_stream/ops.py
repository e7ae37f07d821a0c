"""Image operations on 2D float32 torch tensors, on whatever device they live: the engine's primitives.

The per-frame engine keeps a frame on the model's device from its upload to its quantisation, so
every spatial operation it needs is here, once, for any device. Where the CPU has a measurably
faster kernel than torch's eager ops, the CPU path uses it on a zero-copy numpy view of the tensor;
`host_kernels` alone makes that choice, for these ops and for the temporal average's fused kernels
(measured at 2048x2048, 2 cores: a 7x7 separable filter takes 3 ms in numba, 44 ms as torch slices,
150 ms as torch conv2d).
`tests/test_ops.py` checks that both paths give the same answer, on this CPU.

Edge conventions: `separable` repeats edges (as the engine's registration and averaging always
did); `gaussian` and `median` mirror them half-sample symmetrically (scipy's "reflect"), as the
stage-1 targets always did, so streaming and offline targets are the same numbers.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import numba
import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

__all__ = [
    "BOX3",
    "BOX7",
    "GAUSS1",
    "IDENTITY",
    "filter_then_shift",
    "float_and_affine",
    "gaussian",
    "halve",
    "host_kernels",
    "median",
    "one_thread",
    "overlap",
    "rounded",
    "separable",
    "shift_fraction",
    "to_host",
]

IDENTITY = np.array([1.0], np.float32)
BOX3 = np.full(3, 1 / 3, np.float32)
BOX7 = np.full(7, 1 / 7, np.float32)
GAUSS1 = np.exp(-0.5 * np.arange(-3, 4) ** 2).astype(np.float32)
GAUSS1 /= GAUSS1.sum()  # sigma 1, 7 taps

_KERNELS: dict[tuple[bytes, str], torch.Tensor] = {}


@contextlib.contextmanager
def one_thread(active: bool = True) -> Iterator[None]:
    """Run torch's and numba's CPU kernels on one thread inside (no-op when not `active`).

    Post-processing is dozens of small, memory-bound operations: on two cores shared with the ZMQ,
    disk and client threads, every one of them waiting at a two-thread barrier costs more than the
    second thread gains (registration: 5.2 ms alone, 16.5 ms inside the demo with two threads).
    """
    if not active:
        yield
        return
    torch_threads, numba_threads = torch.get_num_threads(), numba.get_num_threads()
    torch.set_num_threads(1)
    numba.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(torch_threads)
        numba.set_num_threads(numba_threads)


def host_kernels(t: torch.Tensor, torch_only: bool = False) -> bool:
    """True where the CPU kernels (numba, scipy) run instead of torch's: the one place this is chosen."""
    return t.device.type == "cpu" and not torch_only


def to_host(t: torch.Tensor) -> np.ndarray:
    """A float32 numpy view (CPU) or copy (other devices) of a tensor."""
    return t.detach().to("cpu", torch.float32).contiguous().numpy()


def _kernel(k: np.ndarray, device: torch.device) -> torch.Tensor:
    """A small filter kernel on `device`, uploaded once (no host-to-device copy per call)."""
    key = (np.asarray(k, np.float32).tobytes(), str(device))
    if key not in _KERNELS:
        _KERNELS[key] = torch.as_tensor(np.asarray(k, np.float32), device=device)
    return _KERNELS[key]


@numba.njit(cache=True, inline="always")
def _edge(i: int, n: int, mirror: bool) -> int:  # pragma: no cover - compiled
    """Index i of a line of n samples beyond its ends: mirrored half-sample symmetrically
    (d c b a | a b c d | d c ..., scipy's "reflect") or the end sample repeated."""
    if not mirror:
        return min(max(i, 0), n - 1)
    i = i % (2 * n)
    return 2 * n - 1 - i if i >= n else i


@numba.njit(parallel=True, cache=True)
def _separable_numba(img: np.ndarray, ky: np.ndarray, kx: np.ndarray,
                     mirror: bool) -> np.ndarray:  # pragma: no cover - compiled
    """Correlate rows with kx, then columns with ky (odd lengths), edges repeated or mirrored (`_edge`).

    Each row is copied into an edge-padded buffer first, so the inner loops run without bounds
    checks and vectorise (4x faster than clamping every index: 3.0 vs 12.8 ms for 7 taps at 2048^2).
    """
    h, w = img.shape
    ry, rx = len(ky) // 2, len(kx) // 2
    tmp = np.empty((h, w), np.float32)
    for i in numba.prange(h):
        row = np.empty(w + 2 * rx, np.float32)
        for j in range(w):
            row[j + rx] = img[i, j]
        for j in range(rx):
            row[j] = img[i, _edge(j - rx, w, mirror)]
            row[w + rx + j] = img[i, _edge(w + j, w, mirror)]
        for j in range(w):
            tmp[i, j] = 0.0
        for k in range(len(kx)):
            c = kx[k]
            for j in range(w):
                tmp[i, j] += c * row[j + k]
    out = np.empty((h, w), np.float32)
    for i in numba.prange(h):
        for j in range(w):
            out[i, j] = 0.0
        for k in range(len(ky)):
            ii = _edge(i + k - ry, h, mirror)
            c = ky[k]
            for j in range(w):
                out[i, j] += c * tmp[ii, j]
    return out


def separable(img: torch.Tensor, ky: np.ndarray, kx: np.ndarray, torch_only: bool = False) -> torch.Tensor:
    """2D correlation of a (H, W) image with the outer product of two odd-length kernels, edges repeated."""
    ky, kx = np.asarray(ky, np.float32), np.asarray(kx, np.float32)
    if host_kernels(img, torch_only):
        return torch.from_numpy(_separable_numba(to_host(img), ky, kx, False))
    ry, rx = len(ky) // 2, len(kx) // 2
    x = F.pad(img.float()[None, None], (rx, rx, ry, ry), mode="replicate")
    if len(kx) > 1:
        x = F.conv2d(x, _kernel(kx, img.device).view(1, 1, 1, -1))
    if len(ky) > 1:
        x = F.conv2d(x, _kernel(ky, img.device).view(1, 1, -1, 1))
    return x[0, 0]


def _symmetric_pad(img: torch.Tensor, r: int) -> torch.Tensor:
    """(H, W) padded by r on every side, mirrored half-sample symmetrically (d c b a | a b c d)."""
    h, w = img.shape
    iy = torch.arange(-r, h + r, device=img.device)
    ix = torch.arange(-r, w + r, device=img.device)
    iy = torch.where(iy < 0, -iy - 1, torch.where(iy >= h, 2 * h - iy - 1, iy)).clamp_(0, h - 1)
    ix = torch.where(ix < 0, -ix - 1, torch.where(ix >= w, 2 * w - ix - 1, ix)).clamp_(0, w - 1)
    return img[iy][:, ix]


def _gaussian_taps(sigma: float, truncate: float = 4.0) -> np.ndarray:
    """scipy's Gaussian taps: radius int(truncate * sigma + 0.5), normalised."""
    r = int(truncate * sigma + 0.5)
    k = np.exp(-0.5 * (np.arange(-r, r + 1) / sigma) ** 2)
    return (k / k.sum()).astype(np.float32)


def gaussian(img: torch.Tensor, sigma: float, torch_only: bool = False) -> torch.Tensor:
    """Gaussian blur of a (H, W) image, edges mirrored (scipy.ndimage.gaussian_filter's default, its taps).

    On the CPU a numba kernel (scipy's at 512x512, sigma 2: ~2.8 ms per axis pair here, most of the
    temporal pair's motion guard)."""
    if host_kernels(img, torch_only):
        taps = _gaussian_taps(sigma)
        return torch.from_numpy(_separable_numba(to_host(img), taps, taps, True))
    k = _kernel(_gaussian_taps(sigma), img.device)
    r = len(k) // 2
    x = _symmetric_pad(img.float(), r)[None, None]
    x = F.conv2d(F.conv2d(x, k.view(1, 1, 1, -1)), k.view(1, 1, -1, 1))
    return x[0, 0]


HIST_MEDIAN_MAX_LEVELS = 1 << 16  # up to this many distinct values (any 8/16-bit frame) the histogram median runs


@numba.njit(parallel=True, cache=True)
def _median_of_ranks(ranks: np.ndarray, n_levels: int, size: int, h: int, w: int) -> np.ndarray:  # pragma: no cover
    """Huang's sliding-histogram median over integer ranks: one histogram per output row, slid right.

    The median bin `m` and the count of values below it are updated as columns leave and enter,
    so a step costs 2 * size updates plus the few bins the median moves, not a sort of size^2 values.
    """
    k = (size * size) // 2
    out = np.empty((h, w), np.int32)
    for i in numba.prange(h):
        hist = np.zeros(n_levels, np.int32)
        for dy in range(size):
            for dx in range(size):
                hist[ranks[i + dy, dx]] += 1
        m, below = 0, 0
        while below + hist[m] <= k:
            below += hist[m]
            m += 1
        out[i, 0] = m
        for j in range(1, w):
            for dy in range(size):
                v = ranks[i + dy, j - 1]
                hist[v] -= 1
                if v < m:
                    below -= 1
                v = ranks[i + dy, j + size - 1]
                hist[v] += 1
                if v < m:
                    below += 1
            while below > k:
                m -= 1
                below -= hist[m]
            while below + hist[m] <= k:
                below += hist[m]
                m += 1
            out[i, j] = m
    return out


@numba.njit(inline="always")
def _med3(a: float, b: float, c: float) -> float:  # pragma: no cover - compiled
    return max(min(a, b), min(max(a, b), c))


@numba.njit(parallel=True, cache=True)
def _median3(padded: np.ndarray, h: int, w: int) -> np.ndarray:  # pragma: no cover - compiled
    """3x3 median, branch-free: each of the 3 columns sorted, then the median of the lows' maximum,
    the middles' median and the highs' minimum (exactly the median of the 9). The sliding histogram
    walks across the empty bins between sparse levels instead: a training crop's window 3.6 ms."""
    out = np.empty((h, w), padded.dtype)
    for i in numba.prange(h):
        r0, r1, r2 = padded[i], padded[i + 1], padded[i + 2]
        for j in range(w):
            a0, b0, c0 = r0[j], r1[j], r2[j]
            a1, b1, c1 = r0[j + 1], r1[j + 1], r2[j + 1]
            a2, b2, c2 = r0[j + 2], r1[j + 2], r2[j + 2]
            lows = max(min(a0, b0, c0), min(a1, b1, c1), min(a2, b2, c2))
            highs = min(max(a0, b0, c0), max(a1, b1, c1), max(a2, b2, c2))
            mids = _med3(_med3(a0, b0, c0), _med3(a1, b1, c1), _med3(a2, b2, c2))
            out[i, j] = _med3(lows, mids, highs)
    return out


def _host_median(img: np.ndarray, size: int) -> np.ndarray:
    """scipy's median_filter(mode="reflect"), exactly; ~15x faster on camera frames (few distinct values).

    Measured at 512x512, 11x11 (2-core CPU): 8-bit-like 15 ms vs scipy's 360 ms, 16-bit-like 26 vs 382;
    2048x2048 16-bit 309 ms vs 6.1 s. Frames of more distinct values than HIST_MEDIAN_MAX_LEVELS go to scipy.
    3x3 windows (the confocal, two-photon and auto presets) take the branch-free `_median3`: 1024x1024
    float32 0.9 ms, a fine-tune step (two 96x96 crops) 14.9 -> 5.8 ms.
    """
    r = size // 2
    padded = np.pad(img, r, mode="symmetric")
    if size == 3 and padded.dtype.kind in "fiu":
        return _median3(padded, *img.shape)  # type: ignore[no-any-return]
    levels, ranks = np.unique(padded, return_inverse=True)
    if len(levels) > HIST_MEDIAN_MAX_LEVELS:
        return ndimage.median_filter(img, size=size, mode="reflect")  # type: ignore[no-any-return]
    index = _median_of_ranks(ranks.reshape(padded.shape).astype(np.int32), len(levels), size, *img.shape)
    return levels[index]  # type: ignore[no-any-return]


def median(img: torch.Tensor, size: int, torch_only: bool = False) -> torch.Tensor:
    """size x size median of a (H, W) image, edges mirrored (scipy.ndimage.median_filter's default)."""
    if host_kernels(img, torch_only):
        return torch.from_numpy(_host_median(to_host(img), size))
    r = size // 2
    padded = _symmetric_pad(img.float(), r)
    h, w = img.shape
    out = torch.empty((h, w), dtype=torch.float32, device=img.device)
    rows = max(1, (1 << 24) // max(1, size * size * w))  # bound the unfolded window stack to ~64 MB
    for y0 in range(0, h, rows):
        y1 = min(h, y0 + rows)
        band = padded[y0 : y1 + 2 * r]
        windows = band.unfold(0, size, 1).unfold(1, size, 1)  # (rows, w, size, size)
        # torch.median takes the lower of the two middle values; for odd windows it is the median
        out[y0:y1] = windows.reshape(y1 - y0, w, size * size).median(dim=-1).values
    return out


@numba.njit(parallel=True, cache=True)
def _halve_numba(a: np.ndarray) -> np.ndarray:  # pragma: no cover - compiled
    """2x2 block means in one pass (the torch expression below takes four)."""
    h, w = a.shape[0] // 2, a.shape[1] // 2
    out = np.empty((h, w), np.float32)
    for i in numba.prange(h):
        for j in range(w):
            out[i, j] = (a[2 * i, 2 * j] + a[2 * i + 1, 2 * j] + a[2 * i, 2 * j + 1] + a[2 * i + 1, 2 * j + 1]) * 0.25
    return out


def halve(a: torch.Tensor, torch_only: bool = False) -> torch.Tensor:
    """2x2 block mean (an odd last row/column dropped), float32."""
    if host_kernels(a, torch_only):
        return torch.from_numpy(_halve_numba(to_host(a)))
    h, w = a.shape[0] // 2 * 2, a.shape[1] // 2 * 2
    a = a.float()
    return (a[0:h:2, 0:w:2] + a[1:h:2, 0:w:2] + a[0:h:2, 1:w:2] + a[1:h:2, 1:w:2]) * 0.25


def _fraction_kernel(f: float) -> np.ndarray:
    """7 taps (offsets -3..3) that sample a line at i - f, for |f| <= 0.5: Lanczos-3, normalised."""
    offsets = np.arange(-3, 4, dtype=np.float64) + f
    k = np.sinc(offsets) * np.sinc(offsets / 3)
    k[np.abs(offsets) >= 3] = 0
    return (k / k.sum()).astype(np.float32)


def shift_fraction(img: torch.Tensor, fy: float, fx: float, torch_only: bool = False) -> torch.Tensor:
    """out[y, x] = img[y - fy, x - fx] for |fy|, |fx| <= 0.5 (Lanczos-3 interpolation, edges repeated)."""
    if not fy and not fx:
        return img.float()
    return separable(img, _fraction_taps(fy), _fraction_taps(fx), torch_only)


def _fraction_taps(f: float) -> np.ndarray:
    """The taps of a shift by f along one axis (the identity for none)."""
    return _fraction_kernel(f) if f else IDENTITY


def filter_then_shift(img: torch.Tensor, ky: np.ndarray, kx: np.ndarray, fy: float, fx: float,
                      torch_only: bool = False) -> torch.Tensor:
    """shift_fraction(separable(img, ky, kx), fy, fx) in one separable pass: the kernels composed
    (the same inside; within the kernels' reach of an edge, edges are repeated once instead of twice).
    Measured at 2048x2048, 3x3 box then a shift in both axes: 4.3-5.0 ms instead of ~7.5."""
    return separable(img, np.convolve(ky, _fraction_taps(fy)), np.convolve(kx, _fraction_taps(fx)), torch_only)


@numba.njit(parallel=True, cache=True)
def _float_and_affine_numba(x: np.ndarray, gain: float,
                            offset: float) -> tuple[np.ndarray, np.ndarray]:  # pragma: no cover - compiled
    """(x as float32, gain * x + offset) in one pass over an integer frame."""
    h, w = x.shape
    plain = np.empty((h, w), np.float32)
    mapped = np.empty((h, w), np.float32)
    g, o = np.float32(gain), np.float32(offset)
    for i in numba.prange(h):
        for j in range(w):
            v = np.float32(x[i, j])
            plain[i, j] = v
            mapped[i, j] = v * g + o
    return plain, mapped


def float_and_affine(x: torch.Tensor, gain: float, offset: float,
                     torch_only: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(x as float32, gain * x + offset as float32): a camera frame and its [0, 1] version, read once on the CPU."""
    if host_kernels(x, torch_only) and x.dtype in (torch.uint8, torch.uint16):
        plain, mapped = _float_and_affine_numba(x.numpy(), float(gain), float(offset))
        return torch.from_numpy(plain), torch.from_numpy(mapped)
    plain_t = x.float()
    return plain_t, plain_t * gain + offset


@numba.njit(parallel=True, cache=True)
def _rounded_numba(values: np.ndarray, out: np.ndarray, lo: float, hi: float) -> None:  # pragma: no cover
    """out = values rounded half to even (as torch.round) and clipped to [lo, hi]; NaN -> lo."""
    h, w = values.shape
    for i in numba.prange(h):
        for j in range(w):
            v = values[i, j]
            v = lo if not v >= lo else (hi if v > hi else v)  # NaN fails every comparison: lo
            out[i, j] = np.rint(v)


def rounded(values: torch.Tensor, dtype: torch.dtype, torch_only: bool = False) -> torch.Tensor:
    """Float values -> the integer `dtype` (uint8/uint16), rounded half to even, clipped to its range."""
    info = torch.iinfo(dtype)
    if host_kernels(values, torch_only):
        out = np.empty(tuple(values.shape), np.uint8 if dtype == torch.uint8 else np.uint16)
        _rounded_numba(to_host(values), out, float(info.min), float(info.max))
        return torch.from_numpy(out)
    return torch.clamp(torch.round(values), info.min, info.max).to(dtype)


def overlap(h: int, w: int, dy: int, dx: int) -> tuple[tuple[slice, slice], tuple[slice, slice]]:
    """Index windows (in cur, in ref) where cur[y, x] ~ ref[y - dy, x - dx]."""
    cur = (slice(max(0, dy), h + min(0, dy)), slice(max(0, dx), w + min(0, dx)))
    ref = (slice(max(0, -dy), h + min(0, -dy)), slice(max(0, -dx), w + min(0, -dx)))
    return cur, ref
