import numpy as np
import pytest

from fm2s_stream.synthetic import Camera, TimeLapse, make_scene


def test_camera_noise_follows_poisson_gaussian_law():
    cam = Camera(gain=3.0, read_noise=4.0, offset=200.0, bit_depth=16)
    rng = np.random.default_rng(0)
    flat = np.full((256, 256), 50.0)
    frame = cam.expose(flat, rng).astype(np.float64)
    assert frame.mean() == pytest.approx(200 + 3 * 50, rel=0.01)
    assert frame.var() == pytest.approx(9 * (50 + 16), rel=0.05)


def test_correlated_noise_keeps_variance_and_correlates_neighbours():
    cam = Camera(gain=1.0, read_noise=3.0, offset=100.0, correlation=1.0)
    frame = cam.expose(np.full((256, 256), 30.0), np.random.default_rng(1)).astype(np.float64)
    noise = frame - frame.mean()
    assert noise.var() == pytest.approx(30 + 9, rel=0.1)
    rho = np.mean(noise[:, 1:] * noise[:, :-1]) / noise.var()
    assert rho > 0.5  # neighbours share noise, as in real microscope images


def test_scene_and_timelapse_are_deterministic_and_move():
    a = TimeLapse((64, 64), Camera(bit_depth=8, offset=5, gain=0.5), seed=3)
    b = TimeLapse((64, 64), Camera(bit_depth=8, offset=5, gain=0.5), seed=3)
    fa, ga = a.frame(10)
    fb, gb = b.frame(10)
    assert fa.dtype == np.uint8 and np.array_equal(fa, fb) and np.array_equal(ga, gb)
    assert not np.allclose(a.electrons(0), a.electrons(40))
    scene = make_scene((128, 128), np.random.default_rng(0), peak=100, background=2)
    assert scene.max() == pytest.approx(100 + 2 * 1.15, rel=0.05)
