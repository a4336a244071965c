"""Max pooling."""
from __future__ import annotations

from torch import Tensor

from n2n_core import functional as fn
from n2n_core.module import Module


class MaxPool2d(Module):
    """Max over kernel windows (no padding, like torch's default).

    Shape: (N, C, H, W) -> (N, C, (H - kh) // sh + 1, (W - kw) // sw + 1).
    """

    def __init__(self, kernel_size, stride=None):
        super().__init__()
        self.kernel_size = fn.pair(kernel_size)
        self.stride = fn.pair(stride if stride is not None else kernel_size)
        self._cache = None

    def forward(self, x: Tensor) -> Tensor:
        y, index = fn.max_pool2d_forward(x, self.kernel_size, self.stride)
        self._cache = (index, x.shape) if self.training else None
        return y

    def backward(self, grad_output: Tensor) -> Tensor:
        index, shape = self._saved(self._cache)
        return fn.max_pool2d_backward(grad_output, index, shape, self.kernel_size, self.stride)

    def extra_repr(self) -> str:
        return f"kernel_size={self.kernel_size}, stride={self.stride}"
