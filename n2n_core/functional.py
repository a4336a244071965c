"""Pure forward/backward kernels of the layers (no state): convolution, pooling, upsampling.

Layout contract (these kernels, and the layers that hand tensors between them):

1. Channels-last memory. Kernels take and return (N, C, H, W) tensors but compute in
   (N, H, W, C) memory: outputs are (N, C, H, W) views of contiguous (N, H, W, C)
   buffers (torch's `channels_last` memory format), so a chain of layers never transposes.
2. Zero-bordered padded buffers. A tap convolution (`use_taps`) writes its output and its
   input gradient into a buffer (N, H + 2 ph, W + 2 pw, C) whose ph border rows and pw
   border columns are zero, and returns that buffer's (N, C, H, W) interior view
   (`padded_interior`); `Concat(pad=p)` (skip.py) builds its output the same way. Nothing
   may write into such a buffer outside the interior view.
3. The hand-off. `padded_interior` marks the view with the attribute `_n2n_padded` =
   (buffer, (ph, pw)), and `padded_buffer(x)` is the one place that reads the mark. A
   convolution whose padding equals the mark's reads the buffer itself as its padded input,
   without a padding copy (`_pad_nhwc`). The mark lives on the Python tensor object, so
   it reaches the next convolution only if every layer in between returns the object it was
   given: an in-place elementwise layer must return the same object (LeakyReLU(inplace=True)
   in activation.py does: `torch.maximum(x, x * s, out=x)` returns x), and writes only
   through the interior view, so the border stays zero. Any other layer (a copy, a new
   tensor) drops the mark, and the next convolution pads afresh: slower, never wrong.
4. Why the tap reads stay in bounds. With the padded input flattened to rows
   (N*Hp*Wp, C), output pixel (n, h, w) is anchored at row (n*Hp + h)*Wp + w and its tap
   (i, j) reads row anchor + i*dh*Wp + j*dw (`_tap_offsets`). The kernels take the output
   to be as large as the input, Ho = Hp - 2 ph and Wo = Wp - 2 pw, so the last anchor,
   ((N-1)*Hp + Ho-1)*Wp + Wo-1, plus the largest offset, (kh-1)*dh*Wp + (kw-1)*dw, is
   N*Hp*Wp - 1 + (dh (kh-1) - 2 ph)*Wp + (dw (kw-1) - 2 pw): exactly N*Hp*Wp - 1, the
   buffer's last row, only for "same" padding (2p = d (k - 1)); with less padding the last
   taps would read past the buffer. `use_taps` admits nothing else. Same padding is also
   what gives the output, and the padded output gradient in backward, the input's
   geometry (Hp, Wp): the anchors are written from row ph*Wp + pw on, which puts every
   output pixel at its padded place, and backward reads the gradient at the input's anchors.

Paths, per device (`ConvPlan`, `plan_for`; the rule and its reasons are at "which path on
which device" below): on the CPU, stride-1 "same" convolutions with `_MIN_GEMM_CHANNELS` or
more input channels (the U-Net's 3x3 layers) run as kh*kw shifted GEMMs over the flat padded
image in cache-sized blocks, no im2col (section "stride-1 convolutions as shifted GEMMs");
other convolutions, and every convolution on CUDA, as im2col (a strided view plus one copy)
and one GEMM; nearest x2 upsampling then a 3x3 convolution as four 2x2 convolutions at low
resolution on both. Every "measured" or "faster" remark below comes from `python
bench/core.py` (or a direct A/B in its setup) on a CPU; the figures, the machine and what
each of these choices bought are in BENCHMARKS.md, section "Core: from-scratch vs torch.nn".
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
from torch import Tensor

# A GEMM operand with fewer channels than this is thin: the U-Net's 3-channel input and
# output layers. The taps, the GEMM orientation and the im2col fallback all switch on it.
_MIN_GEMM_CHANNELS = 16
_VECTOR_WIDTH = 16  # GEMM widths are rounded up to a multiple of it (`_gemm_width`)


# -- which path on which device ------------------------------------------------------------
@dataclass(frozen=True)
class ConvPlan:
    """How convolutions run on one kind of device; `plan_for(device)` picks one.

    Attributes:
        path: "taps": a `use_taps` convolution (stride 1, "same" padding, `_MIN_GEMM_CHANNELS`
            or more input channels) runs as kh*kw shifted GEMMs, the others as im2col and one
            GEMM; "gemm": every convolution as im2col and one GEMM.
        tap_block_rows: anchors per block of the shifted GEMMs (None: one block, the whole length).
        band_elements: columns built at a time when they need not be kept (inference, input gradients).
        round_widths: GEMM widths of the taps rounded up to a multiple of `_VECTOR_WIDTH`.
        slab_elements: in-place elementwise backward passes (LeakyReLU) in slabs of this many
            elements (None: the whole tensor at once).
    """

    path: str
    tap_block_rows: int | None
    band_elements: int
    round_widths: bool
    slab_elements: int | None

    def __post_init__(self):
        if self.path not in ("taps", "gemm"):
            raise ValueError(f"ConvPlan.path must be 'taps' or 'gemm', got {self.path!r}")


# The rule, and why (the figures: BENCHMARKS.md, "Core: from-scratch vs torch.nn" and "Core on CUDA"):
# - CPU: the taps. On a few cores the time goes to the GEMMs and to memory traffic: im2col
#   writes and reads 9x the input (25% of a training step when it was used), while the kh*kw
#   GEMMs read the padded input in place. Blocks of 4096 anchors keep each tap's rows and the
#   output block in cache across the GEMMs (1.2-1.3x faster than whole-length GEMMs), and a
#   GEMM call costs the host about a microsecond, so the ~3,600 calls of a U-Net step are
#   noise. Widths are rounded up to 16 (AVX-512 registers hold 16 floats: the 99-channel
#   input gradient as 112 takes 19% less time) and elementwise backward passes run in
#   cache-sized slabs.
# - CUDA: one GEMM per convolution. Every GEMM is a kernel launch costing the host 5-10 us,
#   and a block of 4096 anchors by 48 channels is a few microseconds of an H100's work: the
#   taps in blocks would make ~565 launches per full-resolution convolution of a training step
#   at batch 16 of 64x64 (~3,600 a step, ~4,600 per 576x576 inference tile; counted by
#   bench/launches.py), so the host's launch loop would set the pace. im2col and one GEMM of
#   inner size kh*kw*C is 2 launches and a GEMM large enough to fill the GPU; the columns' 9x
#   the input is memory a GPU has, and inference builds them in bands of 2^28 elements (1 GiB
#   in float32). cuBLAS needs no width rounding and the GPU no cache-sized slabs. Unmeasured
#   on a GPU so far: the only CUDA figures (im2col, H200) are 2.3x cuDNN per U-Net step;
#   bench/gpu_check.sh times both paths (`bench/core.py --conv-path taps|gemm`) where one is at hand.
CPU_PLAN = ConvPlan(path="taps", tap_block_rows=4096, band_elements=1 << 24, round_widths=True,
                    slab_elements=1 << 18)
CUDA_PLAN = ConvPlan(path="gemm", tap_block_rows=None, band_elements=1 << 28, round_widths=False,
                     slab_elements=None)


def plan_for(device) -> ConvPlan:
    """The `ConvPlan` of a device: `CUDA_PLAN` on CUDA, `CPU_PLAN` anywhere else."""
    return CUDA_PLAN if torch.device(device).type == "cuda" else CPU_PLAN


@functools.lru_cache(maxsize=None)
def _constant(name: str, device: torch.device, dtype: torch.dtype) -> Tensor:
    """A module-level table (`_PHASE_TAPS`, `_GRAD_TAPS`) as a tensor, made once per device and dtype:
    no host-to-device copy per call."""
    return torch.tensor(globals()[name], dtype=dtype, device=device)


def pair(value) -> tuple[int, int]:
    if isinstance(value, int):
        return (value, value)
    value = tuple(int(v) for v in value)
    if len(value) != 2:
        raise ValueError(f"expected an int or a pair, got {value}")
    return value


def conv_output_size(size: int, kernel: int, stride: int, padding: int, dilation: int) -> int:
    return (size + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1


def nhwc(x: Tensor) -> Tensor:
    """(N, C, H, W) -> a contiguous (N, H, W, C) tensor (free if x is channels-last already)."""
    return x.permute(0, 2, 3, 1).contiguous()


def nchw_view(y: Tensor) -> Tensor:
    """Contiguous (N, H, W, C) -> its (N, C, H, W) view (channels-last memory format)."""
    return y.permute(0, 3, 1, 2)


def _pad_nhwc(x: Tensor, padding) -> Tensor:
    """(N, C, H, W) -> zero-padded contiguous (N, H + 2 ph, W + 2 pw, C).

    Free when x is the marked interior of such a buffer (see `padded_interior`).
    """
    ph, pw = padding
    marked = padded_buffer(x)
    if marked is not None and marked[1] == (ph, pw):
        return marked[0]
    if ph == 0 and pw == 0:
        return nhwc(x)
    N, C, H, W = x.shape
    xp = x.new_empty(N, H + 2 * ph, W + 2 * pw, C)
    xp[:, ph:ph + H, pw:pw + W] = x.permute(0, 2, 3, 1)
    zero_border(xp, padding)
    return xp


def zero_border(xp: Tensor, padding) -> None:
    """Zero the ph rows and pw columns around the interior of xp (N, Hp, Wp, C), in place.

    (A full zero fill would be one more pass over the buffer.)
    """
    ph, pw = padding
    Hp = xp.shape[1]
    xp[:, :ph].zero_()
    xp[:, Hp - ph:].zero_()
    xp[:, ph:Hp - ph, :pw].zero_()
    xp[:, ph:Hp - ph, xp.shape[2] - pw:].zero_()


def padded_interior(xp: Tensor, padding) -> Tensor:
    """The interior (N, C, H, W) view of a zero-bordered padded buffer xp (N, H + 2 ph, W + 2 pw, C).

    The view is marked: a stride-1 convolution with the same padding reads xp as it is,
    without a padding copy, and in-place elementwise layers (LeakyReLU(inplace=True))
    keep the mark and the zero border. The border must stay zero: nothing may write into
    xp outside the view.
    """
    ph, pw = padding
    inner = nchw_view(xp[:, ph:xp.shape[1] - ph, pw:xp.shape[2] - pw])
    inner._n2n_padded = (xp, (ph, pw))
    return inner


def padded_buffer(x: Tensor) -> tuple[Tensor, tuple[int, int]] | None:
    """(buffer (N, Hp, Wp, C), (ph, pw)) when x is the marked interior view of a zero-bordered
    padded buffer (`padded_interior`), else None: the one reader of the `_n2n_padded` mark."""
    return getattr(x, "_n2n_padded", None)


def _windows(xp: Tensor, kernel, stride, dilation, out_hw) -> Tensor:
    """Padded (N, Hp, Wp, C) contiguous -> the view (N, Ho, Wo, kh, kw, C) of every window."""
    N, Hp, Wp, C = xp.shape
    (kh, kw), (sh, sw), (dh, dw), (Ho, Wo) = kernel, stride, dilation, out_hw
    sN, sH, sW, _ = xp.stride()
    return xp.as_strided((N, Ho, Wo, kh, kw, C), (sN, sh * sH, sw * sW, dh * sH, dw * sW, 1), xp.storage_offset())


def _im2col(xp: Tensor, kernel, stride, dilation, out_hw) -> Tensor:
    """Padded (N, Hp, Wp, C) contiguous -> columns (N*Ho*Wo, kh*kw*C), (kh, kw, C) fastest-last."""
    N, Hp, Wp, C = xp.shape
    (kh, kw), (sh, sw), (dh, dw), (Ho, Wo) = kernel, stride, dilation, out_hw
    if kh == 1 and kw == 1 and sh == 1 and sw == 1 and Hp == Ho and Wp == Wo:
        return xp.view(N * Ho * Wo, C)
    if (kh, kw) == (sh, sw) and dh == 1 and dw == 1:
        # non-overlapping windows: (N, Ho, kh, Wo, kw, C) -> (N, Ho, Wo, kh, kw, C)
        win = xp[:, :Ho * kh, :Wo * kw].reshape(N, Ho, kh, Wo, kw, C).permute(0, 1, 3, 2, 4, 5)
    else:
        sN, sH, sW, _ = xp.stride()
        win = xp.as_strided((N, Ho, Wo, kh, kw, C), (sN, sh * sH, sw * sW, dh * sH, dw * sW, 1),
                            xp.storage_offset())  # (N, Ho, Wo, kh, kw, C), a view
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


def _column_sums(g: Tensor) -> Tensor:
    """(M, O) -> (O,): the sum over rows, as a vector-matrix product (several times faster than sum(0))."""
    return g.new_ones(g.shape[0]) @ g


def _tn(a: Tensor, b: Tensor) -> Tensor:
    """a^T @ b for (.., M, K) and (.., M, O) with a long inner M: (.., K, O).

    Measured: a^T @ b runs fast for O >= 16 but 5-25x slower than (b^T @ a)^T for a narrow b
    (the 3-channel output layer), so the orientation follows b's width.
    """
    if b.shape[-1] >= _MIN_GEMM_CHANNELS:
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
    xp = _pad_nhwc(x, padding)  # (N, Hp, Wp, C)
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
    grad_bias = _column_sums(g)
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
    xp = _pad_nhwc(x, (1, 1))  # (N, H+2, W+2, C)
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
    grad_bias = _column_sums(g.view(N * H * W * 4, O))
    grad_x = None
    if need_input_grad:
        gtaps = _constant("_GRAD_TAPS", weight.device, weight.dtype)  # (2, 3, 3)
        kernel = torch.einsum("rud,cve,oCde->Crcouv", gtaps, gtaps, weight).reshape(C, 4 * O, 3, 3)
        grad_x, _ = conv2d_forward(nchw_view(g), kernel, None, (1, 1), (1, 1), (1, 1), keep_cols=False, plan=plan)
    return grad_x, grad_weight, grad_bias


# -- stride-1 convolutions as shifted GEMMs over a flat padded image ---------------------------
# With the input zero-padded to (N, Hp, Wp, C) and flattened to rows (N*Hp*Wp, C), output pixel
# (n, h, w) is anchored at row r = (n*Hp + h)*Wp + w and its tap (i, j) reads row r + i*dh*Wp + j*dw:
# every tap is one contiguous slice of the flat image, so the convolution is kh*kw GEMMs
# (L, C) @ (C, O) accumulating into one (L, O) buffer, with no im2col copy. Anchors with
# w >= Wo or h >= Ho are computed too and dropped (6% more work for a 64x64 image and a 3x3 kernel).


def use_taps(in_channels: int, kernel, stride, padding, dilation) -> bool:
    """Whether a convolution runs as shifted GEMMs: stride 1, "same" padding (2p == d (k - 1)), wide input."""
    return (stride == (1, 1) and kernel != (1, 1) and in_channels >= _MIN_GEMM_CHANNELS
            and all(2 * p == d * (k - 1) for k, p, d in zip(kernel, padding, dilation)))


def _tap_offsets(kernel, dilation, Wp: int) -> list[int]:
    """Row offset of each tap (i, j), row-major, in a flat image of rows Wp wide."""
    (kh, kw), (dh, dw) = kernel, dilation
    return [i * dh * Wp + j * dw for i in range(kh) for j in range(kw)]


def _anchor_count(N: int, Hp: int, Wp: int, Ho: int, Wo: int) -> int:
    """Rows L from the first anchor to the last real output pixel (n = N-1, h = Ho-1, w = Wo-1), inclusive."""
    return ((N - 1) * Hp + Ho - 1) * Wp + Wo


def _blocks(L: int, rows: int | None):
    """Consecutive (start, stop) row ranges of at most `rows` covering [0, L) (None: one range)."""
    rows = rows or max(L, 1)
    return [(s, min(L, s + rows)) for s in range(0, L, rows)]


def _shifted_gemms(src: Tensor, taps: Tensor, offsets: list[int], L: int, out: Tensor, bias: Tensor | None,
                   plan: ConvPlan, epilogue=None) -> Tensor:
    """out (L, O) = epilogue(bias + sum over taps t of src[offsets[t] : offsets[t] + L] (L, C) @ taps[t] (C, O)).

    Block by block of `plan.tap_block_rows` rows, so each block of `out` is written once and
    stays in cache while the taps accumulate into it (on a CPU measured 1.2-1.3x faster than
    whole-length GEMMs), and `epilogue` (an in-place elementwise function, or None) runs on
    the block while it is there.
    """
    taps = taps.unbind(0)
    for start, stop in _blocks(L, plan.tap_block_rows):
        block = out[start:stop]
        for t, offset in enumerate(offsets):
            rows = src[start + offset:stop + offset]
            if t > 0:
                block.addmm_(rows, taps[t])
            elif bias is not None:
                torch.addmm(bias, rows, taps[t], out=block)
            else:
                torch.mm(rows, taps[t], out=block)
        if epilogue is not None:
            epilogue(block)
    return out


def _shifted_weight_grad(src: Tensor, g: Tensor, offsets: list[int], plan: ConvPlan) -> tuple[Tensor, Tensor]:
    """sum over rows r of src[r + offsets[t]]^T g[r] for each tap t, and of g[r]: src (>= L + max offset, C),
    g (L, O) -> ((T, C, O), (O,)).

    A narrow g (the 3-channel output layer) runs as g^T @ src: over 2x faster there (see `_tn`).
    """
    L, O = g.shape
    C = src.shape[1]
    narrow = O < _MIN_GEMM_CHANNELS
    grad = g.new_zeros(len(offsets), O, C) if narrow else g.new_zeros(len(offsets), C, O)
    grad_sum = g.new_zeros(O)
    blocks = _blocks(L, plan.tap_block_rows)
    ones = g.new_ones(max(stop - start for start, stop in blocks))
    grads = grad.unbind(0)
    for start, stop in blocks:
        block = g[start:stop]
        grad_sum.addmv_(block.t(), ones[:stop - start])  # the bias gradient, while the block is in cache
        for t, offset in enumerate(offsets):
            rows = src[start + offset:stop + offset]
            if narrow:
                grads[t].addmm_(block.t(), rows)
            else:
                grads[t].addmm_(rows.t(), block)
    return (grad.transpose(1, 2) if narrow else grad), grad_sum


def _gemm_width(O: int, plan: ConvPlan) -> int:
    """O rounded up to a multiple of _VECTOR_WIDTH (16) when `plan.round_widths`. Measured on a
    CPU: the U-Net's 99-channel input gradient, (L, 64) @ (64, 112) takes 19% less time than
    (L, 64) @ (64, 99); its 3-channel output layer, (4096, 32) @ (32, 16) a third of the time of
    (4096, 32) @ (32, 3)."""
    if not plan.round_widths or O % _VECTOR_WIDTH == 0:
        return O
    return O + _VECTOR_WIDTH - O % _VECTOR_WIDTH


def _tap_conv(xp: Tensor, taps: Tensor, bias: Tensor | None, kernel, dilation, padding, plan: ConvPlan,
              epilogue=None) -> Tensor:
    """Padded x (N, Hp, Wp, C) contiguous, taps (kh*kw, C, O) -> y (N, O, H, W), "same" padding (H = Hp - 2 ph).

    y is the marked interior of a zero-bordered (N, Hp, Wp, O) buffer (`padded_interior`): the
    anchors are written from row ph*Wp + pw on, which puts every real pixel at its padded place.
    (When O is widened for the GEMM, y is the first O channels of that buffer, and not marked.)
    """
    N, Hp, Wp, C = xp.shape
    O = taps.shape[2]
    width = _gemm_width(O, plan)
    if width != O:
        taps = torch.cat((taps, taps.new_zeros(taps.shape[0], C, width - O)), dim=2)
        bias = None if bias is None else torch.cat((bias, bias.new_zeros(width - O)))
    (ph, pw) = padding
    L = _anchor_count(N, Hp, Wp, Hp - 2 * ph, Wp - 2 * pw)
    start = ph * Wp + pw
    y = xp.new_empty(N, Hp, Wp, width)
    _shifted_gemms(xp.view(-1, C), taps, _tap_offsets(kernel, dilation, Wp), L, y.view(-1, width)[start:start + L],
                   bias, plan, epilogue)
    zero_border(y, padding)  # it holds the dropped anchors' values
    if width != O:
        return nchw_view(y[:, ph:Hp - ph, pw:Wp - pw, :O])
    return padded_interior(y, padding)


def tap_conv2d_forward(x: Tensor, weight: Tensor, bias: Tensor | None, padding, dilation,
                       epilogue=None, plan: ConvPlan | None = None) -> tuple[Tensor, Tensor]:
    """A `use_taps` convolution: x (N, C, H, W) -> y (N, O, H, W) and the padded input (N, Hp, Wp, C) for backward.

    `epilogue`: an in-place elementwise function f with f(0) = 0 (an activation), applied to y.
    `plan`: block rows and width rounding (None: the device's, `plan_for`).
    """
    O, C, kh, kw = weight.shape
    plan = plan or plan_for(x.device)
    xp = _pad_nhwc(x, padding)  # (N, Hp, Wp, C)
    taps = weight.permute(2, 3, 1, 0).reshape(kh * kw, C, O)
    return _tap_conv(xp, taps, bias, (kh, kw), dilation, padding, plan, epilogue), xp


def tap_conv2d_backward(grad_y: Tensor, xp: Tensor, weight: Tensor, padding, dilation, need_input_grad=True,
                        plan: ConvPlan | None = None):
    """grad_y (N, O, H, W), padded input (N, Hp, Wp, C) -> (grad_x (N, C, H, W) or None, grad_weight, grad_bias).

    The gradient padded like the input, gp (N, Hp, Wp, O), serves both products: read from
    row ph*Wp + pw on, it is the gradient at every anchor (zero at the dropped ones), and
    with "same" padding the input gradient is the convolution of gp with the flipped kernel.
    """
    N, Hp, Wp, C = xp.shape
    O, _, kh, kw = weight.shape
    H, W = grad_y.shape[2:]
    plan = plan or plan_for(xp.device)
    L = _anchor_count(N, Hp, Wp, H, W)
    gp = _pad_nhwc(grad_y, padding).view(-1, O)  # (N*Hp*Wp, O)
    start = padding[0] * Wp + padding[1]
    g_anchor = gp[start:start + L]  # (L, O)
    xflat = xp.view(-1, C)
    offsets = _tap_offsets((kh, kw), dilation, Wp)
    grad_taps, grad_bias = _shifted_weight_grad(xflat, g_anchor, offsets, plan)  # (kh*kw, C, O), (O,)
    grad_weight = grad_taps.view(kh, kw, C, O).permute(3, 2, 0, 1)
    grad_x = None
    if need_input_grad and O < _MIN_GEMM_CHANNELS:  # a thin gradient: im2col it (the flipped convolution's input)
        flipped = weight.flip(2, 3).transpose(0, 1)  # (C, O, kh, kw)
        grad_x, _ = conv2d_forward(grad_y, flipped, None, (1, 1), padding, dilation, keep_cols=False, plan=plan)
    elif need_input_grad:
        flipped = weight.flip(2, 3).permute(2, 3, 0, 1).reshape(kh * kw, O, C)
        grad_x = _tap_conv(gp.view(N, Hp, Wp, O), flipped, None, (kh, kw), dilation, padding, plan)
    return grad_x, grad_weight, grad_bias
