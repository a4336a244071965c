"""Multi-input modules for skip connections: `Concat` and `Add`.

They keep forward and backward as readable as `Sequential`: a network pushes a
tensor on a skip stack, later calls `concat(h, skips.pop())`, and in backward
`grad_h, grad_skip = concat.backward(grad)` hands the skip's gradient back to the
place it came from, where it is added to the gradient flowing through the main path.
"""
from __future__ import annotations

import torch
from torch import Tensor

from n2n_core import layout
from n2n_core.module import Module


class Concat(Module):
    """Concatenate two tensors along the channel dimension: `torch.cat((a, b), dim=1)`.

    `pad=p` (used by the U-Net, whose concatenations feed 3x3 convolutions with padding 1)
    builds a 4-D output directly inside a zero-bordered buffer the convolution reads as is
    (the layout contract at the top of layout.py).

    Shape:
        a: (N, Ca, H, W), b: (N, Cb, H, W) -> (N, Ca + Cb, H, W).
        backward(grad (N, Ca + Cb, H, W)) -> (grad_a (N, Ca, H, W), grad_b (N, Cb, H, W)).
    """

    def __init__(self, pad: int = 0) -> None:
        super().__init__()
        self.pad = int(pad)  # > 0: lay the 4-D output out for a convolution with this padding (no copy there)
        self._split = None  # (Ca, Cb), kept for backward (training mode only)

    def forward(self, a: Tensor, b: Tensor) -> Tensor:
        if a.dim() < 2 or a.dim() != b.dim() or a.shape[:1] + a.shape[2:] != b.shape[:1] + b.shape[2:]:
            raise ValueError(
                f"Concat: shapes {tuple(a.shape)} and {tuple(b.shape)} differ outside the channel dimension"
            )
        self._split = (a.shape[1], b.shape[1]) if self.training else None
        if self.pad and a.dim() == 4:
            return self._padded_cat(a, b)
        return torch.cat((a, b), dim=1)

    def _padded_cat(self, a: Tensor, b: Tensor) -> Tensor:
        """(N, Ca, H, W), (N, Cb, H, W) -> the marked interior (N, Ca + Cb, H, W) of a zero-bordered
        channels-last padded buffer (N, H + pad, W + pad, Ca + Cb): see `layout.padded_interior`."""
        N, ca, H, W = a.shape
        p = self.pad
        buffer = layout.new_padded(a, N, H, W, ca + b.shape[1], (p, p))
        inner = buffer[:, p:, p:]  # (N, H, W, Ca + Cb)
        inner[..., :ca] = a.permute(0, 2, 3, 1)
        inner[..., ca:] = b.permute(0, 2, 3, 1)
        layout.zero_border(buffer, (p, p))
        return layout.padded_interior(buffer, (p, p))

    def backward(self, grad_output: Tensor) -> tuple[Tensor, Tensor]:
        ca, cb = self._saved(self._split, "the channel split")
        grad_a, grad_b = torch.split(grad_output, (ca, cb), dim=1)
        return grad_a, grad_b

    def _on_mode_change(self) -> None:
        if not self.training:
            self._split = None


class Add(Module):
    """Element-wise sum of two tensors of the same shape: `a + b`.

    Shape:
        a, b: (*) the same shape -> (*).
        backward(grad) -> (grad, grad).
    """

    def forward(self, a: Tensor, b: Tensor) -> Tensor:
        if a.shape != b.shape:
            raise ValueError(f"Add: shapes {tuple(a.shape)} and {tuple(b.shape)} differ")
        return a + b

    def backward(self, grad_output: Tensor) -> tuple[Tensor, Tensor]:
        return grad_output, grad_output
