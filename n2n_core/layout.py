"""The memory layout the convolution kernels share, and its helpers: channels-last buffers,
zero-bordered padded buffers and the hand-off between layers.

The contract (the kernels of gemm_conv.py, tap_conv.py, resample.py and upsample_conv.py, and
the layers that hand tensors between them):

1. Channels-last memory. Kernels take and return (N, C, H, W) tensors but compute in
   (N, H, W, C) memory: outputs are (N, C, H, W) views of contiguous (N, H, W, C)
   buffers (torch's `channels_last` memory format), so a chain of layers never transposes.
2. Zero-bordered padded buffers. A tap convolution (`use_taps`) writes its output and its
   input gradient into a buffer (N, H + 2 ph, W + 2 pw, C') whose ph border rows and pw
   border columns are zero, and returns the (N, C, H, W) interior view of its first C
   channels (`padded_interior`): C' is C rounded up for the GEMM (44 channels computed as
   48), and the next convolution reads the rows of C channels in place, C' apart (a GEMM
   takes any row stride). `Concat(pad=p)` (skip.py) builds its output the same way. Nothing
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
"""
from __future__ import annotations

from torch import Tensor

from n2n_core import workspace


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
    """(N, C, H, W) -> zero-padded (N, H + 2 ph, W + 2 pw, C), channels last: contiguous, or the
    first C channels of a buffer with wider pixels (contract point 2; either way `.view(-1, C)`
    gives its rows).

    Free when x is the marked interior of such a buffer (see `padded_interior`).
    """
    ph, pw = padding
    marked = padded_buffer(x)
    if marked is not None and marked[1] == (ph, pw):
        return marked[0]
    if ph == 0 and pw == 0:
        return nhwc(x)
    N, C, H, W = x.shape
    xp = workspace.empty(x, N, H + 2 * ph, W + 2 * pw, C)
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


def padded_interior(xp: Tensor, padding, channels: int | None = None) -> Tensor:
    """The interior (N, C, H, W) view of a zero-bordered padded buffer xp (N, H + 2 ph, W + 2 pw, C'),
    C = `channels` <= C' (None: all C'), the first C channels of each pixel.

    The view is marked: a stride-1 convolution with the same padding reads xp's first C
    channels as they are, without a padding copy, and in-place elementwise layers
    (LeakyReLU(inplace=True)) keep the mark and the zero border. The border must stay zero:
    nothing may write into xp outside the view.
    """
    ph, pw = padding
    if channels is not None and channels != xp.shape[3]:
        xp = xp[..., :channels]
    inner = nchw_view(xp[:, ph:xp.shape[1] - ph, pw:xp.shape[2] - pw])
    inner._n2n_padded = (xp, (ph, pw))
    return inner


def padded_buffer(x: Tensor) -> tuple[Tensor, tuple[int, int]] | None:
    """(buffer (N, Hp, Wp, C), (ph, pw)) when x is the marked interior view of a zero-bordered
    padded buffer (`padded_interior`), else None: the one reader of the `_n2n_padded` mark.
    The buffer's pixels may be wider than C (contract point 2)."""
    return getattr(x, "_n2n_padded", None)
