"""Elementwise activations. Shape: any; the output has the shape (and memory format) of the input.

Each keeps, in training mode, only a one-byte mask (or the output, for Sigmoid) for
backward, and frees it once backward has used it.
"""
from __future__ import annotations

import torch
from torch import Tensor

from n2n_core.conv_plan import plan_for
from n2n_core.module import Module


def _slabs(x: Tensor) -> tuple[Tensor, ...]:
    """Views of x split along dim 0 into pieces of about the device's slab size (`ConvPlan.slab_elements`:
    2^18 elements, 1 MB in float32, on a CPU; the whole tensor on CUDA)."""
    slab = plan_for(x.device).slab_elements
    if slab is None or x.dim() == 0 or x.numel() <= slab:
        return (x,)
    per_row = max(1, x.numel() // x.shape[0])
    return x.split(max(1, slab // per_row))


def _scale_in_slabs(g: Tensor, source: Tensor, factor_of, value: float | None = None) -> Tensor:
    """In place, a slab of the batch at a time while it is in cache: g *= f, or with `value`,
    g += value g f, where `factor_of(source_slab, out)` writes the slab's f as floats into out,
    one scratch slab (a fresh temporary per slab would come from the system with its pages
    untouched). Returns g."""
    factor = None
    for part, src in zip(_slabs(g), _slabs(source)):
        if factor is None:
            factor = torch.empty_like(src, dtype=g.dtype)  # src's memory layout, the first (largest) slab's size
        f = factor_of(src, factor[:src.shape[0]])
        if value is None:
            part.mul_(f)
        else:
            torch.addcmul(part, part, f, value=value, out=part)
    return g


def _slope_where_nonpositive(y: Tensor, out: Tensor, slope: float) -> Tensor:
    """1 where y > 0, `slope` elsewhere, as floats, vectorized, for 0 <= slope <= 1: sign(y) is
    -1, 0, 1; clamped below at the slope."""
    return torch.sign(y, out=out).clamp_min_(slope)


def _minus_nonpositive(y: Tensor, out: Tensor) -> Tensor:
    """-[y <= 0] as floats, vectorized: sign(y) - 1 is -2, -1, 0 for y < 0, y == 0, y > 0; clamped below at -1."""
    return torch.sign(y, out=out).sub_(1).clamp_min_(-1)


class ReLU(Module):
    """max(x, 0); the gradient passes where x > 0 (torch's convention: 0 at x == 0)."""

    def __init__(self):
        super().__init__()
        self._mask = None

    def forward(self, x: Tensor) -> Tensor:
        y = torch.relu(x)
        self._mask = (y > 0) if self.training else None
        return y

    def backward(self, grad_output: Tensor) -> Tensor:
        mask = self._saved(self._mask, "the activation mask")
        self._mask = None
        return grad_output * mask

    def _on_mode_change(self) -> None:
        self._mask = None


class LeakyReLU(Module):
    """x where x > 0, negative_slope * x elsewhere.

    `inplace=True` (as torch's) writes the output over the input and the input gradient
    over grad_output: no new buffer, and since forward returns the very object it was
    given, a convolution output's padded layout carries on to the next convolution (the
    layout contract at the top of layout.py). Only for inputs and gradients nothing
    else reads afterwards (a convolution's fresh output and input gradient).
    """

    def __init__(self, negative_slope: float = 0.01, inplace: bool = False):
        super().__init__()
        self.negative_slope = float(negative_slope)
        self.inplace = bool(inplace)
        self._scaled = None  # training: the bool mask x <= 0 (where the gradient is scaled by the slope)
        self._output = None  # training, fused: the output itself, the mask's source (see `adopt`)

    def forward(self, x: Tensor) -> Tensor:
        s = self.negative_slope
        out = x if self.inplace else None
        if 0.0 <= s <= 1.0:
            # == where(x > 0, x, s x) for slopes in [0, 1], in fewer passes; y <= 0 exactly where x <= 0
            y = torch.maximum(x, x * s, out=out)
            scaled = (y <= 0) if self.training else None
        else:
            scaled = (x <= 0) if self.training else None
            y = torch.where(x > 0, x, x * s, out=out)
        self._scaled, self._output = scaled, None
        return y

    # -- fused into a convolution (Conv2d.forward(x, activation=...)) --------------------------
    def fusable(self) -> bool:
        """In place, and y > 0 exactly where x > 0 (slope >= 0): the mask can be read from the output."""
        return self.inplace and self.negative_slope >= 0

    def activate_(self, x: Tensor, scratch: Tensor | None = None) -> None:
        """Overwrite x (any shape, e.g. a block of a convolution's output) with its activation; keep
        nothing. `scratch`: space of x's shape for the temporary s x (None: a new tensor)."""
        s = self.negative_slope
        if s <= 1.0:
            torch.maximum(x, torch.mul(x, s, out=scratch), out=x)
        else:
            torch.where(x > 0, x, x * s, out=x)

    def adopt(self, y: Tensor) -> Tensor:
        """y, already activated by `activate_`: keep what backward needs. That is y itself, not a
        mask: y is a convolution's fresh output that the layers after it only read (the next
        convolution keeps it for its own backward anyway), and backward derives the mask from it
        slab by slab in cache with vectorized float operations, where the one-byte mask took a
        non-vectorized pass over memory in forward and a conversion to floats in backward
        (measured per 64x64x44 slab on one thread: 112 us against 292 us)."""
        self._output = y if self.training else None
        self._scaled = None
        return y

    def backward(self, grad_output: Tensor) -> Tensor:
        """g where x > 0, s g elsewhere. Fused into a convolution (`adopt`), from the kept output:
        g times a factor 1 or s made from sign(y) (exact; for 0 <= s <= 1: three passes over each
        slab in cache, where the multiply-add below took four, measured 0.76x the time). Else from
        the mask forward kept, as g + (s - 1) g [x <= 0]: one multiply-add by the mask read as 0/1
        floats (a `where` on a bool mask measured 5-6x slower on a CPU), exact where x > 0,
        within a rounding of s g elsewhere."""
        s = self.negative_slope
        if self._output is not None:
            y, self._output = self._output, None
            if s <= 1.0:
                return _scale_in_slabs(grad_output, y, lambda src, out: _slope_where_nonpositive(src, out, s))
            return _scale_in_slabs(grad_output, y, _minus_nonpositive, 1 - s)  # g + (1 - s) g (-[y <= 0])
        scaled = self._saved(self._scaled, "the activation mask")
        self._scaled = None
        if not self.inplace:
            return torch.addcmul(grad_output, grad_output, scaled.view(torch.uint8), value=s - 1)
        return _scale_in_slabs(grad_output, scaled.view(torch.uint8), lambda m, out: out.copy_(m), s - 1)

    def _on_mode_change(self) -> None:
        self._scaled = self._output = None

    def extra_repr(self) -> str:
        return f"negative_slope={self.negative_slope}" + (", inplace=True" if self.inplace else "")


class Sigmoid(Module):
    """1 / (1 + exp(-x)); gradient y (1 - y)."""

    def __init__(self):
        super().__init__()
        self._y = None

    def forward(self, x: Tensor) -> Tensor:
        y = torch.sigmoid(x)
        self._y = y if self.training else None
        return y

    def backward(self, grad_output: Tensor) -> Tensor:
        y = self._saved(self._y, "its output")
        self._y = None
        return grad_output * y * (1 - y)

    def _on_mode_change(self) -> None:
        self._y = None
