"""Convolutions as im2col (a strided view plus one copy) and one GEMM, in channels-last memory
(layout.py): every convolution the tap path (tap_conv.py) does not take, and all of them under
the gemm plan (CUDA's); transposed convolutions as the input gradient of a convolution.
"""
from __future__ import annotations

import torch
from torch import Tensor

from n2n_core import row_split
from n2n_core.conv_plan import _MIN_GEMM_CHANNELS, ConvPlan, plan_for
from n2n_core.layout import _pad_nhwc, _pad_nhwc_full, conv_output_size, nchw_view, nhwc, same_stride_one


def _padded(x: Tensor, kernel, stride, padding, dilation) -> Tensor:
    """x (N, C, H, W) padded for its windows: layout.py's padded buffer (borders shared, free when x
    is the marked interior of one) for a "same" stride-1 convolution, whose windows read it as the
    tap convolutions do (layout.py, contract point 4), else separate borders (N, H + 2 ph, W + 2 pw, C)."""
    if same_stride_one(kernel, stride, padding, dilation):
        return _pad_nhwc(x, padding)
    return _pad_nhwc_full(x, padding)


def _windows(xp: Tensor, kernel, stride, dilation, out_hw) -> Tensor:
    """Padded (N, Hp, Wp, C) (`_padded`) -> the view (N, Ho, Wo, kh, kw, C) of every window."""
    N, Hp, Wp, C = xp.shape
    (kh, kw), (sh, sw), (dh, dw), (Ho, Wo) = kernel, stride, dilation, out_hw
    sN, sH, sW, _ = xp.stride()
    return xp.as_strided((N, Ho, Wo, kh, kw, C), (sN, sh * sH, sw * sW, dh * sH, dw * sW, 1), xp.storage_offset())


def _im2col(xp: Tensor, kernel, stride, dilation, out_hw) -> Tensor:
    """Padded (N, Hp, Wp, C) (`_padded`) -> columns (N*Ho*Wo, kh*kw*C), (kh, kw, C) fastest-last."""
    N, Hp, Wp, C = xp.shape
    (kh, kw), (sh, sw), (dh, dw), (Ho, Wo) = kernel, stride, dilation, out_hw
    if kh == 1 and kw == 1 and sh == 1 and sw == 1 and Hp == Ho and Wp == Wo:
        return xp.view(N * Ho * Wo, C)
    if (kh, kw) == (sh, sw) and dh == 1 and dw == 1:
        # non-overlapping windows: (N, Ho, kh, Wo, kw, C) -> (N, Ho, Wo, kh, kw, C)
        win = xp[:, :Ho * kh, :Wo * kw].reshape(N, Ho, kh, Wo, kw, C).permute(0, 1, 3, 2, 4, 5)
    else:
        win = _windows(xp, kernel, stride, dilation, out_hw)  # (N, Ho, Wo, kh, kw, C), a view
    return win.reshape(N * Ho * Wo, kh * kw * C)  # one copy


def _col2im(gcols: Tensor, padded_shape, kernel, stride, dilation, out_hw) -> Tensor:
    """The adjoint of `_im2col`: columns (N*Ho*Wo, kh*kw*C) -> padded (N, Hp, Wp, C)."""
    N, Hp, Wp, C = padded_shape
    (kh, kw), (sh, sw), (dh, dw), (Ho, Wo) = kernel, stride, dilation, out_hw
    g = gcols.view(N, Ho, Wo, kh, kw, C)
    if (kh, kw) == (sh, sw) and dh == 1 and dw == 1:
        body = g.permute(0, 1, 3, 2, 4, 5).reshape(N, Ho * kh, Wo * kw, C)
        if Ho * kh == Hp and Wo * kw == Wp:
            return body
        out = gcols.new_zeros(N, Hp, Wp, C)
        out[:, :Ho * kh, :Wo * kw] = body
        return out
    out = gcols.new_zeros(N, Hp, Wp, C)
    for i in range(kh):
        for j in range(kw):
            out[:, i * dh: i * dh + sh * (Ho - 1) + 1: sh, j * dw: j * dw + sw * (Wo - 1) + 1: sw] += g[:, :, :, i, j]
    return out


def _weight_matrix(weight: Tensor) -> Tensor:
    """(O, C, kh, kw) -> (O, kh*kw*C), matching the column order of `_im2col`."""
    O = weight.shape[0]
    return weight.permute(0, 2, 3, 1).reshape(O, -1)


def _weight_matrix_t(weight: Tensor) -> Tensor:
    """(O, C, kh, kw) -> contiguous (kh*kw*C, O): the GEMM runs faster on a contiguous right factor."""
    O = weight.shape[0]
    return weight.permute(2, 3, 1, 0).reshape(-1, O)


def _tn(a: Tensor, b: Tensor) -> Tensor:
    """a^T @ b for (.., M, K) and (.., M, O) with a long inner M: (.., K, O).

    Measured: a^T @ b runs fast for O >= 16 but 5-25x slower than (b^T @ a)^T for a narrow b
    (the 3-channel output layer), so the orientation follows b's width. 2-D products are split
    over M across CPU threads (row_split.py).
    """
    narrow = b.shape[-1] < _MIN_GEMM_CHANNELS
    if a.dim() == 2:
        product = row_split.tn(a, b, transposed=narrow)
        return product.t() if narrow else product
    if not narrow:
        return a.transpose(-1, -2) @ b
    return (b.transpose(-1, -2) @ a).transpose(-1, -2)


def _weight_grad(cols: Tensor, g: Tensor, C: int, kh: int, kw: int) -> Tensor:
    """cols (M, kh*kw*C), g (M, O) -> (O, C, kh, kw)."""
    O = g.shape[1]
    return _tn(cols, g).reshape(kh, kw, C, O).permute(3, 2, 0, 1)


def conv2d_forward(x: Tensor, weight: Tensor, bias: Tensor | None, stride, padding, dilation,
                   keep_cols: bool = True, plan: ConvPlan | None = None) -> tuple[Tensor, Tensor | None]:
    """x (N, C, H, W), weight (O, C, kh, kw) -> y (N, O, Ho, Wo) and the columns (N*Ho*Wo, kh*kw*C).

    Ho = (H + 2 ph - dh (kh - 1) - 1) // sh + 1 (same for Wo). The columns are what the
    weight gradient needs; None when `keep_cols` is False (then they are built in bands of
    at most `plan.band_elements`; `plan` None: the device's, `plan_for`).
    """
    N, C, H, W = x.shape
    O, _, kh, kw = weight.shape
    Ho = conv_output_size(H, kh, stride[0], padding[0], dilation[0])
    Wo = conv_output_size(W, kw, stride[1], padding[1], dilation[1])
    if Ho <= 0 or Wo <= 0:
        raise ValueError(f"input {tuple(x.shape)} too small for kernel {(kh, kw)} with padding {padding}, dilation {dilation}")
    xp = _padded(x, (kh, kw), stride, padding, dilation)  # (N, Hp, Wp, C)
    wt = _weight_matrix_t(weight)  # (kh*kw*C, O)
    K = kh * kw * C
    band = (plan or plan_for(x.device)).band_elements
    if not keep_cols and K > C and N * Ho * Wo * K > band:
        # nothing to keep (inference, input gradients): im2col one band of output rows at a time,
        # so the columns stay small (a 512x512 image would need ~1 GB of them at once)
        y = x.new_empty(N, Ho, Wo, O)
        win = _windows(xp, (kh, kw), stride, dilation, (Ho, Wo))  # (N, Ho, Wo, kh, kw, C), a view
        if Ho * Wo * K <= band:  # bands of whole images
            step = band // (Ho * Wo * K)
            bands = [(slice(n, n + step), slice(0, Ho)) for n in range(0, N, step)]
        else:  # bands of rows of one image
            step = max(1, band // (Wo * K))
            bands = [(slice(n, n + 1), slice(h, h + step)) for n in range(N) for h in range(0, Ho, step)]
        for images, rows in bands:
            cols = win[images, rows].reshape(-1, K)  # (band pixels, K), one copy
            out = y[images, rows].view(-1, O)  # contiguous: whole images, or rows of one image
            torch.addmm(bias, cols, wt, out=out) if bias is not None else torch.mm(cols, wt, out=out)
            del cols  # before the next band's copy: one band alive at a time, not two
        return nchw_view(y), None
    cols = _im2col(xp, (kh, kw), stride, dilation, (Ho, Wo))  # (N*Ho*Wo, kh*kw*C)
    y = torch.addmm(bias, cols, wt) if bias is not None else cols @ wt  # (N*Ho*Wo, O)
    return nchw_view(y.view(N, Ho, Wo, O)), (cols if keep_cols else None)


def conv2d_backward(grad_y: Tensor, cols: Tensor, x_shape, weight: Tensor, stride, padding, dilation,
                    need_input_grad=True, plan: ConvPlan | None = None):
    """grad_y (N, O, Ho, Wo) -> (grad_x (N, C, H, W) or None, grad_weight (O, C, kh, kw), grad_bias (O,))."""
    N, C, H, W = x_shape
    O, _, kh, kw = weight.shape
    Ho, Wo = grad_y.shape[2:]
    g = nhwc(grad_y).view(N * Ho * Wo, O)  # (N*Ho*Wo, O)
    grad_weight = _weight_grad(cols, g, C, kh, kw)  # (O, C, kh, kw)
    grad_bias = row_split.column_sums(g)
    grad_x = None
    if need_input_grad:
        grad_x = conv2d_input_grad(grad_y, g, weight, x_shape, stride, padding, dilation, plan)
    return grad_x, grad_weight, grad_bias


def conv2d_input_grad(grad_y: Tensor, g: Tensor, weight: Tensor, x_shape, stride, padding, dilation,
                      plan: ConvPlan | None = None) -> Tensor:
    """The input gradient (N, C, H, W) of a convolution, given grad_y and its (N*Ho*Wo, O) matrix g."""
    N, C, H, W = x_shape
    O, _, kh, kw = weight.shape
    Ho, Wo = grad_y.shape[2:]
    (sh, sw), (ph, pw), (dh, dw) = stride, padding, dilation
    qh, qw = dh * (kh - 1) - ph, dw * (kw - 1) - pw
    narrow = 2 * C <= O  # few input channels (the first layer): col2im moves less memory than im2col of grad_y
    if (not narrow and sh == 1 and sw == 1 and qh >= 0 and qw >= 0
            and Ho + 2 * qh - dh * (kh - 1) == H and Wo + 2 * qw - dw * (kw - 1) == W):
        # full correlation with the flipped kernel, transposed to (C, O, kh, kw)
        flipped = weight.flip(2, 3).transpose(0, 1)
        gx, _ = conv2d_forward(grad_y, flipped, None, (1, 1), (qh, qw), dilation, keep_cols=False, plan=plan)
        return gx
    gcols = g @ _weight_matrix(weight)  # (N*Ho*Wo, kh*kw*C)
    Hp, Wp = H + 2 * ph, W + 2 * pw
    gxp = _col2im(gcols, (N, Hp, Wp, C), (kh, kw), stride, dilation, (Ho, Wo))  # (N, Hp, Wp, C)
    return nchw_view(gxp[:, ph:ph + H, pw:pw + W])


def conv_transpose2d_output_size(size: int, kernel: int, stride: int, padding: int, output_padding: int,
                                 dilation: int) -> int:
    return (size - 1) * stride - 2 * padding + dilation * (kernel - 1) + output_padding + 1


def conv_transpose2d_forward(x: Tensor, weight: Tensor, bias: Tensor | None, stride, padding, output_padding,
                             dilation) -> Tensor:
    """x (N, Cin, H, W), weight (Cin, Cout, kh, kw) -> y (N, Cout, Ho, Wo), Ho = (H-1)s - 2p + d(k-1) + op + 1.

    The input gradient of a Conv2d(Cout -> Cin) with this weight, evaluated at x.
    """
    N, Cin, H, W = x.shape
    _, Cout, kh, kw = weight.shape
    Ho = conv_transpose2d_output_size(H, kh, stride[0], padding[0], output_padding[0], dilation[0])
    Wo = conv_transpose2d_output_size(W, kw, stride[1], padding[1], output_padding[1], dilation[1])
    y = conv2d_input_grad(x, nhwc(x).view(N * H * W, Cin), weight, (N, Cout, Ho, Wo), stride, padding, dilation)
    if bias is not None:
        y = y + bias.view(1, Cout, 1, 1)
    return y


def conv_transpose2d_backward(grad_y: Tensor, x: Tensor, weight: Tensor, stride, padding, dilation):
    """The transpose of the forward: a convolution of the output gradient with the same weight."""
    N, Cin, H, W = x.shape
    _, Cout, kh, kw = weight.shape
    grad_x, gcols = conv2d_forward(grad_y, weight, None, stride, padding, dilation)  # (N, Cin, Hc, Wc)
    Hc, Wc = grad_x.shape[2:]
    if (Hc, Wc) != (H, W):  # output_padding >= stride adds floor(op / s) positions no input has
        grad_x = grad_x[:, :, :H, :W]
        gcols = gcols.view(N, Hc, Wc, -1)[:, :H, :W].reshape(N * H * W, -1)
    xm = nhwc(x).view(N * H * W, Cin)
    grad_weight = _tn(gcols, xm).reshape(kh, kw, Cout, Cin).permute(3, 2, 0, 1)  # (Cin, Cout, kh, kw)
    grad_bias = grad_y.sum((0, 2, 3))
    return grad_x, grad_weight, grad_bias
