"""Losses with torch's mean reduction: `MSELoss` and `L1Loss`.

A loss is a `Module` whose `forward(pred, target)` returns a 0-dim tensor and whose
`backward()` returns the gradient of that scalar with respect to `pred` (optionally
scaled by `grad_output`, the gradient of whatever the loss feeds into; 1 by default).
The target is treated as a constant: no gradient flows to it.

Both follow PyTorch's MSELoss / L1Loss (reduction="mean"):
    MSE = mean((pred - target)^2)      d/dpred = 2 (pred - target) / numel
    L1  = mean(|pred - target|)        d/dpred = sign(pred - target) / numel
(sign(0) = 0, as torch's autograd uses for abs.)
"""
from __future__ import annotations

import torch
from torch import Tensor

from n2n_core.module import Module


def _check_pair(name: str, pred: Tensor, target: Tensor) -> None:
    if pred.shape != target.shape:
        raise ValueError(
            f"{name}: pred has shape {tuple(pred.shape)} but target has shape {tuple(target.shape)}"
        )
    if pred.numel() == 0:
        raise ValueError(f"{name}: empty input (shape {tuple(pred.shape)}); the mean is undefined")


class MSELoss(Module):
    """Mean squared error, mean over every element.

    Shape:
        pred, target: any shape, the same for both.
        Output: () scalar. `backward()` returns a tensor shaped like `pred`.
    """

    def __init__(self) -> None:
        super().__init__()
        self._diff = None  # pred - target, kept for backward (training mode only)

    def forward(self, pred: Tensor, target: Tensor) -> Tensor:
        _check_pair("MSELoss", pred, target)
        diff = pred - target
        self._diff = diff if self.training else None
        return (diff * diff).mean()

    def backward(self, grad_output=None) -> Tensor:
        diff = self._saved(self._diff, "pred - target")
        grad = diff * (2.0 / diff.numel())
        return grad if grad_output is None else grad * grad_output

    def _on_mode_change(self) -> None:
        if not self.training:
            self._diff = None


class L1Loss(Module):
    """Mean absolute error, mean over every element.

    Shape:
        pred, target: any shape, the same for both.
        Output: () scalar. `backward()` returns a tensor shaped like `pred`.
    """

    def __init__(self) -> None:
        super().__init__()
        self._diff = None

    def forward(self, pred: Tensor, target: Tensor) -> Tensor:
        _check_pair("L1Loss", pred, target)
        diff = pred - target
        self._diff = diff if self.training else None
        return diff.abs().mean()

    def backward(self, grad_output=None) -> Tensor:
        diff = self._saved(self._diff, "pred - target")
        grad = torch.sign(diff) / diff.numel()
        return grad if grad_output is None else grad * grad_output

    def _on_mode_change(self) -> None:
        if not self.training:
            self._diff = None
