"""Nearest x2 upsampling then a 3x3 convolution (padding 1), at low resolution, on a CPU.

The seed networks' `Upsampling` and the U-Net decoder's `UpsampleConcatConv2d` (conv.py).
Output pixel (2a + r, 2b + c) of conv3x3(upsample2x(x)) is a 2x2 convolution of x
(resample.py, "nearest x2 upsampling fused with a 3x3 stride-1 convolution"): with x
zero-padded by 1 to xp (N, H+2, W+2, C),

    y_rc[a, b] = sum over i, j in {0, 1} of  xp[a + r + i, b + c + j] @ K[r, c, i, j]      (C) @ (C, O)

16 C O multiply-adds per input pixel instead of 36 C O for the convolution of the upsampled
image. Two ways to compute it, neither building the phase columns (resample.py's path, 16 C
values per input pixel: 200 MB for the seed's last layer at batch 64 of 64x64):

- output taps, for thin outputs (O < 16: the seed's 3-channel output layer): every input
  pixel times all 16 kernels in one GEMM, Z = xp (N*Hp*Wp, C) @ K (C, 16 O), then each phase
  is the sum of four shifted slices of Z, y_rc = sum_ij Z[:, r+i : r+i+H, c+j : c+j+W, r, c, i, j],
  in cache-sized blocks. The GEMM is 16 O wide where the phase GEMMs were O = 3 wide.
- phase taps, for the rest: 16 shifted GEMMs (L, C) @ (C, O) over the flat padded input
  (tap_conv.py's tap convolutions, four per phase), no Z to write and read back.

`forward`, `into` and `backward` choose by O (`_thin`); the rule is measured (BENCHMARKS.md,
"Core"). Backward keeps only the padded input xp, for both. Channels-last memory throughout
(layout.py's contract).
"""
from __future__ import annotations

import functools

import torch
from torch import Tensor

from n2n_core import conv_plan, gemm_conv, layout, resample, row_split, tap_conv, workspace

_PHASES = [(r, c, i, j) for r in range(2) for c in range(2) for i in range(2) for j in range(2)]  # Z's order


@functools.lru_cache(maxsize=None)
def _phase_matrix(device: torch.device, dtype: torch.dtype) -> Tensor:
    """(16, 9), rows (r, c, i, j), columns (d, e): 1 where tap (d, e) of the 3x3 kernel falls on tap
    (i, j) of phase (r, c)'s 2x2 kernel (resample._PHASE_TAPS in both directions), made once per
    device and dtype. The phase kernels and their gradient are matrix products with it: for an
    88 x 88 kernel at two threads 73 and 55 us a call, where einsums of the tables and the weight
    took 93 and 209 (12 calls a U-Net training step)."""
    taps = resample._constant("_PHASE_TAPS", device, dtype)  # (r, i, d)
    return torch.einsum("rid,cje->rcijde", taps, taps).reshape(16, 9)


def _phase_kernels(weight: Tensor) -> Tensor:
    """(O, C, 3, 3) -> K (C, 16*O), columns ordered (r, c, i, j, O): the 2x2 kernel of each output phase."""
    O, C = weight.shape[:2]
    k = weight.reshape(O * C, 9) @ _phase_matrix(weight.device, weight.dtype).t()  # (O C, 16)
    return k.view(O, C, 16).permute(1, 2, 0).reshape(C, 16 * O)


def _phase_weight_grad(grad_k: Tensor) -> Tensor:
    """The gradient of the phase kernels, (16, C, O) in the order of `_phase_kernels`'s columns ->
    the weight's (O, C, 3, 3): the transpose of `_phase_kernels`."""
    C, O = grad_k.shape[1:]
    g = grad_k.reshape(16, C * O).t() @ _phase_matrix(grad_k.device, grad_k.dtype)  # (C O, 9)
    return g.view(C, O, 3, 3).transpose(0, 1)


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


def forward(x: Tensor, weight: Tensor, bias: Tensor | None, keep_input: bool = True):
    """conv2d(upsample_nearest(x, 2), weight, bias, padding=1): x (N, C, H, W) -> y (N, O, 2H, 2W).

    Returns y and, when `keep_input`, the padded input xp backward needs (else None; `into`).
    """
    N, C, H, W = x.shape
    y = workspace.empty(x, N, 2 * H, 2 * W, weight.shape[0])
    xp = into(y, x, weight, bias, accumulate=False)
    return layout.nchw_view(y), (xp if keep_input else None)


def _thin(out_channels: int) -> bool:
    """Output taps for fewer than 16 output channels, phase taps otherwise. Measured at one thread
    (fw + bw, batch 16-64 of 16x16-32x32 inputs, and 128-256 px inference): phase taps take
    0.68-1.0x the time of output taps for 48-96 outputs; output taps 0.7-0.8x of phase taps for 3."""
    return out_channels < conv_plan._MIN_GEMM_CHANNELS


def into(y: Tensor, x: Tensor, weight: Tensor, bias: Tensor | None, accumulate: bool, epilogue=None) -> Tensor:
    """Write (or with `accumulate`, add) conv2d(upsample_nearest(x, 2), weight, bias, padding=1) into
    y (N, 2H, 2W, O), any strides with a contiguous last dimension; x (N, C, H, W); then
    `epilogue` (an in-place elementwise function f(view, scratch of its shape), or None) on y.
    Returns the padded input xp `backward` needs: layout.py's padded buffer (N, H+1, W+1, C) for
    phase taps, (N, H+2, W+2, C) with borders of its own for output taps."""
    if _thin(weight.shape[0]):
        xp = _output_taps_into(y, x, weight, bias, accumulate)
        if epilogue is not None:
            epilogue(y, torch.empty_like(y))
        return xp
    return _phase_taps_into(y, x, weight, bias, accumulate, epilogue)


def backward(grad_y: Tensor, xp: Tensor, weight: Tensor, need_input_grad: bool = True, need_bias_grad: bool = True):
    """grad_y (N, O, 2H, 2W), the padded input xp `into` returned ->
    (grad_x (N, C, H, W) or None, grad_weight (O, C, 3, 3), grad_bias (O,) or None).

    `need_bias_grad` False: UpsampleConcatConv2d, whose bias gradient its skip part sums already."""
    run = _output_taps_backward if _thin(weight.shape[0]) else _phase_taps_backward
    return run(grad_y, xp, weight, need_input_grad, need_bias_grad)


def _output_taps_into(y: Tensor, x: Tensor, weight: Tensor, bias: Tensor | None, accumulate: bool) -> Tensor:
    """`into` as one GEMM and shifted adds (output taps)."""
    N, C, H, W = x.shape
    O = weight.shape[0]
    xp = layout._pad_nhwc_full(x, (1, 1))  # (N, H + 2, W + 2, C): the bands read whole padded rows
    Wp = W + 2
    kernels = _phase_kernels(weight)  # (C, 16 O)
    for images, a0, a1 in _bands(N, H, Wp * 16 * O):
        src = xp[images, a0:a1 + 2]  # (n, rows + 2, Wp, C): contiguous (whole images, or rows of one)
        n, rows = src.shape[0], a1 - a0
        z = (src.reshape(-1, C) @ kernels).view(n, rows + 2, Wp, 2, 2, 2, 2, O)
        phases = y[images, 2 * a0:2 * a1].unflatten(1, (rows, 2)).unflatten(3, (W, 2))  # (n, a, r, b, c, O)
        for r in range(2):
            for c in range(2):
                out = phases[:, :, r, :, c]  # (n, rows, W, O), strided
                for i in range(2):
                    for j in range(2):
                        part = z[:, r + i:r + i + rows, c + j:c + j + W, r, c, i, j]
                        if i or j or accumulate:
                            out += part
                        elif bias is not None:
                            torch.add(part, bias, out=out)
                        else:
                            out.copy_(part)
                if accumulate and bias is not None:
                    out += bias
    return xp


def _output_taps_backward(grad_y: Tensor, xp: Tensor, weight: Tensor, need_input_grad: bool = True,
                          need_bias_grad: bool = True):
    """The backward of `_output_taps_into`, in blocks of whole images (dZ of one block stays in
    cache between the three products)."""
    N, Hp, Wp, C = xp.shape
    H, W = Hp - 2, Wp - 2
    O = weight.shape[0]
    g = grad_y.permute(0, 2, 3, 1).unflatten(1, (H, 2)).unflatten(3, (W, 2))  # (n, a, r, b, c, O), a view
    kernels_t = _phase_kernels(weight).t() if need_input_grad else None  # (16 O, C)
    grad_k = grad_y.new_zeros(C, 16 * O)
    gxp = workspace.empty(grad_y, N, Hp, Wp, C) if need_input_grad else None
    step = max(1, _BLOCK_ELEMENTS // (Hp * Wp * 16 * O))
    for s in range(0, N, step):
        n = min(N, s + step) - s
        dz = grad_y.new_zeros(n, Hp, Wp, 2, 2, 2, 2, O)  # where no shifted slice lands, Z did not reach y
        for r, c, i, j in _PHASES:
            dz[:, r + i:r + i + H, c + j:c + j + W, r, c, i, j] = g[s:s + n, :, r, :, c]
        dz = dz.view(-1, 16 * O)  # (n*Hp*Wp, 16 O)
        grad_k += gemm_conv._tn(xp[s:s + n].reshape(-1, C), dz)
        if need_input_grad:
            torch.mm(dz, kernels_t, out=gxp[s:s + n].view(-1, C))
    grad_bias = g.sum((0, 1, 2, 3, 4)) if need_bias_grad else None
    grad_weight = _phase_weight_grad(grad_k.view(C, 16, O).transpose(0, 1))
    grad_x = None
    if need_input_grad:  # the border rows of gxp are the padding's gradient: dropped
        grad_x = layout.nchw_view(gxp[:, 1:H + 1, 1:W + 1])
    return grad_x, grad_weight, grad_bias


# -- the same convolution as 16 shifted GEMMs at low resolution (input taps) ------------------------
# With x in layout.py's padded buffer (N, Hp, Wp, C), Hp = H + 1 and Wp = W + 1 (padding 1,
# borders shared), flattened to rows, low-resolution pixel (n, a, b) is anchored at row
# (n*Hp + a)*Wp + b (tap_conv.py's tap convolutions) and phase (r, c)'s tap (i, j) reads row
# anchor + (r + i)*Wp + (c + j): y_rc is four GEMMs (L, C) @ (C, O) accumulated into one phase
# buffer, block by block of rows, then added into y's phase (r, c) pixels. No Z of 16 O columns:
# better for wide outputs (the U-Net decoder's 64 and 96 channels), where Z's traffic outweighs
# its single GEMM. The largest offset is 2 Wp + 2, which the last anchor reaches exactly at the
# buffer's last row (layout.py, contract point 4, with kernel 3).
_ORDER = [(0, 0), (0, 1), (1, 0), (1, 1)]  # phases (r, c), and taps (i, j) of each phase


_BLOCK_ROWS = 4096  # anchors per block of the phase taps: as tap_conv.py's tap convolutions


def _block_ranges(L: int, blocks: int = 1) -> list[tuple[int, int]]:
    """Consecutive (start, stop) anchor ranges of at most `blocks` x _BLOCK_ROWS covering [0, L)."""
    rows = blocks * _BLOCK_ROWS
    return [(s, min(L, s + rows)) for s in range(0, L, rows)]


def _width(channels: int, like: Tensor) -> int:
    """The GEMM width of a phase-tap product with `channels` outputs: rounded up as the tap
    convolutions round theirs (tap_conv._gemm_width) under the device's plan. Measured in the
    default U-Net's step at two threads: (4096, 88) @ (88, 59) ran at 110 GFLOP/s, (88, 96) at 245."""
    return tap_conv._gemm_width(channels, conv_plan.plan_for(like.device))


def _phase_taps_into(y: Tensor, x: Tensor, weight: Tensor, bias: Tensor | None, accumulate: bool,
                     epilogue=None) -> Tensor:
    """As `into` (y (N, 2H, 2W, O), x (N, C, H, W)), as 16 shifted GEMMs. Returns xp.

    Blocks of whole low-resolution rows (about _BLOCK_ROWS anchors): for each phase, its four
    GEMMs fill one (rows, O') block, which is added into y's pixels of that phase at once,
    while it is in cache (a buffer of all four phases at every anchor, added afterwards, was
    four passes over memory and 19 MB for the U-Net's last decoder stage at batch 16).
    `epilogue` (an in-place elementwise function of a view and a scratch of its shape, e.g.
    LeakyReLU.activate_) runs on those pixels right after: they are final once their phase is in.
    """
    N, C, H, W = x.shape
    O = weight.shape[0]
    xp = layout._pad_nhwc(x, (1, 1))  # (N, Hp, Wp, C): layout.py's padded buffer, borders shared
    Hp, Wp = H + 1, W + 1
    flat = layout.flat_rows(xp, (1, 1))
    width = _width(O, x)
    kernels = tap_conv._widened(_phase_kernels(weight).view(C, 2, 2, 2, 2, O).permute(1, 2, 3, 4, 0, 5), width)  # (r, c, i, j, C, O')
    kernels = _matrices(kernels)  # kernels[r][c][i][j]: (C, O'), indexed once
    L = tap_conv._anchor_count(N, Hp, Wp, H, W)
    rows_per_block = _rows_per_block(Hp, Wp)  # low-resolution rows (of Wp anchors) per block
    block = workspace.empty(x, rows_per_block, Wp, width)
    scratch = None if epilogue is None else workspace.empty(x, rows_per_block, W, O)
    phases = y.unflatten(1, (H, 2)).unflatten(3, (W, 2))  # (n, a, r, b, c, O), views
    for g0 in range(0, (N - 1) * Hp + H, rows_per_block):  # global row g = n Hp + a
        g1 = min(g0 + rows_per_block, (N - 1) * Hp + H)
        start, stop = g0 * Wp, min(g1 * Wp, L)  # the anchors: the last block ends at the last real pixel
        out = block.view(-1, width)[:stop - start]
        segments = _segments(g0, g1, Hp, H, block)
        for r, c in _ORDER:
            for t, (i, j) in enumerate(_ORDER):
                offset = (r + i) * Wp + c + j
                rows = flat[start + offset:stop + offset]
                if t:
                    out.addmm_(rows, kernels[r][c][i][j])
                else:
                    torch.mm(rows, kernels[r][c][i][j], out=out)
            for images, rows, part in segments:
                target = phases[images, rows, r, :, c]  # (n, a1 - a0, W, O) or (a1 - a0, W, O), strided
                part = part[..., :W, :O]
                if accumulate:
                    target += part
                else:
                    target.copy_(part)
                if bias is not None:
                    target += bias
                if epilogue is not None:
                    epilogue(target, scratch.view(-1)[:target.numel()].view(target.shape))
    return xp


def _matrices(t: Tensor) -> list:
    """t (2, 2, 2, 2, ...) as nested lists t[r][c][i][j] of views: indexing the tensor afresh in the
    loops cost four select calls per GEMM (2,600 a U-Net step)."""
    return [[[list(m.unbind(0)) for m in b.unbind(0)] for b in a.unbind(0)] for a in t.unbind(0)]


def _rows_per_block(Hp: int, Wp: int) -> int:
    """Low-resolution rows per block of about _BLOCK_ROWS anchors: whole images when one fits (a
    multiple of Hp rows), so a block's pixels of each phase are one (images, H, W, O) view and one
    elementwise call each, where a call per image cost the small decoder stages more than their
    GEMMs (the default U-Net's 4x4 -> 8x8 layer: 16 images, 192 calls a block)."""
    rows = max(1, _BLOCK_ROWS // Wp)
    return rows - rows % Hp if rows >= Hp else rows


def _segments(g0: int, g1: int, Hp: int, H: int, block: Tensor) -> list[tuple]:
    """The real low-resolution rows among global rows [g0, g1) (row g = n Hp + a, real when a < H), and
    where they lie in `block` (rows, Wp, width): (images, rows, part) with phases[images, rows, r, :, c]
    the target in y and part its values in the block. One entry of whole images (images a slice,
    part (n, H, Wp, width)) when the block starts at an image and holds whole ones, else one per image."""
    Wp, width = block.shape[1:]
    if g0 % Hp == 0 and block.shape[0] % Hp == 0:
        n0, n1 = g0 // Hp, -(-g1 // Hp)
        part = block[:(n1 - n0) * Hp].view(n1 - n0, Hp, Wp, width)[:, :H]
        return [(slice(n0, n1), slice(0, H), part)]
    out = []
    for n in range(g0 // Hp, (g1 - 1) // Hp + 1):
        a0, a1 = max(g0 - n * Hp, 0), min(g1 - n * Hp, H)
        if a0 < a1:
            b0 = n * Hp + a0 - g0  # their first row in the block
            out.append((n, slice(a0, a1), block[b0:b0 + a1 - a0]))
    return out


def _phase_taps_backward(grad_y: Tensor, xp: Tensor, weight: Tensor, need_input_grad: bool = True,
                         need_bias_grad: bool = True):
    """The backward of `_phase_taps_into`: grad_y (N, O, 2H, 2W), xp (N, H+1, W+1, C) (a padded
    buffer) -> (grad_x (N, C, H, W) or None, grad_weight (O, C, 3, 3), grad_bias (O,)).

    The phase gradients go into zero-bordered low-resolution padded buffers G_rc (N, Hp, Wp, O)
    (layout.py's), pixel (a, b) at padded (a + 1, b + 1): anchor row + Wp + 1. The weight
    gradient of tap (r, c, i, j) is then xp[anchor + offset]^T @ G_rc[anchor + Wp + 1] summed
    over anchors (dropped anchors read G's zero border), and the input gradient at anchor a' is
    the sum of G_rc[a' + (2 - r - i) Wp + (2 - c - j)] @ K_rcij^T: the forward's structure
    again, 16 shifted GEMMs with offsets up to 2 Wp + 2.
    """
    N, Hp, Wp, C = xp.shape
    H, W = Hp - 1, Wp - 1
    O = weight.shape[0]
    g = grad_y.permute(0, 2, 3, 1).unflatten(1, (H, 2)).unflatten(3, (W, 2))  # (n, a, r, b, c, O), a view
    R = layout.padded_rows(N, H, W, (1, 1))
    G = workspace.empty(grad_y, 4, R, O)  # four padded buffers' flat rows
    gflat = G.unbind(0)
    for p, (r, c) in enumerate(_ORDER):
        grid = gflat[p][:N * Hp * Wp].view(N, Hp, Wp, O)
        grid[:, 1:, 1:] = g[:, :, r, :, c]
        layout.zero_border(grid, (1, 1))
    xflat = layout.flat_rows(xp, (1, 1))
    L = tap_conv._anchor_count(N, Hp, Wp, H, W)
    narrow = O < conv_plan._MIN_GEMM_CHANNELS  # orientation as tap_conv._shifted_weight_grad
    P = row_split.parts(xp)  # groups of P blocks, one per CPU thread, as tap_conv._shifted_weight_grad
    grad_k = grad_y.new_zeros(2, 2, 2, 2, P, *((O, C) if narrow else (C, O)))
    grad_parts = _matrices(grad_k)  # grad_parts[r][c][i][j]: (P, C, O) or (P, O, C)
    kernels_t = None
    gx = None
    if need_input_grad:
        width = _width(C, xp)
        kernels_t = tap_conv._widened(_phase_kernels(weight).view(C, 2, 2, 2, 2, O).permute(1, 2, 3, 4, 5, 0), width)  # (.., O, width)
        kernels_t = _matrices(kernels_t)
        gx = layout.new_padded(grad_y, N, H, W, width, (1, 1))  # anchor a's gradient at row a + Wp + 1
        gx_anchors = layout.flat_rows(gx, (1, 1))[Wp + 1:]
    for group_start, group_stop in _block_ranges(L, P):
        for p, (r, c) in enumerate(_ORDER):
            gblock = gflat[p][group_start + Wp + 1:group_stop + Wp + 1]
            for i, j in _ORDER:
                offset = (r + i) * Wp + c + j
                row_split.add_tn_(grad_parts[r][c][i][j], xflat[group_start + offset:group_stop + offset], gblock,
                                  transposed=narrow)
    grad_k = grad_k.sum(4)  # the P parts
    if need_input_grad:
        for start, stop in _block_ranges(L):
            block = gx_anchors[start:stop]
            first = True
            for p, (r, c) in enumerate(_ORDER):
                for i, j in _ORDER:
                    offset = (2 - r - i) * Wp + 2 - c - j
                    rows = gflat[p][start + offset:stop + offset]
                    if first:
                        torch.mm(rows, kernels_t[r][c][i][j], out=block)
                        first = False
                    else:
                        block.addmm_(rows, kernels_t[r][c][i][j])
    if narrow:
        grad_k = grad_k.transpose(-1, -2)
    grad_weight = _phase_weight_grad(grad_k.reshape(16, C, O))
    # the sum over G's contiguous rows (their borders are zero): a strided sum over g took 13 ms a call
    grad_bias = row_split.column_sums(G.view(-1, O)) if need_bias_grad else None
    grad_x = None
    if need_input_grad:  # in a zero-bordered buffer like xp's: the backward of the layer that made x reads it as is
        layout.zero_border(gx, (1, 1))  # it holds the dropped anchors' values
        grad_x = layout.padded_interior(gx, (1, 1), C)
    return grad_x, grad_weight, grad_bias
