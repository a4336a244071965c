"""Pure forward/backward kernels of the layers (no state): convolution, pooling, upsampling.

Layout: NCHW. Convolution is im2col (`unfold`) + matrix product; its input gradient
is the matrix product back onto columns then `fold` (col2im).
"""
from __future__ import annotations

import torch
from torch.nn.functional import fold, unfold  # the only torch.nn allowed
from torch import Tensor


def pair(value) -> tuple[int, int]:
    if isinstance(value, int):
        return (value, value)
    value = tuple(int(v) for v in value)
    if len(value) != 2:
        raise ValueError(f"expected an int or a pair, got {value}")
    return value


def conv_output_size(size: int, kernel: int, stride: int, padding: int, dilation: int) -> int:
    return (size + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1


def conv2d_forward(x: Tensor, weight: Tensor, bias: Tensor | None, stride, padding, dilation) -> tuple[Tensor, Tensor]:
    """x (N, C, H, W), weight (O, C, kh, kw) -> y (N, O, Ho, Wo) and the columns (N, C*kh*kw, L)."""
    N, C, H, W = x.shape
    O, _, kh, kw = weight.shape
    Ho = conv_output_size(H, kh, stride[0], padding[0], dilation[0])
    Wo = conv_output_size(W, kw, stride[1], padding[1], dilation[1])
    if Ho <= 0 or Wo <= 0:
        raise ValueError(f"input {tuple(x.shape)} too small for kernel {(kh, kw)} with padding {padding}, dilation {dilation}")
    cols = unfold(x, (kh, kw), dilation=dilation, padding=padding, stride=stride)  # (N, C*kh*kw, L)
    y = weight.reshape(O, -1) @ cols  # (N, O, L)
    if bias is not None:
        y += bias.reshape(1, O, 1)
    return y.reshape(N, O, Ho, Wo), cols


def conv2d_backward(grad_y: Tensor, cols: Tensor, x_shape, weight: Tensor, stride, padding, dilation, need_input_grad=True):
    """grad_y (N, O, Ho, Wo) -> (grad_x (N, C, H, W) or None, grad_weight (O, C, kh, kw), grad_bias (O,))."""
    N, O = grad_y.shape[:2]
    g = grad_y.reshape(N, O, -1)  # (N, O, L)
    grad_weight = (g @ cols.transpose(1, 2)).sum(0).reshape(weight.shape)  # (O, C*kh*kw)
    grad_bias = g.sum((0, 2))
    grad_x = None
    if need_input_grad:
        grad_cols = weight.reshape(O, -1).t() @ g  # (N, C*kh*kw, L)
        grad_x = fold(grad_cols, x_shape[-2:], weight.shape[-2:], dilation=dilation, padding=padding, stride=stride)
    return grad_x, grad_weight, grad_bias


def conv_transpose2d_forward(x: Tensor, weight: Tensor, bias: Tensor | None, stride, padding, output_padding, dilation):
    """x (N, Cin, H, W), weight (Cin, Cout, kh, kw) -> y (N, Cout, Ho, Wo), Ho = (H-1)s - 2p + d(k-1) + op + 1."""
    N, Cin, H, W = x.shape
    _, Cout, kh, kw = weight.shape
    Ho = (H - 1) * stride[0] - 2 * padding[0] + dilation[0] * (kh - 1) + output_padding[0] + 1
    Wo = (W - 1) * stride[1] - 2 * padding[1] + dilation[1] * (kw - 1) + output_padding[1] + 1
    cols = weight.reshape(Cin, -1).t() @ x.reshape(N, Cin, H * W)  # (N, Cout*kh*kw, H*W)
    y = fold(cols, (Ho, Wo), (kh, kw), dilation=dilation, padding=padding, stride=stride)
    if bias is not None:
        y += bias.reshape(1, Cout, 1, 1)
    return y


def conv_transpose2d_backward(grad_y: Tensor, x: Tensor, weight: Tensor, stride, padding, dilation):
    """The transpose of the forward: unfold the output gradient (a convolution)."""
    N, Cin, H, W = x.shape
    _, Cout, kh, kw = weight.shape
    gcols = unfold(grad_y, (kh, kw), dilation=dilation, padding=padding, stride=stride)  # (N, Cout*kh*kw, H*W)
    grad_x = (weight.reshape(Cin, -1) @ gcols).reshape(N, Cin, H, W)
    grad_weight = (x.reshape(N, Cin, H * W) @ gcols.transpose(1, 2)).sum(0).reshape(weight.shape)
    grad_bias = grad_y.sum((0, 2, 3))
    return grad_x, grad_weight, grad_bias


def upsample_nearest_forward(x: Tensor, scale: int) -> Tensor:
    """(N, C, H, W) -> (N, C, H*s, W*s)."""
    return x.repeat_interleave(scale, dim=2).repeat_interleave(scale, dim=3)


def upsample_nearest_backward(grad_y: Tensor, scale: int) -> Tensor:
    """Sum each s x s block: (N, C, H*s, W*s) -> (N, C, H, W)."""
    N, C, Hs, Ws = grad_y.shape
    return grad_y.reshape(N, C, Hs // scale, scale, Ws // scale, scale).sum((3, 5))


def max_pool2d_forward(x: Tensor, kernel, stride) -> tuple[Tensor, Tensor]:
    """(N, C, H, W) -> y (N, C, Ho, Wo) and argmax indices into each window's columns."""
    N, C, H, W = x.shape
    cols = unfold(x.reshape(N * C, 1, H, W), kernel, stride=stride)  # (N*C, kh*kw, L)
    y, index = cols.max(dim=1)
    Ho = conv_output_size(H, kernel[0], stride[0], 0, 1)
    Wo = conv_output_size(W, kernel[1], stride[1], 0, 1)
    return y.reshape(N, C, Ho, Wo), index


def max_pool2d_backward(grad_y: Tensor, index: Tensor, x_shape, kernel, stride) -> Tensor:
    N, C, H, W = x_shape
    L = index.shape[-1]
    gcols = grad_y.new_zeros(N * C, kernel[0] * kernel[1], L)
    gcols.scatter_(1, index.unsqueeze(1), grad_y.reshape(N * C, 1, L))
    return fold(gcols, (H, W), kernel, stride=stride).reshape(N, C, H, W)
