"""Whole-image and tiled inference of a fully convolutional denoiser on one image.

`denoise_image(model, pixels)` runs the model on an image of any size: the image is
reflect-padded at the bottom and right to a multiple of `model.size_multiple` and the
result cropped back (as NVlabs/noise2noise does). Large images are cut into tiles of
`tile` x `tile` output pixels, each run with `overlap` pixels of real context on every
side and only its centre kept (centre-crop stitching). Tile origins and overlaps are
rounded to the network's multiple, so every tile sees the same pooling grid as the
whole image and the edge tiles get exactly the whole image's padding: tiled and
whole-image results differ only where the receptive field reaches past the overlap.

Decision: centre-crop stitching rather than a blended window. With aligned tiles the
kept centres are the whole-image result up to the receptive-field cut-off, and the
output is written once, in place, with no weight accumulator: peak memory is the
input, the output and one tile's activations.

Grey images (C=1) through an RGB model are replicated to three channels and the
output averaged back to one; RGB through a one-channel model runs each channel as a
separate image. The model runs in eval mode (it keeps no activations for backward) and
the output is clipped to [0, 1].

`self_ensemble=True` runs every tile through the model under the eight flips and
90-degree rotations of the square (the dihedral group), maps each output back and
averages them (the "x8" geometric self-ensemble of Lim et al. 2017, EDSR+): eight forward
passes instead of one for a fraction of a dB, most at high noise. A denoiser trained on randomly flipped
and rotated crops (pipeline.data.patches does) treats all eight views alike, so their errors
are partly independent and the mean is better than any one of them.
"""
from __future__ import annotations

import torch
from torch import Tensor


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


def _reflect_indices(size: int, total: int, device) -> Tensor:
    """Indices 0..total-1 folded into 0..size-1 by reflection (edge not repeated).

    Works for any padding, even wider than the image (repeated reflection).
    """
    index = torch.arange(total, device=device)
    if size == 1:
        return torch.zeros_like(index)
    period = 2 * (size - 1)
    index = index % period
    return torch.where(index < size, index, period - index)


def reflect_pad_to(x: Tensor, height: int, width: int) -> Tensor:
    """Reflect-pad x (N, C, H, W) at the bottom and right to (N, C, height, width)."""
    _, _, H, W = x.shape
    if height > H:
        x = x.index_select(2, _reflect_indices(H, height, x.device))
    if width > W:
        x = x.index_select(3, _reflect_indices(W, width, x.device))
    return x


def _model_device_dtype(model) -> tuple[torch.device, torch.dtype]:
    params = model.parameters()
    if not params:
        return torch.device("cpu"), torch.float32
    return params[0].device, params[0].dtype


# The dihedral group of the square as (quarter turns, flip of the last axis first).
DIHEDRAL_VIEWS = tuple((turns, flip) for flip in (False, True) for turns in range(4))


def to_view(x: Tensor, turns: int, flip: bool) -> Tensor:
    """x (..., H, W) seen under a view: flipped left-right first, then rotated by quarter turns."""
    if flip:
        x = x.flip(-1)
    return torch.rot90(x, turns, dims=(-2, -1)) if turns else x


def from_view(y: Tensor, turns: int, flip: bool) -> Tensor:
    """The inverse of `to_view`: from_view(to_view(x, t, f), t, f) == x."""
    if turns:
        y = torch.rot90(y, -turns, dims=(-2, -1))
    return y.flip(-1) if flip else y


def _run_padded(model, region: Tensor, multiple: int, device, dtype, self_ensemble: bool = False) -> Tensor:
    """Model output for region (B, C, h, w), padded to the multiple and cropped back.

    With `self_ensemble` the mean of the model over the eight dihedral views of the
    padded region, each mapped back. The padding is done once, in the region's own frame,
    so every view pools on the same grid as a plain run (and tiles as the whole image).

    Shape: region (B, C, h, w) on any device -> (B, C_out, h, w) float32 on the region's device.
    """
    _, _, h, w = region.shape
    x = region.to(device=device, dtype=dtype)
    x = reflect_pad_to(x, _round_up(h, multiple), _round_up(w, multiple))  # (B, C, H', W')
    if not self_ensemble:
        y = model(x)
    else:
        y = None
        for turns, flip in DIHEDRAL_VIEWS:
            view = from_view(model(to_view(x, turns, flip)), turns, flip)
            y = view if y is None else y.add_(view)
        y = y.div_(len(DIHEDRAL_VIEWS))
    return y[:, :, :h, :w].to(device=region.device, dtype=torch.float32)


def _channels_to_batch(model, pixels: Tensor) -> tuple[Tensor, str]:
    """Arrange (C, H, W) as the model's (B, in_channels, H, W); returns it and how to undo."""
    C = pixels.shape[0]
    in_channels = getattr(model, "in_channels", 3)
    if C == in_channels:
        return pixels.unsqueeze(0), "same"
    if C == 1 and in_channels == 3:
        return pixels.expand(3, *pixels.shape[1:]).unsqueeze(0), "mean"  # grey replicated (view)
    if in_channels == 1:
        return pixels.unsqueeze(1), "channels"  # (C, 1, H, W): each channel its own image
    raise ValueError(f"cannot feed a {C}-channel image to a model with {in_channels} input channels")


def _batch_to_channels(y: Tensor, how: str) -> Tensor:
    if how == "same":
        return y[0]
    if how == "mean":
        return y[0].mean(dim=0, keepdim=True)
    return y[:, 0]


def _blend(noisy: Tensor, denoised: Tensor, strength: float) -> Tensor:
    """noisy + strength (denoised - noisy), clipped to [0, 1]; `denoised` is overwritten."""
    if strength == 1.0:
        return denoised.clamp_(0.0, 1.0)
    return denoised.clamp_(0.0, 1.0).sub_(noisy).mul_(strength).add_(noisy).clamp_(0.0, 1.0)


def denoise_image(model, pixels: Tensor, *, tile: int | None = None, overlap: int = 32,
                  inplace: bool = False, self_ensemble: bool = False, strength: float = 1.0) -> Tensor:
    """Denoise one image with a fully convolutional model.

    Args:
        model: an n2n Module taking (N, C, H, W) in [0, 1]; `size_multiple` and
            `in_channels` attributes are used when present (defaults 1 and 3).
        pixels: the image, float in [0, 1], on any device (tiles are moved to the model's).
        tile: output tile side in pixels; None (or an image no larger than the tile)
            runs the whole image at once. Rounded up to the model's multiple.
        overlap: context on each side of a tile, rounded up to the model's multiple.
        inplace: write the result over `pixels` (float32 only) and return it; when
            tile < overlap a new tensor is returned instead. Tiled, this saves a whole
            image of memory: a tile row is written back once the next row, the last one
            to need it as context, is done.
        self_ensemble: average the model's output over the eight flips and rotations of
            each tile (8 forward passes; see the module docstring).
        strength: how much of the correction to apply, in [0, 1]: the output is
            noisy + strength x (denoised - noisy). 1 is the model's output; less keeps
            some of the input's grain and texture (a photographer's "amount" slider).

    Shape:
        pixels (C, H, W) with C = 1 or 3 -> (C, H, W) float32 in [0, 1], on pixels' device.
    """
    if pixels.dim() != 3:
        raise ValueError(f"denoise_image expects (C, H, W), got shape {tuple(pixels.shape)}")
    if inplace and pixels.dtype != torch.float32:
        raise ValueError(f"inplace denoising needs float32 pixels, got {pixels.dtype}")
    if not 0.0 <= strength <= 1.0:
        raise ValueError(f"strength must be between 0 and 1, got {strength}")
    C, H, W = pixels.shape
    multiple = int(getattr(model, "size_multiple", 1))
    device, dtype = _model_device_dtype(model)
    was_training = getattr(model, "training", False)
    model.eval()
    try:
        x, how = _channels_to_batch(model, pixels)  # (B, in_channels, H, W), a view of pixels
        if tile is None or tile <= 0 or (H <= tile and W <= tile):
            out = _batch_to_channels(_run_padded(model, x, multiple, device, dtype, self_ensemble), how)
            out = _blend(pixels.to(torch.float32), out, strength)
            return pixels.copy_(out) if inplace else out
        tile = _round_up(tile, multiple)
        margin = _round_up(max(overlap, 0), multiple)
        inplace = inplace and tile >= margin  # else a row's context would reach two rows back
        out = pixels if inplace else torch.empty((C, H, W), dtype=torch.float32, device=pixels.device)
        pending = None  # (y0, y1, rows) of the previous tile row, not yet written (inplace)
        for y0 in range(0, H, tile):
            y1 = min(y0 + tile, H)
            ya, yb = max(0, y0 - margin), min(H, y1 + margin)
            rows = torch.empty((C, y1 - y0, W), dtype=torch.float32, device=pixels.device) if inplace \
                else out[:, y0:y1]
            for x0 in range(0, W, tile):
                x1 = min(x0 + tile, W)
                xa, xb = max(0, x0 - margin), min(W, x1 + margin)
                y = _run_padded(model, x[:, :, ya:yb, xa:xb], multiple, device, dtype, self_ensemble)
                y = y[:, :, y0 - ya:y1 - ya, x0 - xa:x1 - xa]  # keep the tile's centre
                # the input's tile is intact here: in place, a row is written back only after the next one
                rows[:, :, x0:x1] = _blend(pixels[:, y0:y1, x0:x1].to(torch.float32), _batch_to_channels(y, how),
                                           strength)
            if inplace:
                if pending is not None:
                    out[:, pending[0]:pending[1]] = pending[2]
                pending = (y0, y1, rows)
        if pending is not None:
            out[:, pending[0]:pending[1]] = pending[2]
        return out
    finally:
        model.train(was_training)
