"""The memory layout the convolution kernels share, and its helpers: channels-last buffers,
zero-bordered padded buffers and the hand-off between layers.

The contract (the kernels of gemm_conv.py, tap_conv.py, resample.py and upsample_conv.py, and
the layers that hand tensors between them):

1. Channels-last memory. Kernels take and return (N, C, H, W) tensors but compute in
   (N, H, W, C) memory: outputs are (N, C, H, W) views of contiguous (N, H, W, C)
   buffers (torch's `channels_last` memory format), so a chain of layers never transposes.
2. Zero-bordered padded buffers whose borders are shared. A tap convolution (`use_taps`)
   writes its output and its input gradient into a padded buffer, and returns the
   (N, C, H, W) interior view of its first C channels (`padded_interior`). The buffer is a
   grid (N, H + ph, W + pw, C'), `new_padded`: pixel (n, h, w) sits at [n, ph + h, pw + w],
   and the ph rows above each image and the pw columns left of each row are zero. Each zero
   row block is also the bottom border of the image before it, and each row's zero columns
   the right border of the row before it; the buffer's storage runs on past the grid by the
   last image's bottom border and the last row's right border, ph (W + pw) + pw zero rows
   of pixels (`flat_rows` gives the flat view through them). Separate borders,
   (N, H + 2 ph, W + 2 pw, C'), cost the GEMMs (2 ph W + 2 pw H + 4 ph pw) / (H W) extra
   rows, 6% at 64x64 and 56% at 8x8 with padding 1; shared, half that. C' is C rounded up
   for the GEMM (44 channels computed as 48), and the next convolution reads the rows of C
   channels in place, C' apart (a GEMM takes any row stride). `Concat(pad=p)` (skip.py) and
   the 2x2 max pool (pool2x2.py) build their outputs the same way. Nothing may write into
   such a buffer outside the interior view.
3. The hand-off. `padded_interior` marks the view with the attribute `_n2n_padded` =
   (buffer, (ph, pw)), and `padded_buffer(x)` is the one place that reads the mark. A
   convolution whose padding equals the mark's reads the buffer itself as its padded input,
   without a padding copy (`_pad_nhwc`). The mark lives on the Python tensor object, so
   it reaches the next convolution only if every layer in between returns the object it was
   given: an in-place elementwise layer must return the same object (LeakyReLU(inplace=True)
   in activation.py does: `torch.maximum(x, x * s, out=x)` returns x), and writes only
   through the interior view, so the border stays zero. Any other layer (a copy, a new
   tensor) drops the mark, and the next convolution pads afresh: slower, never wrong.
4. Why the tap reads land on the right pixels and stay in bounds. With the buffer's
   rows flattened, (R, C) (`flat_rows`), Hp = H + ph and Wp = W + pw, output pixel (n, h, w) is
   anchored at row (n*Hp + h)*Wp + w and its tap (i, j) reads row anchor + i*dh*Wp + j*dw
   (`_tap_offsets`): grid place (n, h + i dh, w + j dw), which is input pixel
   (h + i dh - ph, w + j dw - pw) when that lies inside, and a zero border otherwise: a
   column w + j dw >= Wp runs on into the next row's left border, which is this row's right
   one, and a row h + i dh >= Hp into the next image's top border, which is this image's
   bottom one. With "same" padding (2p = d (k - 1)) the last anchor,
   ((N-1)*Hp + H-1)*Wp + W-1, plus the largest offset, 2 ph Wp + 2 pw, is the buffer's
   last row, (N Hp + ph) Wp + pw - 1; with less padding the reads would be wrong, and
   `use_taps` admits nothing else. Same padding is also what gives the output, and the
   padded output gradient in backward, the input's geometry (Hp, Wp): the anchors are
   written from row ph*Wp + pw on, which puts every output pixel at its padded place (the
   dropped anchors, w >= W or h >= H, land on borders, zeroed after), and backward reads
   the gradient at the input's anchors. Windows taken with `as_strided` from the grid's
   strides (gemm_conv._windows, resample._phase_columns) read the same places, so the
   im2col path takes these buffers too when its convolution is "same" and stride 1;
   `_pad_nhwc_full` pads with separate borders for everything else.
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


def same_stride_one(kernel, stride, padding, dilation) -> bool:
    """Stride 1 and "same" padding (2p = d (k - 1) on both axes): the convolutions whose windows
    read a padded buffer with shared borders correctly (contract point 4)."""
    return stride == (1, 1) and all(2 * p == d * (k - 1) for k, p, d in zip(kernel, padding, dilation))


def padded_rows(N: int, H: int, W: int, padding) -> int:
    """Pixels (rows of the flat view) of a padded buffer for N images of H x W: the grid,
    N (H + ph) (W + pw), and the tail past it, ph (W + pw) + pw (contract point 2)."""
    ph, pw = padding
    return (N * (H + ph) + ph) * (W + pw) + pw


def new_padded(like: Tensor, N: int, H: int, W: int, C: int, padding) -> Tensor:
    """A padded buffer for N images of H x W with C channels: the grid (N, H + ph, W + pw, C),
    contiguous, over storage that runs on through the tail (contract point 2), from the
    workspace (workspace.py). Contents undefined: write the interior, then `zero_border`."""
    ph, pw = padding
    Hp, Wp = H + ph, W + pw
    storage = workspace.empty(like, padded_rows(N, H, W, padding), C)
    return storage[:N * Hp * Wp].view(N, Hp, Wp, C)


def flat_rows(xp: Tensor, padding) -> Tensor:
    """The flat rows (R, C) of padded buffer xp (N, Hp, Wp, C) through its tail, R = `padded_rows`:
    pixel q of the grid in row-major order is row q. xp's pixels may be wider than C (contract
    point 2): the rows are then C' apart."""
    N, Hp, Wp, C = xp.shape
    ph, pw = padding
    return xp.as_strided((padded_rows(N, Hp - ph, Wp - pw, padding), C), (xp.stride(2), 1), xp.storage_offset())


def _pad_nhwc(x: Tensor, padding) -> Tensor:
    """(N, C, H, W) -> a zero-bordered padded buffer, the grid (N, H + ph, W + pw, C) of contract
    point 2 (borders shared), channels last: contiguous, or the first C channels of a buffer
    with wider pixels. For "same" stride-1 windows; `_pad_nhwc_full` for the rest.

    Free when x is the marked interior of such a buffer (see `padded_interior`).
    """
    ph, pw = padding
    marked = padded_buffer(x)
    if marked is not None and marked[1] == (ph, pw):
        return marked[0]
    if ph == 0 and pw == 0:
        return nhwc(x)
    N, C, H, W = x.shape
    xp = new_padded(x, N, H, W, C, padding)
    xp[:, ph:, pw:] = x.permute(0, 2, 3, 1)
    zero_border(xp, padding)
    return xp


def _pad_nhwc_full(x: Tensor, padding) -> Tensor:
    """(N, C, H, W) -> zero-padded (N, H + 2 ph, W + 2 pw, C), contiguous, every image and row
    with borders of its own: for windows that are not "same" stride-1 ones (strides, other
    padding) and for readers of whole padded rows (upsample_conv's output taps). Always a copy."""
    ph, pw = padding
    if ph == 0 and pw == 0:
        return nhwc(x)
    N, C, H, W = x.shape
    xp = workspace.empty(x, N, H + 2 * ph, W + 2 * pw, C)
    xp[:, ph:ph + H, pw:pw + W] = x.permute(0, 2, 3, 1)
    xp[:, :ph].zero_()
    xp[:, ph + H:].zero_()
    xp[:, ph:ph + H, :pw].zero_()
    xp[:, ph:ph + H, pw + W:].zero_()
    return xp


def zero_border(xp: Tensor, padding) -> None:
    """Zero the borders of padded buffer xp (N, Hp, Wp, C) (contract point 2), in place: the ph
    rows above each image, the pw columns left of each row, and the tail past the grid.

    (A full zero fill would be one more pass over the buffer.)
    """
    ph, pw = padding
    N, Hp, Wp = xp.shape[:3]
    xp[:, :ph].zero_()
    xp[:, ph:, :pw].zero_()
    flat_rows(xp, padding)[N * Hp * Wp:].zero_()


def padded_interior(xp: Tensor, padding, channels: int | None = None) -> Tensor:
    """The interior (N, C, H, W) view of a zero-bordered padded buffer xp (N, H + ph, W + pw, C')
    (contract point 2), C = `channels` <= C' (None: all C'), the first C channels of each pixel.

    The view is marked: a stride-1 convolution with the same padding reads xp's first C
    channels as they are, without a padding copy, and in-place elementwise layers
    (LeakyReLU(inplace=True)) keep the mark and the zero border. The border must stay zero:
    nothing may write into xp outside the view.
    """
    ph, pw = padding
    if channels is not None and channels != xp.shape[3]:
        xp = xp[..., :channels]
    inner = nchw_view(xp[:, ph:, pw:])
    inner._n2n_padded = (xp, (ph, pw))
    return inner


def padded_buffer(x: Tensor) -> tuple[Tensor, tuple[int, int]] | None:
    """(buffer (N, Hp, Wp, C), (ph, pw)) when x is the marked interior view of a zero-bordered
    padded buffer (`padded_interior`), else None: the one reader of the `_n2n_padded` mark.
    The buffer's pixels may be wider than C (contract point 2)."""
    return getattr(x, "_n2n_padded", None)
