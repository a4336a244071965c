"""Nearest x2 upsampling then a 3x3 convolution (padding 1) as one GEMM and 16 shifted adds.

The seed networks' `Upsampling` layer. Output pixel (2a + r, 2b + c) of
conv3x3(upsample2x(x)) is a 2x2 convolution of x (functional.py, "nearest x2 upsampling
fused with a 3x3 stride-1 convolution"): with x zero-padded by 1 to xp (N, H+2, W+2, C),

    y_rc[a, b] = sum over i, j in {0, 1} of  xp[a + r + i, b + c + j] @ K[r, c, i, j]      (C) @ (C, O)

Here every input pixel is multiplied by all 16 kernels K[r, c, i, j] at once, one GEMM

    Z = xp (N*Hp*Wp, C) @ K (C, 16*O)          Z: (N, Hp, Wp, r, c, i, j, O)

and each output phase is the sum of four shifted slices of Z, y_rc = sum_ij Z[:, r+i : r+i+H,
c+j : c+j+W, r, c, i, j]. The same multiply-adds as the four phase convolutions, without
their im2col copy (4 x 4C columns per input pixel: 200 MB for the seed's last layer at batch 64
of 64x64), and the GEMM has a wide output (16 O) even when O is thin (the 3-channel output
layer, whose phase GEMMs ran at 3 output columns). Backward reverses it: the output gradient's
slices are placed into dZ (the adjoint of the shifted sums), then dK = xp^T @ dZ and
dxp = dZ @ K^T, two more well-shaped GEMMs; what backward keeps is the padded input (1/16 of
the columns it kept before). Measured by `bench/core.py` (BENCHMARKS.md, "Core").

Memory layout: channels-last throughout (functional.py's layout contract); the output is the
(N, O, 2H, 2W) view of a contiguous (N, 2H, 2W, O) buffer.
"""
from __future__ import annotations

import torch
from torch import Tensor

from n2n_core import functional as fn

_PHASES = [(r, c, i, j) for r in range(2) for c in range(2) for i in range(2) for j in range(2)]  # Z's order


def _phase_kernels(weight: Tensor) -> Tensor:
    """(O, C, 3, 3) -> K (C, 16*O), columns ordered (r, c, i, j, O): the 2x2 kernel of each output phase."""
    O, C = weight.shape[:2]
    taps = weight.new_tensor(fn._PHASE_TAPS)  # (r, i, d): 1 when kernel row d of phase r falls on tap i
    return torch.einsum("rid,cje,oCde->Crcijo", taps, taps, weight).reshape(C, 16 * O)


_BLOCK_ELEMENTS = 1 << 21  # of Z per block: 8 MB in float32, so the GEMM writes and the shifted adds read it in cache


def _bands(N: int, H: int, per_row: int) -> list[tuple[slice, int, int]]:
    """(images, first output row, stop row): blocks of whole images, or of output rows of one image,
    with about _BLOCK_ELEMENTS of Z each (a band of rows [a0, a1) reads padded rows [a0, a1 + 2))."""
    per_image = (H + 2) * per_row
    if per_image <= _BLOCK_ELEMENTS:
        step = _BLOCK_ELEMENTS // per_image
        return [(slice(n, n + step), 0, H) for n in range(0, N, step)]
    rows = max(1, _BLOCK_ELEMENTS // per_row - 2)
    return [(slice(n, n + 1), a, min(H, a + rows)) for n in range(N) for a in range(0, H, rows)]


def upsample2x_conv3x3_forward(x: Tensor, weight: Tensor, bias: Tensor | None, keep_input: bool = True):
    """conv2d(upsample_nearest(x, 2), weight, bias, padding=1): x (N, C, H, W) -> y (N, O, 2H, 2W).

    Returns y and, when `keep_input`, the padded input xp (N, H+2, W+2, C) backward needs (else None).
    """
    N, C, H, W = x.shape
    O = weight.shape[0]
    xp = fn._pad_nhwc(x, (1, 1))  # (N, Hp, Wp, C), zero border
    Wp = W + 2
    kernels = _phase_kernels(weight)  # (C, 16 O)
    y = x.new_empty(N, 2 * H, 2 * W, O)
    for images, a0, a1 in _bands(N, H, Wp * 16 * O):
        src = xp[images, a0:a1 + 2]  # (n, rows + 2, Wp, C): contiguous (whole images, or rows of one)
        n, rows = src.shape[0], a1 - a0
        z = (src.reshape(-1, C) @ kernels).view(n, rows + 2, Wp, 2, 2, 2, 2, O)
        phases = y[images, 2 * a0:2 * a1].view(n, rows, 2, W, 2, O)  # (n, a, r, b, c, O)
        for r in range(2):
            for c in range(2):
                out = phases[:, :, r, :, c]  # (n, rows, W, O), strided
                for i in range(2):
                    for j in range(2):
                        part = z[:, r + i:r + i + rows, c + j:c + j + W, r, c, i, j]
                        if i or j:
                            out += part
                        elif bias is not None:
                            torch.add(part, bias, out=out)
                        else:
                            out.copy_(part)
    return fn.nchw_view(y), (xp if keep_input else None)


def upsample2x_conv3x3_backward(grad_y: Tensor, xp: Tensor, weight: Tensor, need_input_grad: bool = True):
    """grad_y (N, O, 2H, 2W), padded input xp (N, H+2, W+2, C) ->
    (grad_x (N, C, H, W) or None, grad_weight (O, C, 3, 3), grad_bias (O,)).

    In blocks of whole images (dZ of one block stays in cache between the three products).
    """
    N, Hp, Wp, C = xp.shape
    H, W = Hp - 2, Wp - 2
    O = weight.shape[0]
    g = grad_y.permute(0, 2, 3, 1).unflatten(1, (H, 2)).unflatten(3, (W, 2))  # (n, a, r, b, c, O), a view
    kernels_t = _phase_kernels(weight).t() if need_input_grad else None  # (16 O, C)
    grad_k = grad_y.new_zeros(C, 16 * O)
    gxp = grad_y.new_empty(N, Hp, Wp, C) if need_input_grad else None
    step = max(1, _BLOCK_ELEMENTS // (Hp * Wp * 16 * O))
    for s in range(0, N, step):
        n = min(N, s + step) - s
        dz = grad_y.new_zeros(n, Hp, Wp, 2, 2, 2, 2, O)  # where no shifted slice lands, Z did not reach y
        for r, c, i, j in _PHASES:
            dz[:, r + i:r + i + H, c + j:c + j + W, r, c, i, j] = g[s:s + n, :, r, :, c]
        dz = dz.view(-1, 16 * O)  # (n*Hp*Wp, 16 O)
        grad_k += fn._tn(xp[s:s + n].reshape(-1, C), dz)
        if need_input_grad:
            torch.mm(dz, kernels_t, out=gxp[s:s + n].view(-1, C))
    grad_bias = g.sum((0, 1, 2, 3, 4))
    taps = weight.new_tensor(fn._PHASE_TAPS)
    grad_weight = torch.einsum("rid,cje,Crcijo->oCde", taps, taps, grad_k.view(C, 2, 2, 2, 2, O))
    grad_x = None
    if need_input_grad:  # the border rows of gxp are the padding's gradient: dropped
        grad_x = fn.nchw_view(gxp[:, 1:H + 1, 1:W + 1])
    return grad_x, grad_weight, grad_bias
