import numba
import numpy as np
import pytest
import torch
from scipy import stats

from fm2s_stream.noise import M_MAX, NoiseInjector, correlate, inject_noise, poisson, tile_means
from fm2s_stream.presets import NOISE_LEVELS, PRESETS, Preset, get_preset


def _lag1(n: torch.Tensor) -> tuple[float, float]:
    """Lag-1 correlation of zero-mean-ish noise (N, C, H, W) along x and along y."""
    n = n - n.mean()
    v = float((n * n).mean())
    return float((n[..., :, 1:] * n[..., :, :-1]).mean()) / v, float((n[..., 1:, :] * n[..., :-1, :]).mean()) / v


def test_tile_means_are_per_tile_and_clamped():
    x = torch.zeros(1, 1, 10, 10)
    x[..., :5, :5] = 0.1
    x[..., 5:, 5:] = 0.9
    m = tile_means(x, 5)
    assert m[0, 0, 0, 0] == pytest.approx(0.1)
    assert m[0, 0, 9, 9] == pytest.approx(M_MAX)  # clamped to 0.15
    assert m[0, 0, 0, 9] == pytest.approx(1e-5)
    assert tile_means(torch.rand(1, 1, 13, 7), 5).shape == (1, 1, 13, 7)  # padded, then cropped


def test_noise_adapts_to_each_tile():
    """Gaussian std grows with the tile mean (k_g*m/255), so a brighter tile is noisier in absolute terms."""
    x = torch.full((1, 1, 200, 200), 0.02)
    x[..., :, 100:] = 0.12
    g = torch.Generator().manual_seed(0)
    noisy = inject_noise(x, 100, k_g=200, k_p=1e9, lambda_p=1e9, generator=g)  # Gaussian part only
    dark, bright = (noisy - x)[..., :, :100].std(), (noisy - x)[..., :, 100:].std()
    assert float(dark) == pytest.approx(200 * 0.02 / 255, rel=0.1)
    assert float(bright) == pytest.approx(200 * 0.12 / 255, rel=0.1)


def test_poisson_gain_falls_with_tile_mean():
    """Poisson part: var = x * m / k_p, i.e. relative noise is the same in every tile."""
    x = torch.full((1, 1, 200, 200), 0.02)
    x[..., :, 100:] = 0.1
    g = torch.Generator().manual_seed(1)
    noisy = inject_noise(x, 100, k_g=0, k_p=5, lambda_p=1e9, generator=g)
    var_dark = float((noisy - x)[..., :, :100].var())
    var_bright = float((noisy - x)[..., :, 100:].var())
    assert var_dark == pytest.approx(0.02 * 0.02 / 5, rel=0.15)
    assert var_bright == pytest.approx(0.1 * 0.1 / 5, rel=0.15)


def test_injection_preserves_the_mean():
    x = torch.rand(4, 2, 128, 128) * 0.5 + 0.2
    p = PRESETS["confocal"]
    noisy = NoiseInjector(p, seed=3)(x)
    assert float(noisy.mean()) == pytest.approx(float(x.mean()), abs=0.01)
    assert noisy.min() >= 0 and noisy.max() <= 1
    assert float((noisy - x).std()) > 0.01


def test_seeded_determinism():
    x = torch.rand(2, 2, 64, 64)
    p = PRESETS["twophoton"]
    a, b = NoiseInjector(p, seed=7)(x), NoiseInjector(p, seed=7)(x)
    c = NoiseInjector(p, seed=8)(x)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_presets_and_tables():
    assert get_preset("widefield").w_size == 11
    assert get_preset("srdtrans").n_chan == 6
    assert get_preset("confocal", averaged=4).k_p == NOISE_LEVELS["confocal"][4][1]
    with pytest.raises(ValueError, match="unknown preset"):
        get_preset("nope")
    with pytest.raises(ValueError, match="no table"):
        get_preset("srdtrans", averaged=2)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_injection_on_cuda_is_seeded():
    x = torch.rand(1, 2, 64, 64, device="cuda")
    p = PRESETS["confocal"]
    a = NoiseInjector(p, seed=1, device="cuda")(x)
    b = NoiseInjector(p, seed=1, device="cuda")(x)
    assert a.device.type == "cuda" and torch.equal(a, b)


def test_zero_padding_lowers_the_border_tiles_as_the_authors_code_does():
    x = torch.full((1, 1, 10, 10), 0.1)  # stride 4: the last tile row/column is half padding
    replicate, zeros = tile_means(x, 4), tile_means(x, 4, pad="zeros")
    assert torch.allclose(replicate, torch.full_like(x, 0.1))
    assert zeros[0, 0, 0, 0] == pytest.approx(0.1) and zeros[0, 0, 9, 0] == pytest.approx(0.05)
    assert zeros[0, 0, 9, 9] == pytest.approx(0.025)  # corner tile: 4 of 16 pixels are the image
    with pytest.raises(ValueError, match="pad"):
        tile_means(x, 4, pad="mirror")


@pytest.mark.parametrize("rho", [0.2, 0.58, 0.7])
def test_correlated_noise_has_the_asked_correlation_and_variance(rho):
    white = torch.randn(1, 1, 256, 256, generator=torch.Generator().manual_seed(1))
    out = correlate(white, rho)
    assert _lag1(out) == pytest.approx((rho, rho), abs=0.02)
    assert float(out.var()) == pytest.approx(float(white.var()), rel=0.03)


def test_a_preset_with_rho_injects_correlated_noise_and_old_records_read_as_white():
    x = torch.full((1, 1, 256, 256), 0.5)  # mid-range: clipping at 0 and 1 does not shrink the noise
    base = get_preset("widefield")
    white = inject_noise(x, 75, base.k_g, base.k_p, base.lambda_p, torch.Generator().manual_seed(0))
    corr = NoiseInjector(base.with_noise(base.k_g, base.k_p, base.lambda_p, rho=0.5))(x)
    assert abs(_lag1(white - x)[0]) < 0.02
    assert _lag1(corr - x) == pytest.approx((0.5, 0.5), abs=0.03)
    assert float((corr - x).var()) == pytest.approx(float((white - x).var()), rel=0.05)
    record = base.record()
    del record["rho"]  # state files written before rho existed
    assert Preset.from_record(record).rho == 0.0
    with pytest.raises(ValueError, match="rho"):
        base.with_noise(1, 1, 1, rho=0.9)


@pytest.mark.parametrize("rho", [0.0, 0.3, 0.58, 0.7])
def test_box_mean_variance_is_the_variance_of_the_3x3_mean_of_correlated_noise(rho):
    from fm2s_stream.noise import box_mean_variance
    from fm2s_stream.ops import BOX3, separable

    noise = correlate(torch.randn((1, 1, 1024, 1024), generator=torch.Generator().manual_seed(0)), rho)[0, 0]
    box = separable(noise, BOX3, BOX3)[2:-2, 2:-2]
    assert float(box.var() / noise.var()) == pytest.approx(box_mean_variance(rho, 3), rel=0.03)
    assert box_mean_variance(0.0, 3) == pytest.approx(1 / 9)


@pytest.mark.parametrize("rate", [0.05, 0.7, 3.0, 9.99, 10.0, 25.0, 180.0, 5000.0, 1e7])
def test_the_parallel_poisson_sampler_draws_poisson_counts(rate):
    """Mean and variance are the rate's (a float32 rate once gave var 0.75 x rate at 1e7: log(rate) in
    float32 precision), and below 100 the counts follow the Poisson pmf (chi-square)."""
    draws = poisson(torch.full((200_000,), rate), torch.Generator().manual_seed(1)).double().numpy()
    assert np.all(draws == np.round(draws)) and draws.min() >= 0
    n = draws.size
    assert abs(draws.mean() / rate - 1) < 5 * (1 / (rate * n)) ** 0.5
    assert abs(draws.var() / rate - 1) < 5 * ((2 + 1 / rate) / n) ** 0.5
    if rate < 100:
        ks = np.arange(0, int(rate + 8 * rate**0.5) + 8)
        expected = stats.poisson.pmf(ks, rate) * n
        keep = expected > 20
        observed = np.array([(draws == k).sum() for k in ks])
        chi2 = float(((observed[keep] - expected[keep]) ** 2 / expected[keep]).sum())
        assert stats.chi2.sf(chi2, max(1, int(keep.sum()) - 1)) > 1e-4


def test_the_parallel_poisson_sampler_is_seeded_independent_per_pixel_and_thread_count_free():
    rate = torch.rand(4, 1, 128, 128) * 300
    threads = numba.get_num_threads()
    first = poisson(rate, torch.Generator().manual_seed(5))
    numba.set_num_threads(1)
    try:
        assert torch.equal(poisson(rate, torch.Generator().manual_seed(5)), first)
    finally:
        numba.set_num_threads(threads)
    assert not torch.equal(poisson(rate, torch.Generator().manual_seed(6)), first)
    flat = poisson(torch.full((4, 1, 256, 256), 50.0), torch.Generator().manual_seed(2)) - 50.0
    for a, b in ((flat[..., 1:], flat[..., :-1]), (flat[..., 1:, :], flat[..., :-1, :]), (flat[0], flat[1])):
        assert abs(float(np.corrcoef(a.flatten().numpy(), b.flatten().numpy())[0, 1])) < 0.01
    odd = poisson(torch.tensor([0.0, -1.0, float("nan"), float("inf"), 1e30]), torch.Generator())
    assert odd.tolist() == [0.0, 0.0, 0.0, float("inf"), pytest.approx(1e30)]


def test_the_paper_schedule_draws_with_torchs_sampler_and_the_rest_with_the_parallel_one():
    from fm2s_stream.training import SCHEDULES

    assert SCHEDULES["paper"].poisson == "torch" and SCHEDULES["fast"].poisson == "parallel"
    rate = torch.rand(1, 1, 64, 64) * 40
    assert torch.equal(poisson(rate, torch.Generator().manual_seed(3), "torch"),
                       torch.poisson(rate, generator=torch.Generator().manual_seed(3)))
    with pytest.raises(ValueError, match="sampler"):
        poisson(rate, None, "numpy")
