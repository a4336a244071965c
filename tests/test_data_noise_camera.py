"""Noise of real photos: 8-bit storage, JPEG, camera pipeline, grain, mixtures, and unbiased targets."""
import math

import pytest
import torch

from pipeline.data.camera_noise import (
    CameraNoise, GrainNoise, bayer_masks, demosaic, develop, draw_camera, inverse_tone_curve, mosaic, tone_curve,
    tone_curve_slope, unprocess,
)
from pipeline.data.noise import GaussianNoise, Mixture, PRESETS, Stored, jpeg_roundtrip, parse_noise


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def levels_image(size=96):
    """(4, 3, size, size) float64 constant images at 0, 0.25, 0.5 and 1."""
    return torch.tensor([0.0, 0.25, 0.5, 1.0], dtype=torch.float64).view(4, 1, 1, 1).expand(4, 3, size, size)


def smooth_image(size=64, seed=0):
    """(3, size, size) float64 smooth colour image in [0.05, 0.95]."""
    g = gen(seed)
    low = torch.rand((1, 3, 4, 4), generator=g, dtype=torch.float64)
    up = torch.nn.functional.interpolate(low, size=(size, size), mode="bilinear", align_corners=True)[0]
    return 0.05 + 0.9 * up


# ------------------------------------------------------------------------------ 8-bit storage
def test_8bit_input_is_stored_codes_and_target_is_unclipped_and_unbiased():
    clean = levels_image()
    model = parse_noise("gaussian:25,8bit")
    assert isinstance(model, Stored) and model.base == GaussianNoise(25, 25)
    inp, tgt = model.pair(clean, gen())
    assert inp.min() >= 0 and inp.max() <= 1
    assert torch.equal(inp, torch.round(inp * 255) / 255), "input must be on the 8-bit levels"
    assert torch.equal(tgt, torch.round(tgt * 255) / 255), "target is rounded to k/255 too"
    assert tgt[0].min() < 0 and tgt[3].max() > 1, "target must not be clipped"
    sigma, n = 25 / 255, clean[0].numel()
    target_bias = (tgt - clean).flatten(1).mean(1)
    assert target_bias.abs().max() < 5 * sigma / math.sqrt(n) + 1 / 255 / math.sqrt(n), target_bias
    # the stored input is biased at black and white exactly as a clipped Gaussian: the reason
    input_bias = (inp - clean).flatten(1).mean(1)
    assert input_bias[0].item() == pytest.approx(sigma / math.sqrt(2 * math.pi), rel=0.05)
    assert input_bias[3].item() == pytest.approx(-sigma / math.sqrt(2 * math.pi), rel=0.05)
    assert abs(input_bias[2].item()) < 0.002


def test_pairs_without_options_are_two_measurements_in_the_old_order():
    clean = smooth_image()
    model = GaussianNoise(0, 50)
    g1, g2 = gen(4), gen(4)
    inp, tgt = model.pair(clean, g1)
    assert torch.equal(inp, model.apply(clean, g2)) and torch.equal(tgt, model.apply(clean, g2))


def test_clip_option_clips_the_input_only():
    clean = levels_image()
    inp, tgt = parse_noise("gaussian:25,clip").pair(clean, gen())
    assert inp.min() >= 0 and inp.max() <= 1
    assert tgt.min() < 0 and tgt.max() > 1


def test_jpeg_option_compresses_the_input_at_a_drawn_quality():
    clean = smooth_image(64)
    model = parse_noise("gaussian:10,jpeg=60-95")
    inp = model.apply(clean, gen(1))
    stored_only = parse_noise("gaussian:10,8bit").apply(clean, gen(1))
    assert not torch.equal(inp, stored_only)
    assert torch.equal(inp, torch.round(inp * 255) / 255)
    # JPEG removes much of the white noise's high frequencies: closer to clean than the stored input
    assert (inp - clean).pow(2).mean() < (stored_only - clean).pow(2).mean()
    assert torch.equal(inp, model.apply(clean, gen(1))), "same generator, same quality and noise"
    _, tgt = model.pair(clean, gen(1))
    assert torch.equal(tgt, torch.round(tgt * 255) / 255) and (tgt.min() < 0.05 or tgt.max() > 0.95)
    grey = jpeg_roundtrip(clean[:1], 90)
    assert grey.shape == (1, 64, 64)


# ------------------------------------------------------------------------------ camera pipeline
def test_tone_curve_inverts_and_its_slope_is_the_derivative():
    x = torch.linspace(0, 1, 1001, dtype=torch.float64)
    assert torch.allclose(tone_curve(inverse_tone_curve(x)), x, atol=1e-6)  # 1e-8 floor before the gamma
    lin = torch.linspace(0.002, 0.998, 200, dtype=torch.float64)
    finite = (tone_curve(lin + 1e-7) - tone_curve(lin - 1e-7)) / 2e-7
    torch.testing.assert_close(tone_curve_slope(lin), finite, rtol=1e-5, atol=1e-6)


def test_demosaic_is_exact_on_constant_colour_and_keeps_the_known_sites():
    rgb = torch.tensor([0.2, 0.5, 0.8], dtype=torch.float64).view(3, 1, 1).expand(3, 10, 12)
    torch.testing.assert_close(demosaic(mosaic(rgb)), rgb.contiguous())
    raw = torch.rand((1, 9, 11), generator=gen(), dtype=torch.float64)
    full = demosaic(raw)
    masks = bayer_masks(9, 11)
    for c in range(3):
        torch.testing.assert_close(full[c][masks[c] > 0], raw[0][masks[c] > 0])


def test_camera_development_without_noise_gives_back_the_clean_image():
    clean = smooth_image(64)
    camera = draw_camera(gen(3))
    assert torch.allclose(camera.rgb_to_camera.sum(1), torch.ones(3, dtype=torch.float64))
    back = develop(unprocess(clean, camera), camera)
    error = (back - clean).abs()[:, 2:-2, 2:-2]
    # a smooth image: bilinear demosaicing is nearly exact (its error sits at the image's kinks)
    assert float(error.mean()) < 0.002 and float(error.flatten().quantile(0.99)) < 0.02


def test_camera_noise_is_signal_dependent_correlated_and_in_range():
    model = CameraNoise()
    clean = levels_image(64)[1:3]  # 0.25 and 0.5
    g = gen(5)
    inp = model.apply(clean, g)
    assert inp.shape == clean.shape and inp.min() >= 0 and inp.max() <= 1
    # one camera per image: fixed levels, so the noise spreads; horizontal neighbours correlate (demosaicing)
    noise = (inp[0] - clean[0])[:, 4:-4, 4:-4]
    a, b = noise[..., :-1].flatten(), noise[..., 1:].flatten()
    corr = float(((a - a.mean()) * (b - b.mean())).mean() / (a.std() * b.std()))
    assert corr > 0.2, corr
    # brighter signal, more shot noise (same camera: same generator state)
    dark = model.apply(torch.full((3, 64, 64), 0.1, dtype=torch.float64), gen(7))
    bright = model.apply(torch.full((3, 64, 64), 0.6, dtype=torch.float64), gen(7))
    assert (bright - 0.6).std() > (dark - 0.1).std() * 0.5  # tone curve flattens highlights; still noisier raw
    grey = model.apply(torch.full((1, 16, 16), 0.5), gen())
    assert grey.shape == (3, 16, 16) and grey.dtype == torch.float32


def test_camera_target_has_the_clean_mean_and_the_input_does_not_at_black():
    model = CameraNoise()
    clean = torch.full((3, 24, 24), 0.02, dtype=torch.float64)
    g = gen(11)
    inputs, targets = zip(*(model.pair(clean, g) for _ in range(300)))
    target_mean = torch.stack(targets).mean()
    input_mean = torch.stack(inputs).mean()
    spread = torch.stack(targets).std() / math.sqrt(300 * 3 * 24 * 24)
    assert abs(float(target_mean) - 0.02) < 6 * float(spread) + 1e-4, (float(target_mean), float(spread))
    assert float(input_mean) - 0.02 > 20 * float(spread), "clipping at black must bias the measurement up"


def test_camera_draws_depend_on_the_generator_only():
    clean = smooth_image(32)
    model = parse_noise("camera,8bit")
    a, b, c = (model.pair(clean, gen(s)) for s in (1, 1, 2))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) and not torch.equal(a[0], c[0])


# ------------------------------------------------------------------------------ grain
def test_grain_has_the_asked_sigma_and_grows_coarser_with_its_size():
    zeros = torch.zeros((3, 160, 160), dtype=torch.float64)
    fine = GrainNoise(20, 20, 0.5, 0.5).apply(zeros, gen(1))[:, 12:-12, 12:-12]
    coarse = GrainNoise(20, 20, 2.0, 2.0).apply(zeros, gen(1))[:, 12:-12, 12:-12]
    for n in (fine, coarse):
        assert float(n.std() * 255) == pytest.approx(20, rel=0.08)

    def lag1(n):
        a, b = n[..., :-1].flatten(), n[..., 1:].flatten()
        return float((a * b).mean() / (a.std() * b.std()))
    # a Gaussian of std s blurring white noise twice over: correlation at lag 1 is exp(-1 / (4 s^2))
    assert lag1(coarse) == pytest.approx(math.exp(-1 / 16), abs=0.05)
    assert lag1(fine) < lag1(coarse)


def test_grain_target_is_an_independent_draw_with_the_clean_mean():
    clean = torch.full((3, 64, 64), 0.5, dtype=torch.float64)
    inp, tgt = GrainNoise(20, 20, 1.0, 1.0, clip=True).pair(clean, gen(2))
    a, b = (inp - clean).flatten(), (tgt - clean).flatten()
    assert abs(float((a * b).mean() / (a.std() * b.std()))) < 0.1
    assert abs(float(b.mean())) < 0.01


# ------------------------------------------------------------------------------ mixtures and specs
def test_mixture_draws_components_by_weight():
    model = parse_noise("gaussian:0@3 | gaussian:50@1")
    assert isinstance(model, Mixture)
    clean = torch.full((1, 8, 8), 0.5, dtype=torch.float64)
    g = gen(0)
    noisy = [model.apply(clean, g) for _ in range(2000)]
    share = sum(bool((n != clean).any()) for n in noisy) / 2000
    assert share == pytest.approx(0.25, abs=0.03)


@pytest.mark.parametrize("spec", ["gaussian:0-50,8bit", "gaussian:25,jpeg=80", "camera", "camera:0.001-0.01,8bit",
                                  "grain:0-25,size=1-3,jpeg=60-95", "poisson:30,clip", "photo",
                                  "gaussian:10@1 | camera,8bit@2.5"])
def test_specs_round_trip(spec):
    model = parse_noise(spec)
    assert parse_noise(model.spec) == model


def test_the_photo_preset_parses_and_draws_every_kind():
    model = parse_noise("photo")
    assert model == parse_noise(PRESETS["photo"])
    kinds = {type(m.base if isinstance(m, Stored) else m).__name__ for m, _ in model.components}
    assert kinds == {"GaussianNoise", "CameraNoise", "GrainNoise"}
    inp, tgt = model.pair(smooth_image(32).float(), gen())
    assert inp.shape == tgt.shape == (3, 32, 32)


@pytest.mark.parametrize("spec, words", [
    ("gaussian:-5", "non-negative"), ("gaussian:inf", "finite"), ("gaussian:nan", "finite"),
    ("poisson:inf", "finite"), ("gaussian:25,jpeg=0-50", "jpeg quality"), ("gaussian:25,jpeg=70.5", "whole"),
    ("gaussian:25,sharp", "unknown option"), ("gaussian:25,size=2", "grain noise only"),
    ("camera:0-1", "camera shot"), ("gaussian:25@0", "weight"), ("gaussian:25@-1", "mixture weight"),
    ("blur:3", "unknown noise"), ("gaussian:25,8bit,8bit", "twice"),
])
def test_bad_specs_name_the_spec_and_the_problem(spec, words):
    with pytest.raises(ValueError) as info:
        parse_noise(spec)
    message = str(info.value)
    assert spec in message and words in message and "\n" not in message, message
