"""Multi-input modules for skip connections: `Concat` and `Add`.

They keep forward and backward as readable as `Sequential`: a network pushes a
tensor on a skip stack, later calls `concat(h, skips.pop())`, and in backward
`grad_h, grad_skip = concat.backward(grad)` hands the skip's gradient back to the
place it came from, where it is added to the gradient flowing through the main path.
"""
from __future__ import annotations

import torch
from torch import Tensor

from n2n_core.module import Module


class Concat(Module):
    """Concatenate two tensors along the channel dimension: `torch.cat((a, b), dim=1)`.

    Shape:
        a: (N, Ca, H, W), b: (N, Cb, H, W) -> (N, Ca + Cb, H, W).
        backward(grad (N, Ca + Cb, H, W)) -> (grad_a (N, Ca, H, W), grad_b (N, Cb, H, W)).
    """

    def __init__(self) -> None:
        super().__init__()
        self._split = None  # (Ca, Cb), kept for backward (training mode only)

    def forward(self, a: Tensor, b: Tensor) -> Tensor:
        if a.dim() < 2 or a.dim() != b.dim() or a.shape[:1] + a.shape[2:] != b.shape[:1] + b.shape[2:]:
            raise ValueError(
                f"Concat: shapes {tuple(a.shape)} and {tuple(b.shape)} differ outside the channel dimension"
            )
        self._split = (a.shape[1], b.shape[1]) if self.training else None
        return torch.cat((a, b), dim=1)

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
