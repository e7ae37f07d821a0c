import itertools
import json

import numpy as np
import pytest
import tifffile
from PIL import Image

from fm2s_stream import cli
from fm2s_stream.calibrate import (
    _clipped_difference_variance,
    _clipped_moments,
    _robust_line,
    calibrate,
    calibration_table,
    estimate_noise,
    estimate_noise_frames,
    fm2s_parameters,
    frame_gain_bound,
    gain_bound,
    preset_variance,
)
from fm2s_stream.presets import get_preset
from fm2s_stream.scaling import scaling_for
from fm2s_stream.synthetic import Camera, make_scene

SCENE = make_scene((512, 512), np.random.default_rng(0), peak=300, background=10)


@pytest.mark.parametrize(("gain", "read"), [(0.5, 3.0), (2.0, 1.0), (2.0, 3.0), (5.0, 1.0), (20.0, 1.0)])
def test_gain_and_read_noise_of_white_noise_cameras(gain, read):
    cam = Camera(gain=gain, read_noise=read, offset=100.0)
    est = estimate_noise(cam.expose(SCENE, np.random.default_rng(1)))
    assert est.a == pytest.approx(gain, rel=0.10)
    assert est.read_noise_electrons(100.0) == pytest.approx(read, rel=0.2)
    assert est.rho < 0.1


def test_gain_within_ten_percent_over_the_whole_grid():
    # the grid: gains 0.5-20 ADU/e-, read noise 1-10 e-, 16 and 8 bit, white and correlated noise
    errors = {}
    for bits, gains in ((16, (0.5, 2.0, 5.0, 20.0)), (8, (0.5, 0.8))):
        for gain in gains:
            for read in (1.0, 3.0, 10.0):
                for corr in (0.0, 0.7):
                    cam = Camera(gain=gain, read_noise=read, offset=100.0 if bits == 16 else 10.0, bit_depth=bits,
                                 correlation=corr)
                    frame = cam.expose(SCENE * (0.5 if bits == 8 else 1.0), np.random.default_rng(100))
                    errors[(bits, gain, read, corr)] = estimate_noise(frame).a / gain - 1
    assert max(abs(e) for e in errors.values()) < 0.10, {k: round(v, 3) for k, v in errors.items() if abs(v) >= 0.1}


def test_a_dim_field_with_correlated_noise_keeps_its_gain():
    # most tiles are background of one level; correlated noise makes their 8x8 means ~5x noisier, and
    # binned by their own means they flattened the slope: -47 % gain, -38 % variance at mid level.
    # Binned by their neighbours' level they do not (the camera blurs its signal as it correlates its noise).
    # What is left, -8..-10 %, is mostly the lag-1 correlation's estimate (0.56 for a true 0.58)
    from scipy import ndimage

    cam = Camera(gain=2.0, read_noise=1.0, offset=100.0, correlation=0.7)
    lam = ndimage.gaussian_filter(make_scene((512, 512), np.random.default_rng(0), peak=30, background=1), 0.7)
    mid = 100.0 + 2.0 * 15.0
    true_var = 2.0 * (mid - 100.0) + 4.0 + 1.0 / 12.0
    for draw in range(3):
        est = estimate_noise(cam.expose(lam, np.random.default_rng(100 + draw)))
        assert est.rho > 0.5
        assert est.a == pytest.approx(2.0, rel=0.12), (draw, est.a)
        assert float(est.variance(mid)) == pytest.approx(true_var, rel=0.12), (draw, float(est.variance(mid)))


def test_a_small_correlated_frame_falls_back_to_binning_by_its_own_levels():
    # 128x128: too few tiles agree with their neighbours to fill the bins (31 for this draw), which
    # left too few to fit at all; binned by their own levels there are 67
    cam = Camera(gain=2.0, read_noise=2.0, offset=100.0, correlation=0.7)
    scene = make_scene((128, 128), np.random.default_rng(0), peak=80, background=5, cells=2)
    est = estimate_noise(cam.expose(scene, np.random.default_rng(2)))
    assert est.tiles_used >= 64 and est.a > 0


@pytest.mark.parametrize(("bits", "gain"), [(8, 0.5), (16, 2.0)])
def test_read_noise_dominated_correlated_cameras_are_unbiased(bits, gain):
    # one frame pins the gain only to +-6..11 % here (its variance spans 25..44 ADU^2): the mean over
    # draws shows the bias. It was +16 % / +10 % while bright structured bins and the univariate
    # clipping model pushed the slope up
    cam = Camera(gain=gain, read_noise=10.0, offset=10.0 if bits == 8 else 100.0, bit_depth=bits, correlation=0.7)
    scene = SCENE * (0.5 if bits == 8 else 1.0)
    errors = [estimate_noise(cam.expose(scene, np.random.default_rng(100 + d))).a / gain - 1 for d in range(10)]
    assert abs(np.mean(errors)) < 0.06, np.round(errors, 3)


@pytest.mark.parametrize(("mu", "var", "rho"), [(1.0, 4.0, 0.6), (0.5, 1.0, 0.9), (10.0, 25.0, 0.58), (2.0, 1.0, 0.0)])
def test_clipped_difference_variance_matches_sampling(mu, var, rho):
    rng = np.random.default_rng(0)
    z1 = rng.normal(size=2_000_000)
    z2 = rho * z1 + np.sqrt(1 - rho * rho) * rng.normal(size=z1.size)
    x1, x2 = (np.maximum(mu + np.sqrt(var) * z, 0.0) for z in (z1, z2))
    sampled = np.mean((x1 - x2) ** 2) / (2 * (1 - rho))
    predicted = _clipped_difference_variance(np.array([mu]), np.array([var]), rho)[0]
    assert predicted == pytest.approx(sampled, rel=0.01)
    if rho > 0:  # correlated neighbours clip together: their differences shrink less than the pixels' variance
        assert predicted > _clipped_moments(np.array([mu]), np.array([var]))[1][0]


def test_bins_above_the_line_are_dropped_from_the_fit():
    x = np.linspace(10.0, 50.0, 12)
    y = 0.5 * x + 20.0
    y[-2:] *= [1.4, 1.9]  # bright structured bins: variance that is not noise
    wt = np.full(x.size, 100.0)
    a, b, use = _robust_line(x, y, wt, np.full(x.size, 0.2))
    assert list(use) == [True] * 10 + [False, False]
    assert a == pytest.approx(0.5, rel=1e-6) and b == pytest.approx(20.0, rel=1e-6)


def test_frames_clipped_at_zero_are_fitted_through_the_clipping():
    cam = Camera(gain=20.0, read_noise=10.0, offset=100.0)  # read noise of 200 ADU above an offset of 100
    frame = cam.expose(SCENE, np.random.default_rng(7))
    assert (frame == 0).mean() > 0.01
    est = estimate_noise(frame)
    assert est.clipped and est.a == pytest.approx(20.0, rel=0.12)  # read-noise dominated: +-8 % between draws
    dark = float(np.median(frame))
    assert est.observed_variance(dark) < float(est.variance(dark))  # what the frame shows is squeezed by the clip
    assert est.observed_variance(5000.0) == pytest.approx(float(est.variance(5000.0)), rel=1e-3)  # far from 0: none


def test_a_frame_with_no_pixel_at_zero_is_not_fitted_through_clipping():
    """Photon counting (a PMT's offset, no read noise): the dark tiles lie within 3 noise std of 0 but
    nothing was clipped, and no pixel sits at 0; the same dark field with read noise is clipped."""
    dim = make_scene((512, 512), np.random.default_rng(3), peak=12, background=0.3)
    counting = Camera(gain=20.0, read_noise=0.0, offset=3.0, bit_depth=8).expose(dim, np.random.default_rng(5))
    assert counting.min() > 0
    est = estimate_noise(counting)
    assert not est.clipped and est.a == pytest.approx(20.0, rel=0.1)
    clipped = Camera(gain=20.0, read_noise=0.5, offset=3.0, bit_depth=8).expose(dim, np.random.default_rng(5))
    assert (clipped == 0).mean() > 0.01 and estimate_noise(clipped).clipped


def test_a_real_confocal_frame_gets_the_gain_its_residual_shows(shared_data):
    """FMD confocal raw (no pixel at 0): the single-frame gain against the slope of var(raw - truth) over
    the truth's level. A fit through clipping that was not there read it 2x (40 ADU/e- against 21)."""
    fmd = shared_data / "fmd"
    raw = np.asarray(Image.open(fmd / "raw" / "Confocal_FISH_1.png"))
    truth = np.asarray(Image.open(fmd / "gt" / "Confocal_FISH_1.png")).astype(np.float64)
    residual = raw - truth
    edges = np.quantile(truth, np.linspace(0.05, 0.99, 12))
    levels, variances = [], []
    for lo, hi in itertools.pairwise(edges):
        sel = (truth >= lo) & (truth < hi)
        levels.append(raw[sel].mean())
        variances.append(residual[sel].var())
    gain = np.polyfit(levels, variances, 1)[0]
    assert 18 < gain < 24  # the FMD confocal camera: ~21 ADU per photon
    est = estimate_noise(raw)
    assert not est.clipped and est.a == pytest.approx(gain, rel=0.25)


def test_correlated_noise_is_detected():
    est = estimate_noise(Camera(gain=2.0, read_noise=3.0, correlation=0.7).expose(SCENE, np.random.default_rng(2)))
    assert est.rho > 0.3


def test_derived_parameters_scale_with_the_noise():
    quiet = Camera(gain=1.0, read_noise=1.0).expose(SCENE * 4, np.random.default_rng(3))
    noisy = Camera(gain=4.0, read_noise=1.0).expose(SCENE, np.random.default_rng(3))
    p_quiet = fm2s_parameters(estimate_noise(quiet), quiet)
    p_noisy = fm2s_parameters(estimate_noise(noisy), noisy)
    assert p_noisy.lambda_p < p_quiet.lambda_p and p_noisy.k_p < p_quiet.k_p  # stronger injection
    x = 0.1
    assert preset_variance(p_noisy, x) > 1.5 * preset_variance(p_quiet, x)
    assert scaling_for(noisy).span > 0 and get_preset("confocal").n_chan == p_noisy.n_chan


def test_calibrate_cli_prints_a_table_or_json_with_the_contract_keys(tmp_path, capsys):
    path = tmp_path / "f.tif"
    tifffile.imwrite(path, Camera(gain=2.0, read_noise=2.0).expose(SCENE, np.random.default_rng(4)))
    assert cli.main(["calibrate", str(path), "--offset", "100"]) == 0
    table = capsys.readouterr().out
    assert "gain" in table and "ADU/e-" in table and "read noise" in table and "FM2S parameters" in table
    assert cli.main(["calibrate", str(path), "--offset", "100", "--json"]) == 0
    out = json.loads(capsys.readouterr().out.strip())
    assert {"a", "gain_adu_per_e", "b", "offset", "read_noise_e", "rho", "fm2s"} <= set(out)
    assert 0 < out["gain_sd_bound"] < 0.02  # shot noise dominates this camera: one frame can pin its gain
    assert out["gain_adu_per_e"] == out["a"] == pytest.approx(2.0, rel=0.15) and out["offset"] == 100
    # the law is var = a * (level - offset) + b: b is the read-noise variance, here (2 ADU/e- x 2 e-)^2
    assert out["b"] == pytest.approx(16.0, rel=0.5) and out["read_noise_e"] == pytest.approx(2.0, rel=0.3)


@pytest.mark.parametrize(("gain", "read", "corr", "bits"), [(5.0, 3.0, 0.0, 16), (20.0, 10.0, 0.7, 16),
                                                            (0.5, 10.0, 0.7, 8)])
def test_eight_frames_of_one_field_pin_the_gain_within_3_percent(gain, read, corr, bits):
    scene = make_scene((256, 256), np.random.default_rng(0), peak=300, background=10)
    cam = Camera(gain=gain, read_noise=read, offset=100.0 if bits == 16 else 10.0, correlation=corr, bit_depth=bits)
    rng = np.random.default_rng(1)
    est = estimate_noise_frames([cam.expose(scene, rng) for _ in range(8)])
    assert est.a == pytest.approx(gain, rel=0.04), est
    assert est.frames == 8 and abs(est.rho - (0.58 if corr else 0.0)) < 0.08


def test_eight_frames_of_a_dim_sparse_field_pin_the_gain_despite_its_one_level_background():
    """Most tiles of a dim field are background of one true level. Binned by their own noisy level they
    spread along the level axis at one variance and flatten the slope (this cell was -15 % before the
    pairs were binned by the other frames' level)."""
    from scipy import ndimage

    scene = make_scene((256, 256), np.random.default_rng(0), peak=30, background=1)
    cam = Camera(gain=2.0, read_noise=1.0, offset=100.0, correlation=0.7)
    lam = ndimage.gaussian_filter(scene, 0.7)  # a camera that correlates its noise blurs the signal with it
    rng = np.random.default_rng(1)
    est = estimate_noise_frames([cam.expose(lam, rng) for _ in range(8)])
    assert est.a == pytest.approx(2.0, rel=0.03), est


def test_a_variance_that_falls_with_the_level_gives_a_flat_law_through_the_bins():
    from fm2s_stream.calibrate import _robust_line

    x = np.array([100.0, 101.0, 102.0, 103.0])
    y = np.array([26.0, 25.5, 25.0, 24.5])
    a, b, use = _robust_line(x, y, np.full(4, 100.0), np.full(4, 0.2))
    assert a == 0.0 and b == pytest.approx(25.25, abs=0.3) and use.all(), (a, b)


def test_a_t_axis_gives_one_estimate_and_plot_draws_the_curve(tmp_path, capsys):
    scene = make_scene((128, 128), np.random.default_rng(0), peak=300, background=10)
    cam, rng = Camera(gain=5.0, read_noise=3.0, offset=100.0), np.random.default_rng(2)
    path, plot = tmp_path / "t.tif", tmp_path / "ptc.png"
    tifffile.imwrite(path, np.stack([cam.expose(scene, rng) for _ in range(6)]))
    assert cli.main(["calibrate", str(path), "--json", "--plot", str(plot)]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 1 and json.loads(lines[0])["frames"] == 6
    with Image.open(plot) as img:
        assert img.size[0] > 300 and img.size[1] > 200


def test_auto_preset_follows_the_noise_structure_and_strength():
    from fm2s_stream.calibrate import auto_preset

    rng = np.random.default_rng(3)
    white = auto_preset(Camera(gain=2.0, read_noise=2.0).expose(SCENE, rng))
    correlated = auto_preset(Camera(gain=2.0, read_noise=2.0, correlation=0.8).expose(SCENE, rng))
    assert white.n_chan == 2 and white.name == "auto(confocal)"
    assert correlated.n_chan == 1 and correlated.w_size == 11 and correlated.name == "auto(widefield)"
    assert white.rho == 0.0  # white noise is injected white, correlated noise correlated like the frame's
    assert correlated.rho == pytest.approx(estimate_noise(Camera(gain=2.0, read_noise=2.0, correlation=0.8)
                                                          .expose(SCENE, rng)).rho, abs=0.05)
    noisy = auto_preset(Camera(gain=8.0, read_noise=2.0).expose(SCENE / 4, rng))  # 4x fewer photons
    assert noisy.k_p < white.k_p  # stronger Poisson injection for the noisier frame
    flat = np.full((64, 64), 1000, np.uint16)  # nothing to fit: the base preset, not a crash
    assert auto_preset(flat).name == "confocal"


@pytest.mark.slow
def test_serve_with_auto_preset_calibrates_each_channel(tmp_path):
    from fm2s_stream.frame import Frame
    from tests.streamkit import Client, start_service

    service = start_service(preset="auto")
    client = Client(service)
    rng = np.random.default_rng(4)
    scene = make_scene((256, 256), rng, peak=100, background=5)  # rho is biased upwards below ~200 px (see notes)
    cams = {"white": Camera(gain=2.0), "widefield": Camera(gain=2.0, correlation=0.8)}
    for i in range(6):
        for name, cam in cams.items():
            client.send(Frame(cam.expose(scene, rng), channel=name, t=i, frame_id=2 * i + (name == "widefield")))
    assert client.wait(12)
    report = service.stop()
    client.close()
    presets = {name: ch["preset"] for name, ch in report["channels"].items()}
    assert presets["white"]["name"] == "auto(confocal)" and presets["white"]["n_chan"] == 2
    assert presets["widefield"]["name"] == "auto(widefield)" and presets["widefield"]["n_chan"] == 1


def test_frames_where_a_cell_moves_still_pin_the_gain():
    """A stream's still frames may hold a moving cell: its tiles' differences are the scene's, not
    noise, and are left out of their bins (CHANGED_TILE); with them in, the gain came out 2.90."""
    scene = make_scene((256, 256), np.random.default_rng(0), peak=300, background=10)
    cam = Camera(gain=2.0, read_noise=2.0, offset=100.0)
    yy, xx = np.mgrid[:256, :256]
    rng = np.random.default_rng(1)
    frames = []
    for t in range(8):  # a bright 20-pixel cell crossing the field, 6 pixels a frame (~2 % of the tiles)
        cell = 400.0 * np.exp(-((yy - 128) ** 2 + (xx - 40 - 6 * t) ** 2) / (2 * 10.0**2))
        frames.append(cam.expose(scene + cell, rng))
    est = estimate_noise_frames(frames)
    assert est.a == pytest.approx(2.0, rel=0.03), est


def test_field_noise_fits_each_full_window_of_still_frames_and_restarts_on_a_moved_one():
    from fm2s_stream.calibrate import FieldNoise

    cam = Camera(gain=5.0, read_noise=2.0, offset=100.0)
    rng = np.random.default_rng(2)
    field = FieldNoise(frames=8, side=256)
    for i in range(7):  # the first frame of a stream has nothing before it: not still
        field.add(cam.expose(SCENE, rng), still=i > 0)
    assert not field.due and field.take() is None
    field.add(cam.expose(SCENE, rng), still=False)  # the stage moved: a new window starts here
    for _ in range(6):
        field.add(cam.expose(SCENE, rng), still=True)
    field.add(cam.expose(SCENE, rng), still=True, where=(1, 0))  # another stage position: afresh again
    assert not field.due
    for _ in range(7):
        field.add(cam.expose(SCENE, rng), still=True, where=(1, 0))
    est = field.take()
    assert est is not None and est.frames == 8 and est.tiles_used > 7000  # 7 pairs of a 256x256 centre
    assert est.a == pytest.approx(5.0, rel=0.03), est
    assert field.fits == 1 and field.latest is est and not field.due and field.take() is None


def test_a_stream_learns_its_cameras_noise_law_from_its_still_frames():
    """One estimator: a channel's still frames are fitted as `calibrate` fits a T axis, and the fit
    becomes the temporal average's noise model and (--preset auto) the re-calibrations' law."""
    from dataclasses import replace

    import torch

    from fm2s_stream.channel import Channel, channel_config
    from fm2s_stream.noise import box_mean_variance

    cam = Camera(gain=3.0, read_noise=2.0, offset=100.0)
    scene = make_scene((256, 256), np.random.default_rng(0), peak=200, background=10)
    rng = np.random.default_rng(1)
    config = replace(channel_config("auto", device=torch.device("cpu")), recalibrate_every=10)
    channel = Channel("c", config, cam.expose(scene, rng))
    first = channel.noise
    recalibrated = []
    for _ in range(10):
        prep = channel.prepare(cam.expose(scene, rng))
        channel.answer(prep)
        recalibrated.append(channel.maintain(prep))
    assert first is not None and first.frames == 1
    assert channel.field.fits == 1 and channel.noise is not None and channel.noise.frames == 8
    assert channel.noise.a == pytest.approx(3.0, rel=0.03), channel.noise
    share = box_mean_variance(channel.noise.rho, 3)
    assert channel.post.average.noise == pytest.approx((channel.noise.a * share, channel.noise.b * share))
    assert recalibrated == [False] * 9 + [True]
    assert channel.stats()["noise"]["frames"] == 8


def test_gain_bound_is_the_spread_of_the_best_estimate_from_two_known_levels():
    # pixels at two known levels: the two sample variances are sufficient and their difference over the
    # level step is the efficient unbiased gain estimate, so its spread over draws is the Cramer-Rao bound
    a, b, lv, n = 2.0, 100.0, np.array([20.0, 200.0]), 4000
    rng = np.random.default_rng(0)
    draws = rng.normal(0.0, np.sqrt(a * lv + b)[:, None, None], (2, 1000, n))
    var = (draws**2).mean(axis=2)  # the levels are known: deviations from them, not from the sample mean
    spread = np.std((var[1] - var[0]) / (lv[1] - lv[0])) / a
    assert gain_bound(lv, a, b, pixels=n) == pytest.approx(spread, rel=0.08)
    assert gain_bound(lv, a, b, pixels=4 * n) == pytest.approx(gain_bound(lv, a, b, pixels=n) / 2)


def test_calibrate_says_when_one_frame_cannot_pin_the_gain():
    dim = make_scene((512, 512), np.random.default_rng(0), peak=30, background=1)
    shot = Camera(gain=2.0, read_noise=1.0).expose(dim, np.random.default_rng(1))
    read = Camera(gain=2.0, read_noise=10.0).expose(dim, np.random.default_rng(1))
    law = 2.0, 4.0 - 2.0 * 100  # var = 2 (level - 100) + (2 x 1)^2
    assert frame_gain_bound([shot], *law) < 0.02
    assert frame_gain_bound([read], 2.0, 400.0 - 200.0) > 0.05  # read noise 10 e-: shot is ~10 % of the variance
    assert frame_gain_bound([read] * 8, 2.0, 200.0) == pytest.approx(frame_gain_bound([read], 2.0, 200.0) / np.sqrt(8))
    assert gain_bound(np.full(100, 50.0), 2.0, 10.0) == np.inf  # one level: gain and read noise cannot be told apart
    table = calibration_table(calibrate(read, offset=100))
    assert "read noise swamps the shot noise" in table and "frames)" in table
    assert "read noise swamps" not in calibration_table(calibrate(shot, offset=100))
