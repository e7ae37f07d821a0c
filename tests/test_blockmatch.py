"""The block-matching collaborative filter and the prior `offline.denoise` takes from it."""

import numpy as np
import pytest
from scipy import ndimage

from fm2s_stream.blockmatch import (
    CONSISTENT_SD,
    BlockMatchParams,
    block_matched,
    collaborative_filter,
    stabilize,
    unstabilize,
)
from fm2s_stream.calibrate import estimate_noise
from fm2s_stream.noise import correlation_taps
from fm2s_stream.offline import classical_prior
from fm2s_stream.synthetic import Camera, TimeLapse, make_scene
from fm2s_stream.training import SCHEDULES


def mse(x: np.ndarray, y: np.ndarray) -> float:
    return float(np.mean((np.asarray(x, np.float64) - y) ** 2))


def test_filter_removes_most_of_white_noise_and_beats_a_blur():
    rng = np.random.default_rng(0)
    clean = make_scene((96, 96), rng, peak=30.0, background=2.0)  # structure spanning ~30 noise sd
    noisy = clean + rng.normal(0.0, 1.0, clean.shape)
    out = collaborative_filter(noisy, 1.0)
    blur = ndimage.gaussian_filter(noisy, 1.0)
    assert out.shape == noisy.shape and out.dtype == np.float32
    assert mse(out, clean) < 0.6  # the noise variance is 1 (measured 0.40)
    assert mse(out, clean) < 0.5 * mse(blur, clean)  # measured 0.32x


def test_filter_scales_with_sigma_and_leaves_tiny_frames_alone():
    rng = np.random.default_rng(1)
    clean = make_scene((64, 64), rng, peak=30.0, background=2.0)
    noisy = clean + rng.normal(0.0, 1.0, clean.shape)
    # the same frame x 10 with sigma 10 is the same problem: the same answer x 10
    np.testing.assert_allclose(collaborative_filter(10 * noisy, 10.0), 10 * collaborative_filter(noisy, 1.0),
                               rtol=1e-4, atol=1e-3)
    np.testing.assert_allclose(collaborative_filter(10 * noisy, 10.0, 0.5), 10 * collaborative_filter(noisy, 1.0, 0.5),
                               rtol=1e-4, atol=1e-3)
    small = rng.normal(size=(5, 40)).astype(np.float32)
    np.testing.assert_array_equal(collaborative_filter(small), small)
    with pytest.raises(ValueError, match="2D"):
        collaborative_filter(np.zeros((2, 16, 16)))


@pytest.mark.parametrize("level", [20.0, 200.0, 2000.0])  # from ~7 electrons up (fewer: var up to 1.16)
def test_stabilize_gives_unit_variance_and_unstabilize_the_level(level):
    a, b = 3.0, 25.0  # gain 3 ADU/e-, read noise 5 ADU (offset 0)
    rng = np.random.default_rng(2)
    frame = a * rng.poisson(level / a, 200_000) + rng.normal(0.0, np.sqrt(b), 200_000)
    z = stabilize(frame, a, b)
    assert abs(z.var() - 1.0) < 0.05
    assert abs(float(unstabilize(z.mean(), a, b)) - level) < 0.05 * level + 0.3


def frame_with(camera: Camera, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    return TimeLapse((128, 128), camera, seed=seed, peak=40, background=2).frame(0)


def test_block_matched_uses_the_law_where_it_holds():
    noisy, gt = frame_with(Camera(gain=4.0, read_noise=1.5, offset=2, bit_depth=8))
    est = estimate_noise(noisy)
    prior = block_matched(noisy, est.a, est.b, est.rho)
    assert prior.estimate is not None and prior.reason == ""
    assert prior.residual_sd > CONSISTENT_SD
    assert mse(prior.estimate, gt) < 0.45 * mse(noisy, gt)  # measured 0.35x


def test_correlated_noise_is_filtered_as_correlated():
    """Noise correlated as the injector correlates it: the filter told so (exact variances of the group's
    mean, neighbours kept apart) removes far more of it than the same filter taking it as white."""
    rng = np.random.default_rng(4)
    clean = make_scene((128, 128), rng, peak=30.0, background=2.0)
    noise = rng.normal(size=clean.shape)
    taps = correlation_taps(0.6).numpy().astype(np.float64)
    noise = ndimage.convolve1d(ndimage.convolve1d(noise, taps, 0), taps, 1)
    assert abs(noise.std() - 1.0) < 0.05
    told, white = collaborative_filter(clean + noise, 1.0, 0.6), collaborative_filter(clean + noise, 1.0, 0.0)
    assert mse(told, clean) < 0.92 * mse(white, clean)  # measured 0.83-0.86x over three scenes
    assert mse(told, clean) < 0.5 * mse(ndimage.gaussian_filter(clean + noise, 1.0), clean)


def test_block_matched_declines_a_law_the_frame_contradicts():
    noisy, _ = frame_with(Camera(gain=4.0, read_noise=1.5, offset=2, bit_depth=8))
    est = estimate_noise(noisy)
    overstated = block_matched(noisy, 8 * est.a, 8 * est.b, est.rho)  # 8x the noise the frame has
    assert overstated.estimate is None and overstated.residual_sd < CONSISTENT_SD
    assert "overstates" in overstated.reason


def test_classical_prior_follows_the_schedule_and_the_frame():
    white, _ = frame_with(Camera(gain=4.0, read_noise=1.5, offset=2, bit_depth=8))
    fast, paper = SCHEDULES["fast"], SCHEDULES["paper"]
    prior = classical_prior(white, fast, estimate_noise(white))
    assert prior is not None and prior.shape == white.shape and prior.dtype == np.float32
    assert 0.0 <= float(np.median(prior)) <= 1.0  # [0, 1] units of the 8-bit frame
    assert classical_prior(white, paper, estimate_noise(white)) is None  # the authors' method has none
    assert classical_prior(white, fast, None) is None
    # 256x256: one 128x128 frame of correlated noise overstates its gain ~3x (frames below ~200 px)
    camera = Camera(gain=4.0, read_noise=1.5, offset=2, bit_depth=16, correlation=0.7)
    correlated, _ = TimeLapse((256, 256), camera, seed=0, peak=40, background=2).frame(0)
    est = estimate_noise(correlated)
    assert est.rho > 0.3 and est.a == pytest.approx(4.0, rel=0.15)
    assert classical_prior(correlated, fast, est) is not None


def test_params_are_honoured():
    rng = np.random.default_rng(3)
    clean = make_scene((64, 64), rng, peak=30.0, background=2.0)
    noisy = clean + rng.normal(0.0, 1.0, clean.shape)
    weak = collaborative_filter(noisy, 1.0, 0.0, BlockMatchParams(lam=0.5, group1=2, group2=2, radius=2))
    strong = collaborative_filter(noisy, 1.0)
    assert mse(strong, clean) < mse(weak, clean)


def test_large_frames_are_filtered_in_tiles_as_well_as_whole():
    from fm2s_stream.blockmatch import TILE, _filter

    rng = np.random.default_rng(5)
    clean = make_scene((2 * TILE + 40, 72), rng, peak=30.0, background=2.0)
    noisy = (clean + rng.normal(size=clean.shape)).astype(np.float32)
    tiled, whole = collaborative_filter(noisy, 1.0), _filter(noisy, 1.0, 0.0, BlockMatchParams())
    assert tiled.shape == noisy.shape
    assert np.array_equal(tiled[:400], whole[:400])  # away from a tile's border: the same numbers
    assert np.mean(np.abs(tiled - whole)) < 0.1  # near one, other reference grids (the noise sd is 1)
    assert abs(mse(tiled, clean) - mse(whole, clean)) < 0.02 * mse(whole, clean)
