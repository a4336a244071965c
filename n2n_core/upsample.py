"""`NearestUpsample2x`: nearest-neighbour upsampling by 2, no parameters.

The U-Net upsamples, concatenates the skip, then convolves; `Upsampling` (conv.py)
fuses upsample and convolution, so the U-Net needs the bare resampling step too.
"""
from __future__ import annotations

from torch import Tensor

from n2n_core import resample
from n2n_core.module import Module


class NearestUpsample2x(Module):
    """Repeat every pixel into a 2x2 block (torch `interpolate(scale_factor=2, mode="nearest")`).

    Backward sums the gradient over each 2x2 block.
    Shape:
        Input: (N, C, H, W) -> Output: (N, C, 2H, 2W).
    """

    def forward(self, x: Tensor) -> Tensor:
        return resample.upsample_nearest_forward(x, 2)  # channels-last memory, like every n2n layer's output

    def backward(self, grad_output: Tensor) -> Tensor:
        return resample.upsample_nearest_backward(grad_output, 2)
