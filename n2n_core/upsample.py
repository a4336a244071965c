"""`NearestUpsample2x`: nearest-neighbour upsampling by 2, no parameters.

The U-Net upsamples, concatenates the skip, then convolves; `Upsampling` (conv.py)
fuses upsample and convolution, so the U-Net needs the bare resampling step too.
"""
from __future__ import annotations

from torch import Tensor

from n2n_core.module import Module


class NearestUpsample2x(Module):
    """Repeat every pixel into a 2x2 block (torch `interpolate(scale_factor=2, mode="nearest")`).

    Backward sums the gradient over each 2x2 block.
    Shape:
        Input: (N, C, H, W) -> Output: (N, C, 2H, 2W).
    """

    def forward(self, x: Tensor) -> Tensor:
        n, c, h, w = x.shape
        # (N, C, H, 1, W, 1) -> (N, C, H, 2, W, 2) -> (N, C, 2H, 2W)
        return x[:, :, :, None, :, None].expand(n, c, h, 2, w, 2).reshape(n, c, 2 * h, 2 * w)

    def backward(self, grad_output: Tensor) -> Tensor:
        n, c, h2, w2 = grad_output.shape
        # (N, C, 2H, 2W) -> (N, C, H, 2, W, 2) -> sum over each block -> (N, C, H, W)
        return grad_output.reshape(n, c, h2 // 2, 2, w2 // 2, 2).sum(dim=(3, 5))
