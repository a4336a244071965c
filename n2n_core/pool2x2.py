"""2x2 max pooling with stride 2 (the U-Net's) on channels-last memory: four strided slices.

The general kernel (resample.max_pool2d_forward) gathers each window with im2col and takes
`max` over the window dimension, then routes the gradient back with `scatter_` and col2im.
For non-overlapping 2x2 windows the four corners are four strided views of the input
(N, H, W, C)[:, i::2, j::2]: three elementwise maxima give the output. For backward, forward
keeps three 0/1 masks in the input's dtype, the routes: `right_top` (b > a: b is the first
maximum of the top row), `right_bottom` (d > c) and `lower` (the bottom row's maximum is
strictly larger than the top row's), which pick the window's first maximum in row-major order
on ties, as torch's. Backward splits the gradient with them in six elementwise passes:
lower part gl = g lower, d = gl right_bottom, c = gl - d, upper part gu = g - gl,
b = gu right_top, a = gu - b.

Measured side by side at two threads on a (16, 44, 64, 64) input (the default U-Net's first
pool), against a one-byte corner index and its masks `index == k`: forward and backward 4.4-4.5
ms against 6.1-6.2 (forward alone 1.7-1.9 against 2.7-2.9; torch.nn channels_last: about 1.6).
The index's multiplications cast it to floats on every pass; the float routes cost 3/4 of the
input's size in memory, kept only in training. In eval mode nothing is kept or computed for
backward (the index was built there too), and the maxima run in place in the output, with no
temporary: the bulk job's memory model (pipeline/inference/memory.py) fits a line through
two small forwards, and temporaries a workspace keeps idle bent that line.
"""
from __future__ import annotations

import torch
from torch import Tensor

from n2n_core import layout, workspace

_CORNERS = [(0, 0), (0, 1), (1, 0), (1, 1)]  # a, b, c, d: row-major


def max_pool2x2_forward(x: Tensor, output_padding: int = 0, keep_routes: bool = True) -> tuple[Tensor, Tensor | None]:
    """x (N, C, H, W) -> y (N, C, H // 2, W // 2) and, with `keep_routes`, the routes backward
    needs: (3, N, H // 2, W // 2, C) 0/1 values in x's dtype (right_top, right_bottom, lower), else None.

    `output_padding` p > 0: y is the marked interior of a zero-bordered padded buffer (N, Ho + p, Wo + p, C)
    (layout.py's contract), which a following convolution with padding p reads without a copy."""
    N, C, H, W = x.shape
    Ho, Wo = H // 2, W // 2
    if Ho == 0 or Wo == 0:
        raise ValueError(f"input {tuple(x.shape)} too small for max-pool kernel (2, 2)")
    v = x.permute(0, 2, 3, 1)[:, :2 * Ho, :2 * Wo]  # (N, 2Ho, 2Wo, C), a view
    a, b, c, d = (v[:, i::2, j::2] for i, j in _CORNERS)
    p = output_padding
    buffer = layout.new_padded(x, N, Ho, Wo, C, (p, p))
    y = buffer[:, p:, p:]  # (N, Ho, Wo, C): the whole buffer when p = 0
    torch.maximum(a, b, out=y)  # the top row's maximum, for now
    routes = None
    if keep_routes:
        bottom = workspace.empty(x, N, Ho, Wo, C)
        torch.maximum(c, d, out=bottom)
        routes = workspace.empty(x, 3, N, Ho, Wo, C)
        right_top, right_bottom, lower = routes.unbind(0)
        torch.gt(b, a, out=right_top)  # comparisons written as 0/1 in x's dtype, no bool pass
        torch.gt(d, c, out=right_bottom)
        torch.gt(bottom, y, out=lower)  # the bottom row wins only when strictly larger
        torch.maximum(y, bottom, out=y)
    else:  # inference: no temporary at all
        torch.maximum(y, c, out=y)
        torch.maximum(y, d, out=y)
    if not p:
        return layout.nchw_view(y), routes
    layout.zero_border(buffer, (p, p))
    return layout.padded_interior(buffer, (p, p)), routes


def max_pool2x2_backward(grad_y: Tensor, routes: Tensor, x_shape, padding=(0, 0)) -> Tensor:
    """(N, C, Ho, Wo) and the forward's routes -> (N, C, H, W): each output gradient to its window's
    first maximum, zero elsewhere.

    `padding` (ph, pw) other than (0, 0): the gradient is the marked interior of a zero-bordered
    buffer padded so (pass the input's, when it was one: the backward of the convolution that
    made it reads the gradient without a copy)."""
    N, C, H, W = x_shape
    Ho, Wo = routes.shape[2:4]
    ph, pw = padding
    right_top, right_bottom, lower = routes.unbind(0)
    g = grad_y.permute(0, 2, 3, 1)  # (N, Ho, Wo, C)
    buffer = layout.new_padded(grad_y, N, H, W, C, padding)
    gx = buffer[:, ph:, pw:]
    if H != 2 * Ho or W != 2 * Wo:  # odd sizes: the last row or column belongs to no window
        gx.zero_()
    a, b, c, d = (gx[:, i::2, j::2][:, :Ho, :Wo] for i, j in _CORNERS)
    part = torch.mul(g, lower, out=workspace.empty(grad_y, N, Ho, Wo, C))  # the lower row's share
    torch.mul(part, right_bottom, out=d)
    torch.sub(part, d, out=c)
    torch.sub(g, part, out=part)  # the upper row's share
    torch.mul(part, right_top, out=b)
    torch.sub(part, b, out=a)
    if not (ph or pw):
        return layout.nchw_view(gx)
    layout.zero_border(buffer, padding)
    return layout.padded_interior(buffer, padding)
