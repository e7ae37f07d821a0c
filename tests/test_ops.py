"""The engine's two kernel paths (CPU kernels and torch's, chosen by device in ops) give the same answers.

On a CUDA machine the engine runs the torch path; here both run on the CPU, so a difference between
them (or a device mix-up in the torch path) shows up without a GPU.
"""

import numpy as np
import pytest
import torch
from scipy import ndimage

from fm2s_stream import ops
from fm2s_stream.anchor import anchor
from fm2s_stream.learner import Learner, cold_start_schedule
from fm2s_stream.presets import get_preset
from fm2s_stream.registration import _lucas_kanade, refine_shift
from fm2s_stream.synthetic import Camera, TimeLapse
from fm2s_stream.temporal import TemporalAverage

RNG = np.random.default_rng(0)
IMG = torch.from_numpy(RNG.uniform(0, 1, (67, 91)).astype(np.float32))


@pytest.mark.parametrize("kernels", [(ops.GAUSS1, ops.BOX3), (ops.BOX7, ops.IDENTITY), (ops.BOX3, ops.BOX3)])
def test_separable_filter_is_the_same_in_numba_and_torch(kernels):
    ky, kx = kernels
    np.testing.assert_allclose(ops.separable(IMG, ky, kx).numpy(), ops.separable(IMG, ky, kx, torch_only=True).numpy(),
                               atol=1e-5)


@pytest.mark.parametrize("sigma", [1.0, 2.0, 4.0])
def test_gaussian_is_scipys_in_torch_too(sigma):
    np.testing.assert_allclose(ops.gaussian(IMG, sigma).numpy(), ops.gaussian(IMG, sigma, torch_only=True).numpy(),
                               atol=1e-5)


@pytest.mark.parametrize("shape", [(67, 91), (5, 7), (1, 30), (12, 3)])
@pytest.mark.parametrize("sigma", [1.0, 4.0])
def test_gaussian_cpu_kernel_is_scipys_to_float_rounding(shape, sigma):
    # radius 16 on a 3-pixel line: the mirror folds back more than once
    img = RNG.uniform(0, 1, shape).astype(np.float32)
    np.testing.assert_allclose(ops.gaussian(torch.from_numpy(img), sigma).numpy(),
                               ndimage.gaussian_filter(img, sigma, mode="reflect"), atol=1e-6)


def test_refine_shift_is_the_same_in_numba_and_torch():
    scene = ndimage.gaussian_filter(RNG.uniform(0, 1, (140, 150)), 2).astype(np.float32)
    cur, prev = torch.from_numpy(scene[10:130, 12:142].copy()), torch.from_numpy(scene[8:128, 15:145].copy())
    assert refine_shift(cur, prev, -1, 2) == refine_shift(cur, prev, -1, 2, torch_only=True) == (-2, 3)


def test_halve_is_the_same_in_numba_and_torch():
    np.testing.assert_allclose(ops.halve(IMG).numpy(), ops.halve(IMG, torch_only=True).numpy(), atol=1e-6)


@pytest.mark.parametrize("size", [3, 11])
def test_median_is_scipys_in_torch_too(size):
    np.testing.assert_array_equal(ops.median(IMG, size).numpy(), ops.median(IMG, size, torch_only=True).numpy())


@pytest.mark.parametrize("shape", [(67, 91), (5, 7), (1, 30), (12, 3), (2, 2)])
@pytest.mark.parametrize("levels", [3, 40, 4000, None])  # None: every value distinct
@pytest.mark.parametrize("size", [3, 11])  # the branch-free 3x3 kernel and the sliding histogram
def test_cpu_median_is_scipys_exactly(shape, levels, size):
    img = (RNG.random(shape) if levels is None else RNG.integers(0, levels, shape) / levels).astype(np.float32)
    got = ops.median(torch.from_numpy(img), size).numpy()
    np.testing.assert_array_equal(got, ndimage.median_filter(img, size, mode="reflect"))


@pytest.mark.parametrize(("shape", "sigma"), [((37, 53), 8.0), ((64, 80), 16.0), ((1030, 1019), 8.0)])
def test_anchor_fused_cpu_kernels_match_the_torch_path(shape, sigma):
    # (1030, 1019): blocks of 4 (large frame), partial blocks on both edges; the others below that size
    raw = torch.from_numpy(RNG.normal(100, 10, shape).astype(np.float32))
    den = torch.from_numpy(RNG.normal(90, 3, shape).astype(np.float32))
    fused, plain = anchor(den, raw, sigma), anchor(den, raw, sigma, torch_only=True)
    assert fused.shape == den.shape
    np.testing.assert_allclose(fused.numpy(), plain.numpy(), atol=1e-4)


def test_temporal_average_fused_cpu_kernels_match_the_torch_path():
    cam = Camera(gain=2.0, read_noise=3.0, offset=100.0, correlation=0.5)
    lapse = TimeLapse((96, 128), cam, seed=1, drift=(0.3, 0.2), peak=80)
    fused, plain = TemporalAverage(8), TemporalAverage(8)
    plain.torch_only = True
    for t in range(12):
        raw, truth = lapse.frame(t)
        r, d = torch.from_numpy(raw.astype(np.float32)), torch.from_numpy(truth.astype(np.float32))
        (a, na), (b, nb) = fused.apply(r, d), plain.apply(r, d)
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-5, atol=1e-3)
        assert na == pytest.approx(nb, rel=1e-6), (t, na, nb)


@pytest.mark.parametrize("shape", [(40, 56), (250, 250)])
def test_lucas_kanade_step_fused_cpu_kernels_match_the_torch_path(shape):
    scene = ndimage.gaussian_filter(RNG.uniform(0, 1000, (shape[0] + 8, shape[1] + 8)), 2).astype(np.float32)
    cur = torch.from_numpy(RNG.poisson(scene[4:-4, 4:-4]).astype(np.float32))
    ref = torch.from_numpy(RNG.poisson(ndimage.shift(scene, (0.3, -0.2))[4:-4, 4:-4]).astype(np.float32))
    fused, plain = _lucas_kanade(cur, ref), _lucas_kanade(cur, ref, torch_only=True)
    assert fused is not None and plain is not None
    np.testing.assert_allclose(fused, plain, atol=1e-4)  # float32 sums in a different order, nothing else
    flat = torch.ones(shape)
    assert _lucas_kanade(flat, flat) is None and _lucas_kanade(flat, flat, torch_only=True) is None


def test_tiled_cpu_inference_is_the_whole_frame_answer():
    learner = Learner(get_preset("confocal"), cold_start_schedule(10), torch.device("cpu"), inference_dtype="float32")
    unit = torch.from_numpy(RNG.uniform(0, 1, (700, 650)).astype(np.float32))  # > WHOLE_MAX_PIXELS: tiled
    tiled = learner.infer(unit)
    with torch.inference_mode():
        whole = learner._inference_net(unit[None, None])[0, 0]  # type: ignore[misc]
    np.testing.assert_allclose(tiled.numpy(), whole.numpy(), atol=1e-5)
    np.testing.assert_allclose(learner.infer(unit, 3000.0, 100.0).numpy(), whole.numpy() * 3000 + 100, rtol=1e-5)
    strips = torch.from_numpy(RNG.uniform(0, 1, (300, 2100)).astype(np.float32))  # strips of 128 x 1050
    with torch.inference_mode():
        whole = learner._inference_net(strips[None, None])[0, 0]  # type: ignore[misc]
    np.testing.assert_allclose(learner.infer(strips).numpy(), whole.numpy(), atol=1e-5)
    small = unit[:64, :64]  # one tile: the whole-frame path
    np.testing.assert_allclose(learner.infer(small, 2.0, -1.0).numpy(), 2 * learner.infer(small).numpy() - 1, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.uint8, torch.uint16])
def test_frame_scaling_and_quantisation_are_the_same_in_numba_and_torch(dtype):
    top = 255 if dtype == torch.uint8 else 65535
    frame = torch.from_numpy(RNG.integers(0, top + 1, (37, 53)).astype(np.uint8 if top == 255 else np.uint16))
    (a, ua), (b, ub) = ops.float_and_affine(frame, 1 / 300, -0.1), ops.float_and_affine(frame, 1 / 300, -0.1, True)
    np.testing.assert_array_equal(a.numpy(), b.numpy())
    np.testing.assert_allclose(ua.numpy(), ub.numpy(), rtol=1e-6, atol=1e-7)
    values = torch.from_numpy(RNG.uniform(-20, top + 20, (37, 53)).astype(np.float32))
    values[0, :4] = torch.tensor([0.5, 1.5, 2.5, top - 0.5])  # ties round to even, as torch.round does
    np.testing.assert_array_equal(ops.rounded(values, dtype).numpy(), ops.rounded(values, dtype, True).numpy())
