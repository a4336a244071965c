"""2x2 max pooling with stride 2 (the U-Net's) on channels-last memory: four strided slices.

The general kernel (resample.max_pool2d_forward) gathers each window with im2col and takes
`max` over the window dimension, then routes the gradient back with `scatter_` and col2im.
For non-overlapping 2x2 windows the four corners are four strided views of the input
(N, H, W, C)[:, i::2, j::2]; three elementwise maxima give the output, and the one-byte
index of each output's corner (0..3, row-major, the first maximum on ties, as torch's) comes
from three comparisons. Backward writes each corner's gradient, grad times the 0/1 mask
`index == k`, into its strided view. Measured side by side at one thread on a (16, 48, 64, 64) input, on a
loaded machine: forward and backward 45-49 ms against 58-66 ms for the general kernel (torch.nn
channels_last: 17-21 ms; its forward alone 3-5 ms, ours 15-17 ms).
"""
from __future__ import annotations

import torch
from torch import Tensor

from n2n_core import layout, workspace

_CORNERS = [(0, 0), (0, 1), (1, 0), (1, 1)]  # index k = 2 i + j


def max_pool2x2_forward(x: Tensor, output_padding: int = 0) -> tuple[Tensor, Tensor]:
    """x (N, C, H, W) -> y (N, C, H // 2, W // 2) and the corner index (N, H // 2, W // 2, C) as uint8.

    `output_padding` p > 0: y is the marked interior of a zero-bordered buffer (N, Ho + 2p, Wo + 2p, C)
    (layout.py's contract), which a following convolution with padding p reads without a copy."""
    N, C, H, W = x.shape
    Ho, Wo = H // 2, W // 2
    if Ho == 0 or Wo == 0:
        raise ValueError(f"input {tuple(x.shape)} too small for max-pool kernel (2, 2)")
    v = x.permute(0, 2, 3, 1)[:, :2 * Ho, :2 * Wo]  # (N, 2Ho, 2Wo, C), a view
    a, b, c, d = (v[:, i::2, j::2] for i, j in _CORNERS)
    # bool -> uint8 as a view: a conversion (.to) or torch.where on bools measured 10-20x slower
    right_top = (b > a).view(torch.uint8)  # 1 where b is the first maximum of the top row
    right_bottom = (d > c).view(torch.uint8)
    top, bottom = torch.maximum(a, b), torch.maximum(c, d)
    lower = (bottom > top).view(torch.uint8)  # the bottom row wins only when strictly larger
    index = right_top + lower * (2 + right_bottom - right_top)  # 2 i + j of the window's first maximum
    if not output_padding:
        return layout.nchw_view(torch.maximum(top, bottom, out=top)), index  # (N, Ho, Wo, C), contiguous
    p = output_padding
    buffer = workspace.empty(x, N, Ho + 2 * p, Wo + 2 * p, C)
    torch.maximum(top, bottom, out=buffer[:, p:p + Ho, p:p + Wo])
    layout.zero_border(buffer, (p, p))
    return layout.padded_interior(buffer, (p, p)), index


def max_pool2x2_backward(grad_y: Tensor, index: Tensor, x_shape, padding=(0, 0)) -> Tensor:
    """(N, C, Ho, Wo) -> (N, C, H, W): each output gradient to its window's maximum, zero elsewhere.

    `padding` (ph, pw) other than (0, 0): the gradient is the marked interior of a zero-bordered
    buffer padded so (pass the input's, when it was one: the backward of the convolution that
    made it reads the gradient without a copy)."""
    N, C, H, W = x_shape
    Ho, Wo = index.shape[1:3]
    ph, pw = padding
    g = grad_y.permute(0, 2, 3, 1)  # (N, Ho, Wo, C)
    buffer = workspace.empty(grad_y, N, H + 2 * ph, W + 2 * pw, C)
    gx = buffer[:, ph:ph + H, pw:pw + W]
    if H != 2 * Ho or W != 2 * Wo:  # odd sizes: the last row or column belongs to no window
        gx.zero_()
    body = gx[:, :2 * Ho, :2 * Wo]
    for k, (i, j) in enumerate(_CORNERS):
        # g times the corner's 0/1 mask as uint8: 2x faster than where(index == k, g, 0) on the bool mask
        torch.mul(g, (index == k).view(torch.uint8), out=body[:, i::2, j::2])
    if not (ph or pw):
        return layout.nchw_view(gx)
    layout.zero_border(buffer, padding)
    return layout.padded_interior(buffer, padding)
