"""Max pooling."""
from __future__ import annotations

from torch import Tensor

from n2n_core import layout, resample
from n2n_core.module import Module
from n2n_core.pool2x2 import max_pool2x2_backward, max_pool2x2_forward


class MaxPool2d(Module):
    """Max over kernel windows (no padding, like torch's default).

    Shape: (N, C, H, W) -> (N, C, (H - kh) // sh + 1, (W - kw) // sw + 1).
    """

    def __init__(self, kernel_size, stride=None):
        super().__init__()
        self.kernel_size = layout.pair(kernel_size)
        self.stride = layout.pair(stride if stride is not None else kernel_size)
        self._cache = None

    def _two_by_two(self) -> bool:
        """2x2 windows, stride 2 (the U-Net's): four strided slices (pool2x2.py), else im2col and max."""
        return self.kernel_size == (2, 2) and self.stride == (2, 2)

    def forward(self, x: Tensor) -> Tensor:
        if self._two_by_two():
            y, index = max_pool2x2_forward(x)
        else:
            y, index = resample.max_pool2d_forward(x, self.kernel_size, self.stride)
        self._cache = (index, x.shape) if self.training else None
        return y

    def backward(self, grad_output: Tensor) -> Tensor:
        index, shape = self._saved(self._cache)
        self._cache = None
        if self._two_by_two():
            return max_pool2x2_backward(grad_output, index, shape)
        return resample.max_pool2d_backward(grad_output, index, shape, self.kernel_size, self.stride)

    def extra_repr(self) -> str:
        return f"kernel_size={self.kernel_size}, stride={self.stride}"
