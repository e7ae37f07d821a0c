"""Sub-pixel registration and the motion-compensated temporal average built on it."""

import numpy as np
import pytest
import torch
from scipy import ndimage

from fm2s_stream.demo import psnr
from fm2s_stream.ops import shift_fraction
from fm2s_stream.registration import subpixel_shift
from fm2s_stream.synthetic import Camera, TimeLapse, make_scene
from fm2s_stream.temporal import TemporalAverage

CAMERA = Camera(gain=2.0, read_noise=2.0, offset=100.0, bit_depth=16, correlation=0.7)


def shifted(scene: np.ndarray, dy: float, dx: float, size: int = 256) -> np.ndarray:
    """A window of `scene` moved by (dy, dx) (exact Fourier shift): out[y] = scene[y - d]."""
    moved = np.fft.ifft2(ndimage.fourier_shift(np.fft.fft2(scene), (dy, dx))).real
    return moved[32 : 32 + size, 32 : 32 + size]


@pytest.mark.parametrize("shift", [(0.0, 0.0), (0.3, 0.2), (-0.7, 1.4), (8.0, 5.0), (-12.3, 3.6)])
def test_subpixel_shift_of_noisy_raw_frames_is_within_a_tenth_of_a_pixel(shift):
    rng = np.random.default_rng(0)
    scene = make_scene((320, 320), rng, peak=100, background=4)
    cur = CAMERA.expose(shifted(scene, *shift), rng).astype(np.float32)
    ref = CAMERA.expose(shifted(scene, 0, 0), rng).astype(np.float32)
    found = subpixel_shift(torch.from_numpy(cur), torch.from_numpy(ref))
    assert found is not None
    np.testing.assert_allclose(found, shift, atol=0.1)  # measured: sd 0.03 px over 24 cases, worst 0.07


def test_a_local_event_does_not_pull_the_global_shift():
    rng = np.random.default_rng(1)
    scene = make_scene((320, 320), rng, peak=100, background=4)
    ref = CAMERA.ideal(shifted(scene, 0, 0)).astype(np.float32)
    cur = ref.copy()
    cur[40:90, 40:90] += 400  # a bright cell lights up; the stage did not move
    found = subpixel_shift(torch.from_numpy(cur), torch.from_numpy(ref))
    assert found is not None and max(abs(found[0]), abs(found[1])) < 0.05


def test_shift_fraction_matches_an_exact_shift_and_keeps_detail():
    rng = np.random.default_rng(2)
    scene = make_scene((320, 320), rng, peak=100, background=4)
    img = shifted(scene, 0, 0).astype(np.float32)
    exact = shifted(scene, 0.4, -0.3)
    t = torch.from_numpy(img)
    err = np.abs(shift_fraction(t, 0.4, -0.3).numpy() - exact)[4:-4, 4:-4].mean()
    assert err < 0.3 * np.abs(img - exact)[4:-4, 4:-4].mean()  # far closer than not shifting at all
    np.testing.assert_array_equal(shift_fraction(t, 0.0, 0.0).numpy(), img)


def test_average_follows_a_drifting_stage_instead_of_smearing_it():
    lapse = TimeLapse((128, 128), CAMERA, seed=3, drift=(0.3, 0.2), peak=60, background=3)
    scores: dict[bool, list[float]] = {True: [], False: []}
    counts = []
    for motion in (True, False):
        avg = TemporalAverage(8, motion=motion)
        for t in range(40):
            raw, truth = lapse.frame(t)
            noisy = truth + np.random.default_rng(t).normal(0, 6, truth.shape)  # a noisy denoiser
            out, n = avg.apply(torch.from_numpy(raw.astype(np.float32)), torch.from_numpy(noisy.astype(np.float32)))
            out = out.numpy()
            if t >= 10:
                scores[motion].append(psnr(out, truth))
                if motion:
                    counts.append(n)
    assert np.mean(counts) > 6  # registered: the history is kept ...
    assert np.mean(scores[True]) > np.mean(scores[False]) + 2  # ... and sharp, where unregistered it smears


def test_the_average_tells_still_frames_from_moved_and_changed_ones():
    """`still` feeds the multi-frame noise fit (calibrate.FieldNoise): only frames of one unmoved,
    unchanged field may be differenced."""
    def stills(lapse: TimeLapse, frames: range, avg: TemporalAverage) -> list[bool]:
        out = []
        for t in frames:
            raw, truth = lapse.frame(t)
            avg.apply(torch.from_numpy(raw.astype(np.float32)), torch.from_numpy(truth.astype(np.float32)))
            out.append(avg.still)
        return out

    static, avg = TimeLapse((128, 128), CAMERA, seed=4, drift=(0.0, 0.0), peak=60, background=3), TemporalAverage(8)
    assert stills(static, range(6), avg) == [False] + [True] * 5  # the first frame has nothing before it
    other = TimeLapse((128, 128), CAMERA, seed=9, drift=(0.0, 0.0), peak=60, background=3)
    assert stills(other, range(2), avg) == [False, True]  # a new scene, then still again
    assert stills(TimeLapse((128, 128), CAMERA, seed=4, drift=(0.4, 0.0), peak=60, background=3), range(4),
                  TemporalAverage(8)) == [False] * 4  # a drifting stage is registered, never still


def test_a_newer_noise_law_replaces_the_first_guess_through_its_correlation():
    from fm2s_stream.calibrate import estimate_noise_frames
    from fm2s_stream.noise import box_mean_variance

    lapse = TimeLapse((128, 128), CAMERA, seed=4, drift=(0.0, 0.0), peak=60, background=3)
    frames = [lapse.frame(t)[0] for t in range(8)]
    avg = TemporalAverage(8)
    avg.apply(torch.from_numpy(frames[0].astype(np.float32)), torch.from_numpy(frames[0].astype(np.float32)))
    guess = avg.noise  # the first frame's own single-frame fit
    est = estimate_noise_frames(frames)
    avg.set_noise(est)
    share = box_mean_variance(est.rho, 3)
    assert guess is not None and avg.noise != guess
    assert avg.noise == pytest.approx((est.a * share, est.b * share))
    assert share > 2.5 / 9  # the camera's correlated noise: a 3x3 mean keeps far more than a ninth of it
