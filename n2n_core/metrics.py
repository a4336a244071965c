"""Image quality metrics on tensors: `psnr`, `ssim`, and `quantize_8bit`.

Images are (C, H, W) or batches (N, C, H, W) of floats on the [0, data_range] scale.
A batch gives one value per image, a single image gives a 0-dim tensor. Results are
float64 (the metrics are reductions; float32 sums over large images drift).
"""
from __future__ import annotations


import torch
from torch import Tensor


def _as_batch(name: str, pred: Tensor, target: Tensor) -> tuple[Tensor, Tensor, bool]:
    if pred.shape != target.shape:
        raise ValueError(f"{name}: pred has shape {tuple(pred.shape)} but target has shape {tuple(target.shape)}")
    if pred.dim() == 3:
        return pred.unsqueeze(0), target.unsqueeze(0), True
    if pred.dim() == 4:
        return pred, target, False
    raise ValueError(f"{name}: expected (C, H, W) or (N, C, H, W), got shape {tuple(pred.shape)}")


def quantize_8bit(x: Tensor) -> Tensor:
    """Clip to [0, 1] and round to the nearest multiple of 1/255 (what an 8-bit file stores).

    The levels k / 255 come from a table divided on the CPU: CUDA divides by a scalar as a
    multiplication by its reciprocal, one unit in the last place off for some k, and the
    result must be the same number on every device.
    Shape: any; output has the shape and dtype of `x`.
    """
    codes = torch.round(x.clamp(0.0, 1.0) * 255.0).to(torch.int32)
    levels = (torch.arange(256, dtype=x.dtype) / 255.0).to(x.device)
    return levels[codes]


def psnr(pred: Tensor, target: Tensor, peak: float = 1.0) -> Tensor:
    """Peak signal-to-noise ratio in dB: 10 log10(peak^2 / MSE), MSE over C, H and W.

    Identical images give +inf.
    Shape:
        pred, target: (N, C, H, W) -> (N,), or (C, H, W) -> () scalar.
    """
    pred, target, single = _as_batch("psnr", pred, target)
    diff = pred.to(torch.float64) - target.to(torch.float64)
    mse = (diff * diff).flatten(1).mean(dim=1)  # (N,)
    out = 10.0 * torch.log10(peak * peak / mse)
    return out[0] if single else out


def _gaussian_window(sigma: float, radius: int, dtype, device) -> Tensor:
    x = torch.arange(-radius, radius + 1, dtype=dtype, device=device)
    w = torch.exp(-(x * x) / (2.0 * sigma * sigma))
    return w / w.sum()


def _filter_valid(x: Tensor, window: Tensor) -> Tensor:
    """Separable 'valid' filtering of the last two dimensions with a 1-D window.

    Shape: (..., H, W) -> (..., H - K + 1, W - K + 1) for a window of K taps.
    """
    k = window.numel()
    h, w = x.shape[-2], x.shape[-1]
    rows = sum(window[i] * x[..., i : h - k + 1 + i, :] for i in range(k))
    return sum(window[i] * rows[..., :, i : w - k + 1 + i] for i in range(k))


def ssim(pred: Tensor, target: Tensor, data_range: float = 1.0, sigma: float = 1.5) -> Tensor:
    """Structural similarity (Wang et al. 2004) with an 11-tap Gaussian window (sigma 1.5).

    Means, variances and covariance are Gaussian-weighted (population, not sample,
    covariance); the SSIM map is averaged over the positions where the window fits
    inside the image, then over channels. This is what
    `skimage.metrics.structural_similarity(a, b, data_range=..., gaussian_weights=True,
    sigma=1.5, use_sample_covariance=False, channel_axis=0)` computes.
    Shape:
        pred, target: (N, C, H, W) -> (N,), or (C, H, W) -> () scalar; H, W >= 11.
    """
    pred, target, single = _as_batch("ssim", pred, target)
    radius = int(3.5 * sigma + 0.5)  # skimage's gaussian truncation at 3.5 sigma
    size = 2 * radius + 1
    if pred.shape[-1] < size or pred.shape[-2] < size:
        raise ValueError(f"ssim: images must be at least {size}x{size}, got {tuple(pred.shape[-2:])}")
    x = pred.to(torch.float64)
    y = target.to(torch.float64)
    window = _gaussian_window(sigma, radius, torch.float64, x.device)
    ux, uy = _filter_valid(x, window), _filter_valid(y, window)
    vx = _filter_valid(x * x, window) - ux * ux
    vy = _filter_valid(y * y, window) - uy * uy
    vxy = _filter_valid(x * y, window) - ux * uy
    c1 = (0.01 * data_range) ** 2
    c2 = (0.03 * data_range) ** 2
    s = ((2 * ux * uy + c1) * (2 * vxy + c2)) / ((ux * ux + uy * uy + c1) * (vx + vy + c2))  # (N, C, h, w)
    out = s.flatten(2).mean(dim=2).mean(dim=1)  # channel means, then their average
    return out[0] if single else out


__all__ = ["psnr", "ssim", "quantize_8bit"]
