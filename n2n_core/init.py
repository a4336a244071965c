"""Fan-in-correct initializers; each takes an explicit torch.Generator (no global RNG state).

fan_in = in_channels * kernel area for a conv weight (out, in, kh, kw) — not the batch
size, the seed design's mistake.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor


def fan_in_and_out(weight: Tensor) -> tuple[int, int]:
    """Torch's convention: dim 1 is fan-in per output for (out, in, kh, kw)."""
    receptive = math.prod(weight.shape[2:]) if weight.dim() > 2 else 1
    return weight.shape[1] * receptive, weight.shape[0] * receptive


def uniform_(t: Tensor, low: float, high: float, generator=None) -> Tensor:
    noise = torch.rand(t.shape, generator=generator, dtype=t.dtype, device="cpu")
    return t.copy_((noise * (high - low) + low).to(t.device))


def normal_(t: Tensor, std: float, generator=None) -> Tensor:
    noise = torch.randn(t.shape, generator=generator, dtype=t.dtype, device="cpu")
    return t.copy_((noise * std).to(t.device))


def kaiming_uniform_(t: Tensor, a: float = 0.0, generator=None, fan_in: int | None = None) -> Tensor:
    """U(-b, b), b = gain * sqrt(3 / fan_in), gain = sqrt(2 / (1 + a^2))."""
    fan_in = fan_in or fan_in_and_out(t)[0]
    bound = math.sqrt(2.0 / (1 + a * a)) * math.sqrt(3.0 / fan_in)
    return uniform_(t, -bound, bound, generator)


def kaiming_normal_(t: Tensor, a: float = 0.0, generator=None, fan_in: int | None = None) -> Tensor:
    """N(0, std^2), std = sqrt(2 / ((1 + a^2) fan_in)) (He et al. 2015)."""
    fan_in = fan_in or fan_in_and_out(t)[0]
    return normal_(t, math.sqrt(2.0 / ((1 + a * a) * fan_in)), generator)


def torch_default_conv_init_(weight: Tensor, bias: Tensor | None, generator=None, fan_in: int | None = None) -> None:
    """PyTorch's Conv2d reset_parameters: kaiming_uniform(a=sqrt(5)), bias U(+-1/sqrt(fan_in))."""
    fan_in = fan_in or fan_in_and_out(weight)[0]
    kaiming_uniform_(weight, a=math.sqrt(5), generator=generator, fan_in=fan_in)
    if bias is not None:
        bound = 1 / math.sqrt(fan_in) if fan_in > 0 else 0
        uniform_(bias, -bound, bound, generator)
