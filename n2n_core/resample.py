"""Nearest upsampling, max pooling, and nearest x2 upsampling fused with a 3x3 convolution as
phase columns and one batched GEMM (the gemm plan's; the CPU's runs upsample_conv.py).
"""
from __future__ import annotations

import functools

import torch
from torch import Tensor

from n2n_core import row_split
from n2n_core.conv_plan import ConvPlan
from n2n_core.gemm_conv import _col2im, _im2col, _tn, conv2d_forward
from n2n_core.layout import _pad_nhwc, conv_output_size, nchw_view, nhwc


@functools.lru_cache(maxsize=None)
def _constant(name: str, device: torch.device, dtype: torch.dtype) -> Tensor:
    """A module-level table (`_PHASE_TAPS`, `_GRAD_TAPS`) as a tensor, made once per device and dtype:
    no host-to-device copy per call."""
    return torch.tensor(globals()[name], dtype=dtype, device=device)



def upsample_nearest_forward(x: Tensor, scale: int) -> Tensor:
    """(N, C, H, W) -> (N, C, H*s, W*s), channels-last memory."""
    N, C, H, W = x.shape
    xn = x.permute(0, 2, 3, 1)  # (N, H, W, C)
    up = xn[:, :, None, :, None].expand(N, H, scale, W, scale, C).reshape(N, H * scale, W * scale, C)
    return nchw_view(up)


def upsample_nearest_backward(grad_y: Tensor, scale: int) -> Tensor:
    """Sum each s x s block: (N, C, H*s, W*s) -> (N, C, H, W)."""
    g = grad_y.permute(0, 2, 3, 1)  # (N, Hs, Ws, C), a view of any strides
    # s*s strided slices added: ~10x faster than a sum over the block dimensions of a view
    total = g[:, 0::scale, 0::scale].clone(memory_format=torch.contiguous_format)  # (N, H, W, C)
    for i in range(scale):
        for j in range(scale):
            if i or j:
                total += g[:, i::scale, j::scale]
    return nchw_view(total)


def max_pool2d_forward(x: Tensor, kernel, stride) -> tuple[Tensor, Tensor]:
    """(N, C, H, W) -> y (N, C, Ho, Wo) and the argmax (N, Ho, Wo, C) of each window (row-major, first max)."""
    N, C, H, W = x.shape
    (kh, kw), (sh, sw) = kernel, stride
    Ho = conv_output_size(H, kh, sh, 0, 1)
    Wo = conv_output_size(W, kw, sw, 0, 1)
    if Ho <= 0 or Wo <= 0:
        raise ValueError(f"input {tuple(x.shape)} too small for max-pool kernel {kernel}")
    # non-overlapping windows are a reshape of any (N, H, W, C) view: no contiguous copy first
    xn = x.permute(0, 2, 3, 1) if (kh, kw) == (sh, sw) else nhwc(x)
    cols = _im2col(xn, kernel, stride, (1, 1), (Ho, Wo)).view(N, Ho, Wo, kh * kw, C)
    y, index = cols.max(dim=3)  # (N, Ho, Wo, C)
    return nchw_view(y), index


def max_pool2d_backward(grad_y: Tensor, index: Tensor, x_shape, kernel, stride) -> Tensor:
    """Route each output gradient to its window's argmax: (N, C, Ho, Wo) -> (N, C, H, W)."""
    N, C, H, W = x_shape
    (kh, kw) = kernel
    Ho, Wo = grad_y.shape[2:]
    gwin = grad_y.new_zeros(N, Ho, Wo, kh * kw, C)
    gwin.scatter_(3, index.unsqueeze(3), nhwc(grad_y).unsqueeze(3))
    gx = _col2im(gwin.view(N * Ho * Wo, kh * kw * C), (N, H, W, C), kernel, stride, (1, 1), (Ho, Wo))
    return nchw_view(gx)


# -- nearest x2 upsampling fused with a 3x3 stride-1 convolution, padding 1 ---------------------
# Output pixel (2a + r, 2b + c) of conv3x3(upsample2x(x)) only sees x rows a + r - 1, a + r and
# columns b + c - 1, b + c: each of the four output phases (r, c) is a 2x2 convolution of x
# (padded by 1) whose taps are sums of the 3x3 taps: 16 instead of 36 multiply-adds per
# input pixel and channel pair. Rows and columns follow the same rule, so one table serves both.


def _source_row(r: int, d: int) -> int:
    """Kernel row d (0..2) of output row 2a + r reads upsampled row 2a + r + d - 1, which is x row
    a + _source_row(r, d)."""
    return (r + d - 1) // 2


# _PHASE_TAPS[r][i][d] = 1 when kernel row d of phase r falls on tap i of its 2x2 kernel (x row a + r - 1 + i).
_PHASE_TAPS = [[[int(_source_row(r, d) == r - 1 + i) for d in range(3)] for i in range(2)] for r in range(2)]
# The input gradient as one 3x3 convolution (padding 1) of the four phase gradients stacked as
# channels: _GRAD_TAPS[r][u][d] = 1 when kernel row d reaches x row a from phase r's row a + u - 1.
_GRAD_TAPS = [[[int(u - 1 + _source_row(r, d) == 0) for d in range(3)] for u in range(3)] for r in range(2)]


def _phase_columns(x: Tensor) -> Tensor:
    """x (N, C, H, W) -> the 2x2 windows of each phase, (4, N*H*W, 2*2*C) ordered (r, c) x (i, j, C)."""
    N, C, H, W = x.shape
    xp = _pad_nhwc(x, (1, 1))  # (N, H+1, W+1, C): layout.py's padded buffer, whose windows read as the phase taps do
    sN, sH, sW, _ = xp.stride()
    win = xp.as_strided((2, 2, N, H, W, 2, 2, C), (sH, sW, sN, sH, sW, sH, sW, 1), xp.storage_offset())
    return win.reshape(4, N * H * W, 4 * C)  # one copy


def upsample2x_conv3x3_forward(x: Tensor, weight: Tensor, bias: Tensor | None, keep_cols: bool = True):
    """conv2d(upsample_nearest(x, 2), weight, bias, padding=1): x (N, C, H, W) -> (N, O, 2H, 2W).

    Returns the output and the phase columns (4, N*H*W, 4*C) for the weight gradient.
    """
    N, C, H, W = x.shape
    O = weight.shape[0]
    taps = _constant("_PHASE_TAPS", weight.device, weight.dtype)  # (2, 2, 3)
    kernels = torch.einsum("rid,cje,oCde->rcijCo", taps, taps, weight).reshape(4, 4 * C, O)
    cols = _phase_columns(x)  # (4, M, 4C)
    y4 = torch.baddbmm(bias, cols, kernels) if bias is not None else torch.bmm(cols, kernels)  # (4, M, O)
    # (r, c, N, H, W, O) -> (N, H, r, W, c, O) = (N, 2H, 2W, O)
    y = y4.view(2, 2, N, H, W, O).permute(2, 3, 0, 4, 1, 5).reshape(N, 2 * H, 2 * W, O)
    return nchw_view(y), (cols if keep_cols else None)


def upsample2x_conv3x3_backward(grad_y: Tensor, cols: Tensor, x_shape, weight: Tensor, need_input_grad=True,
                                plan: ConvPlan | None = None):
    """grad_y (N, O, 2H, 2W) -> (grad_x (N, C, H, W) or None, grad_weight (O, C, 3, 3), grad_bias (O,))."""
    N, C, H, W = x_shape
    O = weight.shape[0]
    # the phase gradients stacked as channels: (N, H, r, W, c, O) -> (N, H, W, r, c, O), one copy
    g = grad_y.permute(0, 2, 3, 1).reshape(N, H, 2, W, 2, O).permute(0, 1, 3, 2, 4, 5).reshape(N, H, W, 4 * O)
    g_phase = g.view(N * H * W, 4, O).transpose(0, 1)  # (4, M, O), a strided view
    grad_k = _tn(cols, g_phase)  # (4, 4C, O)
    taps = _constant("_PHASE_TAPS", weight.device, weight.dtype)
    grad_weight = torch.einsum("rid,cje,rcijCo->oCde", taps, taps, grad_k.reshape(2, 2, 2, 2, C, O))
    grad_bias = row_split.column_sums(g.view(N * H * W * 4, O))
    grad_x = None
    if need_input_grad:
        gtaps = _constant("_GRAD_TAPS", weight.device, weight.dtype)  # (2, 3, 3)
        kernel = torch.einsum("rud,cve,oCde->Crcouv", gtaps, gtaps, weight).reshape(C, 4 * O, 3, 3)
        grad_x, _ = conv2d_forward(nchw_view(g), kernel, None, (1, 1), (1, 1), (1, 1), keep_cols=False, plan=plan)
    return grad_x, grad_weight, grad_bias
