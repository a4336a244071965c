"""pipeline.data.noise: statistics of each model, clipping policy, spec parsing, seeding."""
import math

import pytest
import torch

from pipeline.data.noise import GaussianNoise, ImpulseNoise, PoissonNoise, parse_noise


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def grey_levels():
    """(4, 1, 128, 128) images of constant levels 0, 0.25, 0.5, 1 (float64)."""
    return torch.tensor([0.0, 0.25, 0.5, 1.0], dtype=torch.float64).view(4, 1, 1, 1).expand(4, 1, 128, 128)


def test_gaussian_mean_and_variance_unclipped():
    clean = grey_levels()
    noisy = GaussianNoise(25, 25).apply(clean, gen())
    err = (noisy - clean).flatten(1)
    sigma = 25 / 255
    n = err.shape[1]
    # mean within 5 standard errors of 0, variance within 5 standard errors of sigma^2
    assert err.mean(1).abs().max() < 5 * sigma / math.sqrt(n)
    assert (err.var(1) - sigma**2).abs().max() < 5 * sigma**2 * math.sqrt(2 / n)
    # unclipped: at black and white the noisy mean is still the clean value (unbiased targets)
    assert noisy[0].min() < 0 and noisy[3].max() > 1
    assert noisy.flatten(1).mean(1)[[0, 3]].sub(torch.tensor([0.0, 1.0], dtype=torch.float64)).abs().max() < 0.002


def test_clipped_gaussian_is_in_range_and_biased_at_the_ends():
    clean = grey_levels()
    noisy = parse_noise("gaussian:25,clip").apply(clean, gen())
    assert noisy.min() >= 0 and noisy.max() <= 1
    means = noisy.flatten(1).mean(1)
    sigma = 25 / 255
    # E[max(0, N(0, s))] = s / sqrt(2 pi): the bias the training pairs avoid by not clipping
    assert means[0].item() == pytest.approx(sigma / math.sqrt(2 * math.pi), rel=0.03)
    assert means[3].item() == pytest.approx(1 - sigma / math.sqrt(2 * math.pi), rel=0.01)
    assert means[2].item() == pytest.approx(0.5, abs=0.002)  # mid-grey barely touched


def test_gaussian_range_draws_sigma_per_image():
    clean = torch.full((400, 1, 64, 64), 0.5, dtype=torch.float64)
    noisy = GaussianNoise(0, 50).apply(clean, gen())
    sigmas = (noisy - clean).flatten(1).std(1) * 255
    assert sigmas.min() < 5 and sigmas.max() > 45 and sigmas.max() < 50 * 1.05  # sample std: ~1% error
    # uniform on [0, 50]: mean 25, std 50 / sqrt(12)
    assert sigmas.mean().item() == pytest.approx(25, abs=3 * 50 / math.sqrt(12) / math.sqrt(400) + 0.5)
    single = GaussianNoise(10, 40).apply(clean[0], gen())
    assert single.shape == clean[0].shape


def test_poisson_mean_and_variance():
    clean = grey_levels()
    photons = 30
    noisy = PoissonNoise(photons).apply(clean, gen())
    n = 128 * 128
    levels = torch.tensor([0.0, 0.25, 0.5, 1.0], dtype=torch.float64)
    mean, var = noisy.flatten(1).mean(1), noisy.flatten(1).var(1)
    assert noisy[0].eq(0).all()  # no photons, no noise
    for k in range(1, 4):
        v = levels[k] / photons  # Var[Poisson(p x) / p] = x / p
        assert abs(mean[k] - levels[k]) < 5 * math.sqrt(v / n)
        assert abs(var[k] - v) < 0.05 * v
    # values are multiples of 1/photons; unclipped white exceeds 1
    assert torch.allclose(noisy * photons, (noisy * photons).round())
    assert noisy[3].max() > 1
    assert parse_noise("poisson:30", clip=True).apply(clean, gen()).max() <= 1


def test_impulse_fraction_and_values():
    clean = torch.full((1, 3, 200, 200), 0.5)
    noisy = ImpulseNoise(0.1).apply(clean, gen())
    changed = noisy != clean
    assert changed.float().mean().item() == pytest.approx(0.1, abs=0.005)
    hits = noisy[changed]
    assert hits.min() >= 0 and hits.max() <= 1
    assert hits.mean().item() == pytest.approx(0.5, abs=0.01)  # uniform replacement values
    assert hits.var().item() == pytest.approx(1 / 12, rel=0.05)


@pytest.mark.parametrize("spec", ["gaussian:25", "gaussian:0-50", "poisson:30", "impulse:0.1"])
def test_same_generator_seed_same_noise_and_different_seed_different(spec):
    clean = torch.rand(2, 3, 8, 8)
    model = parse_noise(spec)
    a, b, c = (model.apply(clean, gen(s)) for s in (7, 7, 8))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a.shape == clean.shape and a.dtype == clean.dtype


def test_two_draws_from_one_generator_are_independent():
    clean = torch.full((1, 64, 64), 0.5, dtype=torch.float64)
    g = gen(3)
    n1 = GaussianNoise(25, 25).apply(clean, g) - clean
    n2 = GaussianNoise(25, 25).apply(clean, g) - clean
    corr = (n1 * n2).mean() / (n1.std() * n2.std())
    assert abs(corr.item()) < 5 / 64  # 5 standard errors of a zero correlation


def test_parse_noise_specs():
    assert parse_noise("gaussian:25") == GaussianNoise(25, 25)
    assert parse_noise("gaussian:0-50") == GaussianNoise(0, 50)
    assert parse_noise("poisson:30") == PoissonNoise(30)
    assert parse_noise("impulse:0.1") == ImpulseNoise(0.1)
    assert parse_noise("Gaussian:25,clip") == GaussianNoise(25, 25, clip=True)
    assert parse_noise("gaussian:25").clipped().clip
    for m in (GaussianNoise(25, 25), GaussianNoise(0, 50, True), PoissonNoise(30), ImpulseNoise(0.1)):
        assert parse_noise(m.spec) == m
    for bad in ["gaussian", "gaussian:x", "gaussian:50-10", "poisson:0", "impulse:2", "speckle:3"]:
        with pytest.raises(ValueError, match="noise spec|sigma|photons|fraction"):
            parse_noise(bad)
