"""denoise_image: padding to the model's multiple, grey handling, tiling agreement, clipping."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pipeline.inference.tiling import DIHEDRAL_VIEWS, denoise_image, from_view, reflect_pad_to, to_view
from tests.denoise_helpers import TinyUNet


def test_reflect_pad_matches_torch_reflect():
    x = torch.rand(1, 3, 13, 9, dtype=torch.float64)
    ours = reflect_pad_to(x, 16, 12)
    torch.testing.assert_close(ours, F.pad(x, (0, 3, 0, 3), mode="reflect"))


def test_reflect_pad_wider_than_image_and_single_pixel():
    x = torch.arange(3.0).view(1, 1, 1, 3)
    assert reflect_pad_to(x, 1, 8)[0, 0, 0].tolist() == [0, 1, 2, 1, 0, 1, 2, 1]
    one = torch.tensor([[[[0.7]]]])
    assert torch.equal(reflect_pad_to(one, 4, 4), torch.full((1, 1, 4, 4), 0.7))


@pytest.mark.parametrize("H,W", [(16, 16), (13, 21), (1, 1), (5, 30)])
def test_whole_image_pads_runs_and_crops(H, W):
    model = TinyUNet(dtype=torch.float64)
    pixels = torch.rand(3, H, W, dtype=torch.float64)
    out = denoise_image(model, pixels)
    assert out.shape == (3, H, W) and out.dtype == torch.float32
    Hp, Wp = -(-H // 4) * 4, -(-W // 4) * 4
    padded = F.pad(pixels[None], (0, Wp - W, 0, Hp - H), mode="reflect") if H > 1 and W > 1 else \
        reflect_pad_to(pixels[None], Hp, Wp)
    expected = model(padded)[0, :, :H, :W].clamp(0, 1).float()
    torch.testing.assert_close(out, expected)


def test_output_clipped_and_eval_mode_restored():
    model = TinyUNet()
    model.train()
    out = denoise_image(model, torch.rand(3, 20, 20) * 4 - 2)
    assert out.min() >= 0 and out.max() <= 1 and (out == 1).any() and (out == 0).any()
    assert model.training
    model.eval()
    denoise_image(model, torch.rand(3, 8, 8))
    assert not model.training


def test_grey_image_replicated_and_averaged():
    model = TinyUNet(dtype=torch.float64)
    grey = torch.rand(1, 12, 17, dtype=torch.float64)
    out = denoise_image(model, grey)
    padded = F.pad(grey.expand(3, -1, -1)[None], (0, 3, 0, 0), mode="reflect")  # to (12, 20)
    expected = model(padded)[0, :, :12, :17].mean(0, keepdim=True).clamp(0, 1).float()
    assert out.shape == (1, 12, 17)
    torch.testing.assert_close(out, expected, atol=1e-6, rtol=0)


@pytest.mark.parametrize("H,W,tile,overlap", [(96, 80, 32, 16), (61, 47, 16, 12), (64, 64, 64, 8)])
def test_tiled_equals_whole_image_when_overlap_covers_receptive_field(H, W, tile, overlap):
    # TinyUNet's receptive field is about 40 px: with 16+ px of overlap on a 4-multiple
    # grid, every kept tile centre sees the same context as the whole image.
    model = TinyUNet(dtype=torch.float64)
    pixels = torch.rand(3, H, W, dtype=torch.float64)
    whole = denoise_image(model, pixels)
    tiled = denoise_image(model, pixels, tile=tile, overlap=max(overlap, 24))
    torch.testing.assert_close(tiled, whole, atol=1e-6, rtol=0)


@pytest.mark.parametrize("C,tile,overlap", [(3, 32, 8), (1, 16, 12), (3, 8, 12)])
def test_inplace_equals_out_of_place(C, tile, overlap):
    model = TinyUNet()
    pixels = torch.rand(C, 44, 36)
    expected = denoise_image(model, pixels, tile=tile, overlap=overlap)
    result = denoise_image(model, pixels, tile=tile, overlap=overlap, inplace=True)
    torch.testing.assert_close(result, expected, atol=0, rtol=0)
    if tile >= overlap:
        assert result.data_ptr() == pixels.data_ptr()
        torch.testing.assert_close(pixels, expected, atol=0, rtol=0)


def test_tiling_visits_tiles_and_bounds_input_size():
    model = TinyUNet()
    pixels = torch.rand(3, 200, 130)
    denoise_image(model, pixels, tile=64, overlap=8)
    assert model.calls == 4 * 3  # ceil(200/64) x ceil(130/64)
    assert model.max_input <= (64 + 16) * (64 + 16)


def test_wrong_shape_is_refused():
    with pytest.raises(ValueError, match=r"\(C, H, W\)"):
        denoise_image(TinyUNet(), torch.rand(1, 3, 8, 8))


# -- self-ensemble ---------------------------------------------------------------

def _independent_dihedral_views():
    """The 8 symmetries of the square built another way: optional transpose, then flips.

    Each entry is (forward, inverse) on (..., H, W) tensors.
    """
    views = []
    for transpose in (False, True):
        for flip_rows in (False, True):
            for flip_cols in (False, True):
                def forward(x, t=transpose, r=flip_rows, c=flip_cols):
                    x = x.transpose(-2, -1) if t else x
                    x = x.flip(-2) if r else x
                    return x.flip(-1) if c else x

                def inverse(y, t=transpose, r=flip_rows, c=flip_cols):
                    y = y.flip(-1) if c else y
                    y = y.flip(-2) if r else y
                    return y.transpose(-2, -1) if t else y
                views.append((forward, inverse))
    return views


def test_views_are_the_eight_symmetries_and_invert():
    x = torch.arange(12.0).view(1, 3, 4)  # asymmetric, non-square
    def signature(view):
        return tuple(view.shape), tuple(view.flatten().tolist())

    seen = {signature(to_view(x, t, f)) for t, f in DIHEDRAL_VIEWS}
    expected = {signature(forward(x)) for forward, _ in _independent_dihedral_views()}
    assert len(DIHEDRAL_VIEWS) == 8 and seen == expected
    for turns, flip in DIHEDRAL_VIEWS:
        assert torch.equal(from_view(to_view(x, turns, flip), turns, flip), x)


@pytest.mark.parametrize("H,W", [(16, 16), (13, 21), (5, 30)])
def test_self_ensemble_is_the_mean_over_the_eight_views(H, W):
    model = TinyUNet(dtype=torch.float64)
    pixels = torch.rand(3, H, W, dtype=torch.float64)
    outputs = []
    # padded once, below and right in the image's frame, so all views pool on one grid
    padded = F.pad(pixels[None], (0, -(-W // 4) * 4 - W, 0, -(-H // 4) * 4 - H), mode="reflect")
    for forward, inverse in _independent_dihedral_views():
        outputs.append(inverse(model(forward(padded)))[0, :, :H, :W])
    expected = torch.stack(outputs).mean(0).clamp(0, 1).float()
    ensemble = denoise_image(model, pixels, self_ensemble=True)
    torch.testing.assert_close(ensemble, expected, atol=1e-6, rtol=0)
    # TinyUNet is not rotation-equivariant: the ensemble is not the plain output
    assert (ensemble - denoise_image(model, pixels)).abs().max() > 1e-3


def test_self_ensemble_tiled_equals_whole_and_inplace():
    model = TinyUNet(dtype=torch.float64)
    pixels = torch.rand(3, 61, 47, dtype=torch.float64)
    whole = denoise_image(model, pixels, self_ensemble=True)
    tiled = denoise_image(model, pixels, tile=16, overlap=24, self_ensemble=True)
    torch.testing.assert_close(tiled, whole, atol=1e-6, rtol=0)
    model32 = TinyUNet()
    grey = torch.rand(1, 30, 22)
    expected = denoise_image(model32, grey, tile=16, overlap=8, self_ensemble=True)
    result = denoise_image(model32, grey.clone(), tile=16, overlap=8, self_ensemble=True, inplace=True)
    torch.testing.assert_close(result, expected, atol=0, rtol=0)


def test_strength_blends_the_correction_and_tiles_still_match_the_whole_image():
    model = TinyUNet()
    pixels = torch.rand(3, 37, 29)
    full = denoise_image(model, pixels)
    for strength in (0.0, 0.3, 1.0):
        expected = (pixels + strength * (full - pixels)).clamp(0, 1)
        whole = denoise_image(model, pixels, strength=strength)
        torch.testing.assert_close(whole, expected, atol=1e-6, rtol=0)
        tiled = denoise_image(model, pixels, tile=8, overlap=12, strength=strength)
        torch.testing.assert_close(tiled, whole, atol=1e-5, rtol=0)
        inplace = denoise_image(model, pixels.clone(), tile=8, overlap=4, strength=strength, inplace=True)
        torch.testing.assert_close(inplace, denoise_image(model, pixels, tile=8, overlap=4, strength=strength))
    assert torch.equal(denoise_image(model, pixels, strength=0.0), pixels)  # nothing applied
    grey = torch.rand(1, 20, 20)
    half = denoise_image(model, grey, strength=0.5)
    torch.testing.assert_close(half, (grey + 0.5 * (denoise_image(model, grey) - grey)).clamp(0, 1))
    for bad in (-0.1, 1.5, float("nan")):
        with pytest.raises(ValueError, match="strength"):
            denoise_image(model, pixels, strength=bad)
