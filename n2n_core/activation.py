"""Elementwise activations. Shape: any; output the shape of the input."""
from __future__ import annotations

import torch
from torch import Tensor

from n2n_core.module import Module


class ReLU(Module):
    def __init__(self):
        super().__init__()
        self._mask = None

    def forward(self, x: Tensor) -> Tensor:
        mask = x > 0
        self._mask = mask if self.training else None
        return x * mask

    def backward(self, grad_output: Tensor) -> Tensor:
        return grad_output * self._saved(self._mask, "the activation mask")


class LeakyReLU(Module):
    def __init__(self, negative_slope: float = 0.01):
        super().__init__()
        self.negative_slope = float(negative_slope)
        self._mask = None

    def forward(self, x: Tensor) -> Tensor:
        mask = x > 0
        self._mask = mask if self.training else None
        return torch.where(mask, x, x * self.negative_slope)

    def backward(self, grad_output: Tensor) -> Tensor:
        mask = self._saved(self._mask, "the activation mask")
        return torch.where(mask, grad_output, grad_output * self.negative_slope)

    def extra_repr(self) -> str:
        return f"negative_slope={self.negative_slope}"


class Sigmoid(Module):
    def __init__(self):
        super().__init__()
        self._y = None

    def forward(self, x: Tensor) -> Tensor:
        y = torch.sigmoid(x)
        self._y = y if self.training else None
        return y

    def backward(self, grad_output: Tensor) -> Tensor:
        y = self._saved(self._y, "its output")
        return grad_output * y * (1 - y)
