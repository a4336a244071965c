"""psnr, ssim and quantize_8bit against hand computations and scikit-image."""
import math

import numpy as np
import pytest
import torch
from skimage.metrics import structural_similarity

from n2n_core import psnr, quantize_8bit, ssim


def test_psnr_hand_computation():
    target = torch.zeros(1, 2, 2)
    pred = torch.tensor([[[0.1, 0.0], [0.0, 0.0]]])  # MSE = 0.01 / 4
    expected = 10 * math.log10(1.0 / (0.01 / 4))
    value = psnr(pred, target)
    assert value.shape == ()
    assert abs(value.item() - expected) < 1e-6
    assert abs(psnr(pred * 255, target, peak=255.0).item() - expected) < 1e-6


def test_psnr_per_image_and_identical_images():
    g = torch.Generator().manual_seed(0)
    target = torch.rand(3, 3, 8, 9, generator=g, dtype=torch.float64)
    noise = torch.randn(3, 3, 8, 9, generator=g, dtype=torch.float64) * torch.tensor([0.01, 0.1, 0.0]).view(3, 1, 1, 1)
    values = psnr(target + noise, target)
    assert values.shape == (3,)
    for i in range(2):
        mse = float(((noise[i]) ** 2).mean())
        assert abs(values[i].item() - 10 * math.log10(1 / mse)) < 1e-9
    assert math.isinf(values[2].item()) and values[2] > 0


def _skimage_ssim(a, b, data_range=1.0):
    return structural_similarity(
        a.numpy(), b.numpy(), data_range=data_range, gaussian_weights=True, sigma=1.5,
        use_sample_covariance=False, channel_axis=0,
    )


@pytest.mark.parametrize("shape", [(3, 11, 11), (3, 16, 23), (1, 20, 13)], ids=str)
def test_ssim_matches_skimage(shape):
    g = torch.Generator().manual_seed(1)
    clean = torch.rand(shape, generator=g, dtype=torch.float64)
    noisy = (clean + 0.2 * torch.randn(shape, generator=g, dtype=torch.float64)).clamp(0, 1)
    ours = ssim(noisy, clean)
    ref = _skimage_ssim(noisy, clean)
    assert ours.shape == ()
    assert abs(ours.item() - ref) < 1e-10, (ours.item(), ref)
    assert 0 < ours < 1


def test_ssim_batch_float32_and_data_range():
    g = torch.Generator().manual_seed(2)
    clean = torch.rand(2, 3, 14, 15, generator=g)
    noisy = (clean + 0.1 * torch.randn(2, 3, 14, 15, generator=g)).clamp(0, 1)
    values = ssim(noisy, clean)
    assert values.shape == (2,)
    for i in range(2):
        ref = _skimage_ssim(noisy[i].double(), clean[i].double())
        assert abs(values[i].item() - ref) < 1e-6
    scaled = ssim(noisy[0].double() * 255, clean[0].double() * 255, data_range=255.0)
    assert abs(scaled.item() - _skimage_ssim(noisy[0].double() * 255, clean[0].double() * 255, 255.0)) < 1e-10
    assert abs(ssim(clean[0], clean[0]).item() - 1.0) < 1e-6


def test_ssim_rejects_small_images():
    with pytest.raises(ValueError, match="at least 11x11"):
        ssim(torch.zeros(3, 10, 20), torch.zeros(3, 10, 20))


def test_quantize_8bit():
    x = torch.tensor([-0.5, 0.0, 0.3, 1 / 255 * 0.49, 1 / 255 * 0.51, 1.0, 2.0], dtype=torch.float64)
    q = quantize_8bit(x)
    expected = np.clip(np.round(np.clip(x.numpy(), 0, 1) * 255), 0, 255) / 255
    assert np.array_equal(q.numpy(), expected)
    assert q[0] == 0 and q[-1] == 1 and q[3] == 0 and q[4] == 1 / 255


def test_shape_errors():
    with pytest.raises(ValueError, match="shape"):
        psnr(torch.zeros(3, 4, 4), torch.zeros(3, 4, 5))
    with pytest.raises(ValueError, match=r"\(C, H, W\)"):
        psnr(torch.zeros(4, 4), torch.zeros(4, 4))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    g = torch.Generator().manual_seed(3)
    a, b = torch.rand(2, 3, 16, 16, generator=g), torch.rand(2, 3, 16, 16, generator=g)
    torch.testing.assert_close(psnr(a.cuda(), b.cuda()).cpu(), psnr(a, b), rtol=1e-12, atol=0)
    torch.testing.assert_close(ssim(a.cuda(), b.cuda()).cpu(), ssim(a, b), rtol=1e-10, atol=0)
    assert torch.equal(quantize_8bit(a.cuda()).cpu(), quantize_8bit(a))
