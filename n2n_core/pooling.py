"""Max pooling."""
from __future__ import annotations

from torch import Tensor

from n2n_core import layout, resample
from n2n_core.module import Module
from n2n_core.pool2x2 import max_pool2x2_backward, max_pool2x2_forward


class MaxPool2d(Module):
    """Max over kernel windows (no padding, like torch's default).

    Shape: (N, C, H, W) -> (N, C, (H - kh) // sh + 1, (W - kw) // sw + 1).

    `output_padding` p (2x2 windows only): the output is the interior of a zero-bordered buffer
    padded by p (layout.py's contract), free to read for a following convolution with padding
    p (the U-Net's 3x3 convolutions: p = 1); any other reader sees a strided tensor. The input
    gradient takes the input's padded layout when the input had one, for the same reason.
    """

    def __init__(self, kernel_size, stride=None, output_padding: int = 0):
        super().__init__()
        self.kernel_size = layout.pair(kernel_size)
        self.stride = layout.pair(stride if stride is not None else kernel_size)
        self.output_padding = int(output_padding)
        if self.output_padding and not self._two_by_two():
            raise ValueError("MaxPool2d: output_padding is for 2x2 windows with stride 2")
        self._cache = None

    def _two_by_two(self) -> bool:
        """2x2 windows, stride 2 (the U-Net's): four strided slices (pool2x2.py), else im2col and max."""
        return self.kernel_size == (2, 2) and self.stride == (2, 2)

    def forward(self, x: Tensor) -> Tensor:
        if self._two_by_two():
            y, routing = max_pool2x2_forward(x, self.output_padding, keep_routes=self.training)
        else:
            y, routing = resample.max_pool2d_forward(x, self.kernel_size, self.stride)
        self._cache = None
        if self.training:  # the input's padding, for the gradient's layout
            marked = layout.padded_buffer(x)
            self._cache = (routing, x.shape, marked[1] if marked else (0, 0))
        return y

    def backward(self, grad_output: Tensor) -> Tensor:
        routing, shape, padding = self._saved(self._cache)  # the 2x2 path's routes, or the general index
        self._cache = None
        if self._two_by_two():
            return max_pool2x2_backward(grad_output, routing, shape, padding)
        return resample.max_pool2d_backward(grad_output, routing, shape, self.kernel_size, self.stride)

    def extra_repr(self) -> str:
        return f"kernel_size={self.kernel_size}, stride={self.stride}"
