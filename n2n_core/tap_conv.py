"""Stride-1 "same" convolutions as shifted GEMMs over a flat padded image (the CPU plan's path)."""
from __future__ import annotations

import torch
from torch import Tensor

from n2n_core import row_split, workspace
from n2n_core.conv_plan import _MIN_GEMM_CHANNELS, _VECTOR_WIDTH, ConvPlan, plan_for
from n2n_core.layout import _pad_nhwc, flat_rows, new_padded, padded_interior, same_stride_one, zero_border


# -- stride-1 convolutions as shifted GEMMs over a flat padded image ---------------------------
# With the input in a zero-bordered padded buffer (N, Hp, Wp, C), Hp = H + ph and Wp = W + pw
# (layout.py, contract point 2: borders shared between neighbouring rows and images), and
# flattened to rows (`layout.flat_rows`), output pixel (n, h, w) is anchored at row
# r = (n*Hp + h)*Wp + w and its tap (i, j) reads row r + i*dh*Wp + j*dw: every tap is one
# contiguous slice of the flat image, so the convolution is kh*kw GEMMs (L, C) @ (C, O)
# accumulating into one (L, O) buffer, with no im2col copy. Anchors with w >= W or h >= H are
# computed too and dropped (3% more work for a 64x64 image and a 3x3 kernel, 27% for 8x8).


def use_taps(kernel, stride, padding, dilation) -> bool:
    """Whether a convolution runs on this module's path: stride 1, "same" padding (2p == d (k - 1)),
    a kernel larger than 1x1 (as shifted GEMMs, or block columns for a thin input)."""
    return kernel != (1, 1) and same_stride_one(kernel, stride, padding, dilation)


def _tap_offsets(kernel, dilation, Wp: int) -> list[int]:
    """Row offset of each tap (i, j), row-major, in a flat image of rows Wp wide."""
    (kh, kw), (dh, dw) = kernel, dilation
    return [i * dh * Wp + j * dw for i in range(kh) for j in range(kw)]


def _anchor_count(N: int, Hp: int, Wp: int, H: int, W: int) -> int:
    """Rows L from the first anchor to the last real output pixel (n = N-1, h = H-1, w = W-1), inclusive."""
    return ((N - 1) * Hp + H - 1) * Wp + W


def _blocks(L: int, rows: int | None):
    """Consecutive (start, stop) row ranges of at most `rows` covering [0, L) (None: one range)."""
    rows = rows or max(L, 1)
    return [(s, min(L, s + rows)) for s in range(0, L, rows)]


# _BIAS: the bias is added to each block after its GEMMs, while the block is in cache, and not as
# torch.addmm(bias, ...)'s beta term: that first copies the broadcast bias into the block, and on
# an output buffer fresh from the system (each convolution's) the copy took 2.5x the GEMM's time
# (measured on a CPU: 408 us against 164 us per (4096, 48) block, 237 us with the add after).


def _shifted_gemms(src: Tensor, taps: Tensor, offsets: list[int], L: int, out: Tensor, bias: Tensor | None,
                   plan: ConvPlan, epilogue=None) -> Tensor:
    """out (L, O) = epilogue(bias + sum over taps t of src[offsets[t] : offsets[t] + L] (L, C) @ taps[t] (C, O)).

    Block by block of `plan.tap_block_rows` rows, so each block of `out` stays in cache while the
    taps accumulate into it, and `epilogue` (an in-place elementwise function f(block, scratch),
    the scratch of the block's shape, or None) runs on the block while it is there, with a
    scratch of one block. (Whole-length GEMMs, the bias and epilogue after them in blocks,
    measured the same in the default U-Net's training step: 255.3 against 255.4 ms at two
    threads, 481 against 476 at one; alone, hot in cache, they ran 0.75-0.95x the time.)
    """
    taps = taps.unbind(0)
    blocks = _blocks(L, plan.tap_block_rows)
    scratch = _epilogue_scratch(out, blocks, epilogue)
    for start, stop in blocks:
        block = out[start:stop]
        for t, offset in enumerate(offsets):
            rows = src[start + offset:stop + offset]
            if t > 0:
                block.addmm_(rows, taps[t])
            else:
                torch.mm(rows, taps[t], out=block)
        if bias is not None:
            block += bias  # (see _BIAS)
        if epilogue is not None:
            epilogue(block, scratch[:stop - start])
    return out


def _epilogue_scratch(out: Tensor, blocks, epilogue) -> Tensor | None:
    """One block's worth of scratch space for `epilogue` (None without one), allocated once per
    convolution: a fresh temporary per block would come from the system with its pages untouched."""
    if epilogue is None:
        return None
    return workspace.empty(out, max(stop - start for start, stop in blocks), out.shape[1])


def _shifted_weight_grad(src: Tensor, g: Tensor, offsets: list[int], plan: ConvPlan) -> tuple[Tensor, Tensor]:
    """sum over rows r of src[r + offsets[t]]^T g[r] for each tap t, and of g[r]: src (>= L + max offset, C),
    g (L, O) -> ((T, C, O), (O,)).

    In groups of P blocks of `plan.tap_block_rows` rows, one block per CPU thread (row_split.py:
    the library does not split these products between threads itself), each group's g staying
    in cache across the taps. A narrow g (the 3-channel output layer) runs as g^T @ src: over 2x
    faster there (see `gemm_conv._tn`).
    """
    L, O = g.shape
    C = src.shape[1]
    narrow = O < _MIN_GEMM_CHANNELS
    P = row_split.parts(g)
    grad = g.new_zeros(len(offsets), P, *((O, C) if narrow else (C, O)))
    grad_sum = g.new_zeros(P, O)
    blocks = _blocks(L, plan.tap_block_rows and P * plan.tap_block_rows)
    ones = g.new_ones(max(stop - start for start, stop in blocks))
    grads = grad.unbind(0)
    for start, stop in blocks:
        block = g[start:stop]
        row_split.add_column_sums_(grad_sum, block, ones)  # the bias gradient, while the block is in cache
        for t, offset in enumerate(offsets):
            row_split.add_tn_(grads[t], src[start + offset:stop + offset], block, transposed=narrow)
    grad = grad.sum(1)  # the P parts
    return (grad.transpose(1, 2) if narrow else grad), grad_sum.sum(0)


# -- thin inputs (fewer than _MIN_GEMM_CHANNELS channels: an image's 3) as block columns --------
# kh*kw GEMMs of inner size C = 3 run far below the GEMM's speed, so for a thin input each block
# of anchors copies its windows, (rows, kh, kw, C), into a small column buffer that stays in
# cache, and runs one GEMM of inner size kh*kw*C: im2col one block at a time, into the same
# zero-bordered output buffer as the shifted GEMMs (the next convolution reads it without a
# padding copy, and an activation runs fused on each block), and never the whole columns.


def _windows(src: Tensor, start: int, count: int, kernel, dilation, Wp: int) -> Tensor:
    """The (count, kh, kw, C) view of the windows of anchors start .. start + count - 1 over the flat
    padded image src (R, C), rows of any stride: tap (i, j) of anchor r reads src[r + i dh Wp + j dw]."""
    C, row = src.shape[1], src.stride(0)
    (kh, kw), (dh, dw) = kernel, dilation
    return src.as_strided((count, kh, kw, C), (row, dh * Wp * row, dw * row, 1), src.storage_offset() + start * row)


def _column_rows(plan: ConvPlan, width: int) -> int:
    """Anchors per block of columns `width` wide: `plan.tap_block_rows` (all of them when None), and
    no more columns than `plan.band_elements`, the bound on any im2col buffer (inference's
    memory model, pipeline/inference/memory.py, counts that much as fixed)."""
    rows = max(1, plan.band_elements // width)
    return min(plan.tap_block_rows, rows) if plan.tap_block_rows else rows


def _column_gemms(src: Tensor, taps: Tensor, kernel, dilation, Wp: int, L: int, out: Tensor, bias: Tensor | None,
                  plan: ConvPlan, epilogue=None) -> Tensor:
    """`_shifted_gemms` for a thin src (R, C): each block's windows copied into columns
    (rows, kh*kw*C), then one GEMM with taps (kh*kw, C, O) as a (kh*kw*C, O) matrix."""
    T, C, O = taps.shape
    weight = taps.reshape(T * C, O)
    blocks = _blocks(L, _column_rows(plan, T * C))
    cols = workspace.empty(src, max(stop - start for start, stop in blocks), T * C)
    scratch = _epilogue_scratch(out, blocks, epilogue)
    for start, stop in blocks:
        block, rows = out[start:stop], cols[:stop - start]
        rows.view(stop - start, *kernel, C).copy_(_windows(src, start, stop - start, kernel, dilation, Wp))
        torch.mm(rows, weight, out=block)
        if bias is not None:
            block += bias  # (see _BIAS)
        if epilogue is not None:
            epilogue(block, scratch[:stop - start])
    return out


def _column_weight_grad(src: Tensor, g: Tensor, kernel, dilation, Wp: int, plan: ConvPlan) -> tuple[Tensor, Tensor]:
    """`_shifted_weight_grad` for a thin src: the windows copied into columns block by block
    (as `_column_gemms`), one product per block. -> ((kh*kw, C, O), (O,))."""
    L, O = g.shape
    C = src.shape[1]
    T = kernel[0] * kernel[1]
    narrow = O < _MIN_GEMM_CHANNELS
    P = row_split.parts(g)
    grad = g.new_zeros(P, *((O, T * C) if narrow else (T * C, O)))
    grad_sum = g.new_zeros(P, O)
    blocks = _blocks(L, P * _column_rows(plan, T * C))
    longest = max(stop - start for start, stop in blocks)
    cols = workspace.empty(src, longest, T * C)
    ones = g.new_ones(longest)
    for start, stop in blocks:
        block, rows = g[start:stop], cols[:stop - start]
        rows.view(stop - start, *kernel, C).copy_(_windows(src, start, stop - start, kernel, dilation, Wp))
        row_split.add_column_sums_(grad_sum, block, ones)
        row_split.add_tn_(grad, rows, block, transposed=narrow)
    grad = grad.sum(0)
    return (grad.t() if narrow else grad).reshape(T, C, O), grad_sum.sum(0)


def _gemm_width(O: int, plan: ConvPlan) -> int:
    """O rounded up to a multiple of _VECTOR_WIDTH (16) when `plan.round_widths`. Measured on a
    CPU: the U-Net's 99-channel input gradient, (L, 64) @ (64, 112) takes 19% less time than
    (L, 64) @ (64, 99); its 3-channel output layer, (4096, 32) @ (32, 16) a third of the time of
    (4096, 32) @ (32, 3)."""
    if not plan.round_widths or O % _VECTOR_WIDTH == 0:
        return O
    return O + _VECTOR_WIDTH - O % _VECTOR_WIDTH


def _widened(t: Tensor, width: int) -> Tensor:
    """t (..., O) with zero columns up to `width` (a `_gemm_width`), contiguous: kernels or a bias."""
    O = t.shape[-1]
    if width == O:
        return t.contiguous()
    out = t.new_zeros(*t.shape[:-1], width)
    out[..., :O] = t
    return out


def _tap_conv(xp: Tensor, taps: Tensor, bias: Tensor | None, kernel, dilation, padding, plan: ConvPlan,
              epilogue=None) -> Tensor:
    """Padded buffer xp (N, Hp, Wp, C), taps (kh*kw, C, O) -> y (N, O, H, W), "same" padding (H = Hp - ph).

    y is the marked interior of a zero-bordered padded buffer (N, Hp, Wp, O') (`padded_interior`):
    the anchors are written from row ph*Wp + pw on, which puts every real pixel at its padded
    place. O' is O rounded up for the GEMM (`_gemm_width`), and y its first O channels.
    xp's rows may be wider than C (layout.py, contract point 2).
    """
    N, Hp, Wp, C = xp.shape
    O = taps.shape[2]
    width = _gemm_width(O, plan)
    taps = _widened(taps, width)
    bias = None if bias is None else _widened(bias, width)
    (ph, pw) = padding
    H, W = Hp - ph, Wp - pw
    L = _anchor_count(N, Hp, Wp, H, W)
    start = ph * Wp + pw
    y = new_padded(xp, N, H, W, width, padding)
    out = flat_rows(y, padding)[start:start + L]
    src = flat_rows(xp, padding)
    if C < _MIN_GEMM_CHANNELS:
        _column_gemms(src, taps, kernel, dilation, Wp, L, out, bias, plan, epilogue)
    else:
        _shifted_gemms(src, taps, _tap_offsets(kernel, dilation, Wp), L, out, bias, plan, epilogue)
    zero_border(y, padding)  # it holds the dropped anchors' values
    return padded_interior(y, padding, O)


def tap_conv2d_forward(x: Tensor, weight: Tensor, bias: Tensor | None, padding, dilation,
                       epilogue=None, plan: ConvPlan | None = None) -> tuple[Tensor, Tensor]:
    """A `use_taps` convolution: x (N, C, H, W) -> y (N, O, H, W) and the padded input (N, Hp, Wp, C) for backward
    (layout.py's padded buffer, Hp = H + ph, Wp = W + pw).

    `epilogue`: an in-place elementwise function f(view, scratch of its shape) with f(0) = 0 (an
    activation's `activate_`), applied to y block by block.
    `plan`: block rows and width rounding (None: the device's, `plan_for`).
    """
    O, C, kh, kw = weight.shape
    plan = plan or plan_for(x.device)
    xp = _pad_nhwc(x, padding)  # (N, H + ph, W + pw, C)
    taps = weight.permute(2, 3, 1, 0).reshape(kh * kw, C, O)
    return _tap_conv(xp, taps, bias, (kh, kw), dilation, padding, plan, epilogue), xp


def tap_conv2d_backward(grad_y: Tensor, xp: Tensor, weight: Tensor, padding, dilation, need_input_grad=True,
                        plan: ConvPlan | None = None):
    """grad_y (N, O, H, W), padded input (N, Hp, Wp, C) -> (grad_x (N, C, H, W) or None, grad_weight, grad_bias).

    The gradient padded like the input, gp (rows of a padded (N, Hp, Wp, O)), serves both products: read from
    row ph*Wp + pw on, it is the gradient at every anchor (zero at the dropped ones), and
    with "same" padding the input gradient is the convolution of gp with the flipped kernel.
    """
    N, Hp, Wp, C = xp.shape
    O, _, kh, kw = weight.shape
    H, W = grad_y.shape[2:]
    plan = plan or plan_for(xp.device)
    L = _anchor_count(N, Hp, Wp, H, W)
    gpad = _pad_nhwc(grad_y, padding)  # (N, Hp, Wp, O)
    gp = flat_rows(gpad, padding)
    start = padding[0] * Wp + padding[1]
    g_anchor = gp[start:start + L]  # (L, O)
    xflat = flat_rows(xp, padding)
    if C < _MIN_GEMM_CHANNELS:
        grad_taps, grad_bias = _column_weight_grad(xflat, g_anchor, (kh, kw), dilation, Wp, plan)
    else:
        grad_taps, grad_bias = _shifted_weight_grad(xflat, g_anchor, _tap_offsets((kh, kw), dilation, Wp), plan)
    grad_weight = grad_taps.view(kh, kw, C, O).permute(3, 2, 0, 1)  # from (kh*kw, C, O)
    grad_x = None
    if need_input_grad:  # with "same" padding: the convolution of gp with the flipped kernel
        flipped = weight.flip(2, 3).permute(2, 3, 0, 1).reshape(kh * kw, O, C)
        grad_x = _tap_conv(gpad, flipped, None, (kh, kw), dilation, padding, plan)
    return grad_x, grad_weight, grad_bias
