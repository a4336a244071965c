"""Whole-image and tiled inference of a fully convolutional denoiser, one image or several.

`denoise_image(model, pixels)` runs the model on an image of any size: the image is
reflect-padded at the bottom and right to a multiple of `model.size_multiple` and the
result cropped back (as NVlabs/noise2noise does). Large images are cut into tiles of
`tile` x `tile` output pixels; each runs in a region of `tile + 2 overlap` pixels of real
context around it (the overlap rounded up to the network's multiple) and only its centre
is kept (centre-crop stitching). Every region of an image has the same size: at the
image's edges the region is shifted inwards (more context on the inner side) instead of
cut, and the last one ends at the image's padded edge, where it is reflect-padded exactly
as the whole image would be. Tile origins and regions lie on the network's multiple, so
every tile sees the same pooling grid as the whole image: tiled and whole-image results
differ only where the receptive field reaches past the context.

Batches: regions of one size go through the model together, as many per forward as
`forward_pixels` (padded pixels, all of a forward's regions together) allows, in
row-major order; `denoise_images` does the same for whole images of one padded size.
None (the default for callers other than the bulk job) is one region per forward with no
limit on its size, as before. With a limit, an image or a tile larger than it is cut
into the largest tiles that fit. Batching never changes a result on the CPU's
convolution path (its row blocks are the same GEMMs whatever the batch: tested bit for
bit); on the one-GEMM path of CUDA the GEMMs' row counts change with the batch, which may
change the last bits of float32 sums (up to about 1e-6 measured on a CPU).

Out of memory (`memory.is_out_of_memory`): the failing forward's batch halves, and when
it held one region the tile halves; the image goes on from its first unfinished tile
row (rows already written stay, their input context is still intact), and
`on_out_of_memory(forward_pixels, message)` hears of each retry. A one-region forward of
the smallest tile (the network's multiple) that still fails raises `OutOfMemory`.

Decision: centre-crop stitching rather than a blended window. With aligned tiles the
kept centres are the whole-image result up to the receptive-field cut-off, and the
output is written once, in place, with no weight accumulator: peak memory is the
input, the output and one forward's activations (in place: the input and the tile rows
whose input later regions still read).

Grey images (C=1) through an RGB model are replicated to three channels and the
output averaged back to one; RGB through a one-channel model runs each channel as a
separate image. The model runs in eval mode (it keeps no activations for backward), in
its own dtype (`--precision`: the regions are cast to it, the output back to float32),
and the output is clipped to [0, 1].

`self_ensemble=True` runs every tile through the model under the eight flips and
90-degree rotations of the square (the dihedral group), maps each output back and
averages them (the "x8" geometric self-ensemble of Lim et al. 2017, EDSR+): eight forward
passes instead of one for a fraction of a dB, most at high noise. A denoiser trained on randomly flipped
and rotated crops (pipeline.data.patches does) treats all eight views alike, so their errors
are partly independent and the mean is better than any one of them.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from pipeline.inference.memory import is_out_of_memory

# `--precision`: the dtype the model computes in (its parameters are cast to it; regions follow)
PRECISIONS = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


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


def model_device_dtype(model) -> tuple[torch.device, torch.dtype]:
    """Where the model's parameters are and their dtype (the CPU and float32 for a model without any)."""
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


class OutOfMemory(RuntimeError):
    """A forward of one smallest tile ran out of memory: nothing smaller is left to try."""


class _ForwardOutOfMemory(Exception):
    """One forward of `regions` units (tiles or whole images, each `unit_pixels` padded pixels with
    all its batch rows) ran out of memory; raised outside the handler, so its tensors are freed."""

    def __init__(self, regions: int, unit_pixels: int, message: str):
        super().__init__(message)
        self.regions, self.unit_pixels, self.message = regions, unit_pixels, message


def _run_model(model, x: Tensor, self_ensemble: bool) -> Tensor:
    """model(x) for a padded batch x (B, C, H', W') on the model's device and dtype, or with
    `self_ensemble` the mean of the model over the eight dihedral views of each region, mapped back."""
    if not self_ensemble:
        return model(x)
    y = None
    for turns, flip in DIHEDRAL_VIEWS:
        view = from_view(model(to_view(x, turns, flip)), turns, flip)
        y = view if y is None else y.add_(view)
    return y.div_(len(DIHEDRAL_VIEWS))


def _forward(model, x: Tensor, self_ensemble: bool, regions: int) -> Tensor:
    """`_run_model` on x holding `regions` units of equal size, with an out-of-memory error turned into
    `_ForwardOutOfMemory` once the failed forward's tensors are released (a retry needs that memory back)."""
    message = None
    try:
        return _run_model(model, x, self_ensemble)
    except Exception as error:  # noqa: BLE001 - anything but running out of memory is raised as it is
        if not is_out_of_memory(error):
            raise
        message = f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
    unit_pixels = x.shape[0] // regions * x.shape[-2] * x.shape[-1]
    del x
    if torch.cuda.is_available():
        torch.cuda.empty_cache()  # hand the failed forward's cached blocks back before the retry
    raise _ForwardOutOfMemory(regions, unit_pixels, message)


def run_padded(model, region: Tensor, multiple: int, device, dtype, self_ensemble: bool = False) -> Tensor:
    """Model output for region (B, C, h, w), padded to the multiple and cropped back.

    With `self_ensemble` the mean of the model over the eight dihedral views of the
    padded region, each mapped back. The padding is done once, in the region's own frame,
    so every view pools on the same grid as a plain run (and tiles as the whole image).

    Shape: region (B, C, h, w) on any device -> (B, C_out, h, w) float32 on the region's device.
    """
    _, _, h, w = region.shape
    x = region.to(device=device, dtype=dtype)
    x = reflect_pad_to(x, _round_up(h, multiple), _round_up(w, multiple))  # (B, C, H', W')
    y = _run_model(model, x, self_ensemble)
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


def _region(start: int, stop: int, size: int, margin: int, extent: int, multiple: int) -> tuple[int, int]:
    """The region [a, b) along one axis of `size` pixels that computes the kept [start, stop): `margin`
    pixels of context on each side where the image has them, `extent` pixels long in all (moved
    inwards at the image's edges), a on the network's multiple; b - a is `extent` or the image's rest,
    which its reflect padding brings to `extent`. `extent` is at most the padded size."""
    a = min(max(0, start - margin), _round_up(size, multiple) - extent)
    return a, min(size, a + extent)


@dataclass(frozen=True)
class _Tiling:
    """One image's tiles: side `side` (None: the whole image as one region), and every region's padded
    size (rows, cols)."""

    side: int | None
    rows: int
    cols: int

    @property
    def region_pixels(self) -> int:
        return self.rows * self.cols


def _tiling(tile: int | None, H: int, W: int, margin: int, multiple: int, limit: int | None) -> _Tiling:
    """The tiling of an H x W image: `tile` as asked (None: whole), made smaller until one region fits
    `limit` padded pixels (None: no limit); never below the network's multiple."""
    Hp, Wp = _round_up(H, multiple), _round_up(W, multiple)
    whole = tile is None or (H <= tile and W <= tile)
    if whole and (limit is None or Hp * Wp <= limit):
        return _Tiling(None, Hp, Wp)
    side = _round_up(max(H, W) if whole else tile, multiple)
    while limit is not None and side > multiple and math.prod(_extents(side, H, W, margin, multiple)) > limit:
        side -= multiple
    return _Tiling(side, *_extents(side, H, W, margin, multiple))


def _extents(side: int, H: int, W: int, margin: int, multiple: int) -> tuple[int, int]:
    """The padded (rows, cols) of every region of a tiling of side `side`: the tile and its context on
    both sides, at most the padded image."""
    return min(_round_up(H, multiple), side + 2 * margin), min(_round_up(W, multiple), side + 2 * margin)


def _halved(tiling: _Tiling, failure: _ForwardOutOfMemory, H: int, W: int, margin: int, multiple: int) -> int:
    """The `forward_pixels` to retry with after `failure`: half the batch, or one region (with its batch
    rows) of the tile halved (the whole image's tile: its larger side), halved again while its region is
    no smaller (context the image has covers it). Raises `OutOfMemory` when nothing smaller is left."""
    if failure.regions > 1:
        return (failure.regions // 2) * failure.unit_pixels
    side = tiling.side if tiling.side is not None else _round_up(max(H, W), multiple)
    batch_rows = max(1, failure.unit_pixels // tiling.region_pixels)
    while side > multiple:
        side = max(multiple, (side // 2) // multiple * multiple)
        pixels = math.prod(_extents(side, H, W, margin, multiple)) * batch_rows
        if pixels < failure.unit_pixels:
            return pixels
    raise OutOfMemory(f"out of memory even with one {tiling.rows}x{tiling.cols} region per forward (a tile of "
                      f"{tiling.side or 'the whole image'} with its context; nothing smaller to try): {failure.message}")


class _Rows:
    """Finished tile rows of the output. Out of place they are written into `out` at once; in
    place (`out` is the input) a row waits in its own buffer until no region still to run reads
    the input rows it covers."""

    def __init__(self, out: Tensor, inplace: bool):
        self.out, self.inplace = out, inplace
        self.pending: list[tuple[int, int, Tensor]] = []
        self.done_to = 0  # rows above this are finished (written, or pending in place)

    def buffer(self, y0: int, y1: int) -> Tensor:
        if not self.inplace:
            return self.out[:, y0:y1]
        return torch.empty((self.out.shape[0], y1 - y0, self.out.shape[2]), dtype=torch.float32,
                           device=self.out.device)

    def finished(self, y0: int, y1: int, rows: Tensor, next_read: int) -> None:
        """Row [y0, y1) is done; regions still to run read input rows from `next_read` on."""
        self.done_to = y1
        if not self.inplace:
            return
        self.pending.append((y0, y1, rows))
        self.flush(next_read)

    def flush(self, next_read: int) -> None:
        keep = []
        for y0, y1, rows in self.pending:
            if y1 <= next_read:
                self.out[:, y0:y1] = rows
            else:
                keep.append((y0, y1, rows))
        self.pending = keep


def _tiled(model, x: Tensor, pixels: Tensor, how: str, rows: _Rows, tiling: _Tiling, y_start: int, margin: int,
           multiple: int, device, dtype, self_ensemble: bool, strength: float, limit: int | None) -> None:
    """Run the tile rows from y_start on, `limit` padded pixels per forward. Raises
    `_ForwardOutOfMemory` with the rows finished before the failing forward in `rows`."""
    _, _, H, W = x.shape
    side = tiling.side
    per_forward = 1 if limit is None else max(1, limit // (tiling.region_pixels * x.shape[0]))
    row_starts = list(range(y_start, H, side))
    region_y = {y0: _region(y0, min(y0 + side, H), H, margin, tiling.rows, multiple) for y0 in row_starts}
    tiles = [(y0, x0) for y0 in row_starts for x0 in range(0, W, side)]
    buffers: dict[int, Tensor] = {}
    for first in range(0, len(tiles), per_forward):
        batch = tiles[first:first + per_forward]
        regions = []
        for y0, x0 in batch:
            (ya, yb), (xa, xb) = region_y[y0], _region(x0, min(x0 + side, W), W, margin, tiling.cols, multiple)
            region = x[:, :, ya:yb, xa:xb].to(device=device, dtype=dtype)
            regions.append(reflect_pad_to(region, tiling.rows, tiling.cols))  # (B, C, rows, cols)
        y = _forward(model, torch.cat(regions), self_ensemble, len(batch))  # (len(batch) B, C_out, rows, cols)
        for k, y_tile in enumerate(y.split(x.shape[0])):
            y0, x0 = batch[k]
            y1, x1 = min(y0 + side, H), min(x0 + side, W)
            (ya, _), (xa, _) = region_y[y0], _region(x0, x1, W, margin, tiling.cols, multiple)
            kept = y_tile[:, :, y0 - ya:y1 - ya, x0 - xa:x1 - xa].to(device=pixels.device, dtype=torch.float32)
            if y0 not in buffers:
                buffers[y0] = rows.buffer(y0, y1)
            # the input's tile is intact here: in place, a row is written back only once no region reads it
            buffers[y0][:, :, x0:x1] = _blend(pixels[:, y0:y1, x0:x1].to(torch.float32),
                                              _batch_to_channels(kept, how), strength)
            if x1 == W:  # the row is complete
                later = [region_y[r][0] for r in row_starts if r > y0]
                rows.finished(y0, y1, buffers.pop(y0), later[0] if later else H)


def denoise_image(model, pixels: Tensor, *, tile: int | None = None, overlap: int = 32,
                  inplace: bool = False, self_ensemble: bool = False, strength: float = 1.0,
                  forward_pixels: int | None = None, on_out_of_memory=None) -> Tensor:
    """Denoise one image with a fully convolutional model.

    Args:
        model: an n2n Module taking (N, C, H, W) in [0, 1]; `size_multiple` and
            `in_channels` attributes are used when present (defaults 1 and 3). It runs
            on its parameters' device and in their dtype.
        pixels: the image, float in [0, 1], on any device (tiles are moved to the model's).
        tile: output tile side in pixels; None (or an image no larger than the tile)
            runs the whole image at once. Rounded up to the model's multiple.
        overlap: context on each side of a tile, rounded up to the model's multiple.
        inplace: write the result over `pixels` (float32 only) and return it. Tiled, this
            saves a whole image of memory: a tile row is written back once no region still
            to run reads the input rows it covers.
        self_ensemble: average the model's output over the eight flips and rotations of
            each tile (8 forward passes; see the module docstring).
        strength: how much of the correction to apply, in [0, 1]: the output is
            noisy + strength x (denoised - noisy). 1 is the model's output; less keeps
            some of the input's grain and texture (a photographer's "amount" slider).
        forward_pixels: the most padded pixels one forward may take, all its regions
            together (`memory.ForwardCost.pixels`); None: one region per forward, any size.
        on_out_of_memory: called as f(forward_pixels, message) before each retry after an
            out-of-memory error (see the module docstring).

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
    device, dtype = model_device_dtype(model)
    margin = _round_up(max(overlap, 0), multiple)
    tile = tile if tile is not None and tile > 0 else None
    was_training = getattr(model, "training", False)
    model.eval()
    try:
        x, how = _channels_to_batch(model, pixels)  # (B, in_channels, H, W), a view of pixels
        out = rows = None
        y = 0
        limit = forward_pixels
        while y < H:
            tiling = _tiling(tile, H, W, margin, multiple, limit)
            try:
                if tiling.side is None:
                    padded = reflect_pad_to(x.to(device=device, dtype=dtype), tiling.rows, tiling.cols)
                    y_out = _forward(model, padded, self_ensemble, 1)[:, :, :H, :W]
                    result = _blend(pixels.to(torch.float32),
                                    _batch_to_channels(y_out.to(device=pixels.device, dtype=torch.float32), how),
                                    strength)
                    return pixels.copy_(result) if inplace else result
                if rows is None:
                    out = pixels if inplace else torch.empty((C, H, W), dtype=torch.float32, device=pixels.device)
                    rows = _Rows(out, inplace)
                _tiled(model, x, pixels, how, rows, tiling, y, margin, multiple, device, dtype, self_ensemble,
                       strength, limit)
                y = H
            except _ForwardOutOfMemory as failure:
                limit = _halved(tiling, failure, H, W, margin, multiple)
                if on_out_of_memory is not None:
                    on_out_of_memory(limit, failure.message)
                y = rows.done_to if rows is not None else 0  # go on from the first row not finished
        return out
    finally:
        model.train(was_training)


def _whole_images(model, images: list[Tensor], prepared: list[tuple[Tensor, str]], tiling: _Tiling, device, dtype,
                  self_ensemble: bool, strength: float, inplace: bool) -> list[Tensor]:
    """Whole images of one padded size (`tiling`) and batch rows, in one forward."""
    batch = torch.cat([reflect_pad_to(x.to(device=device, dtype=dtype), tiling.rows, tiling.cols) for x, _ in prepared])
    y = _forward(model, batch, self_ensemble, len(images))
    outputs = []
    for pixels, (x, how), y_image in zip(images, prepared, y.split(prepared[0][0].shape[0])):
        H, W = pixels.shape[1:]
        result = _blend(pixels.to(torch.float32),
                        _batch_to_channels(y_image[:, :, :H, :W].to(device=pixels.device, dtype=torch.float32), how),
                        strength)
        outputs.append(pixels.copy_(result) if inplace else result)
    return outputs


def denoise_images(model, images: list[Tensor], *, tile: int | None = None, overlap: int = 32,
                   inplace: bool | list[bool] = False, self_ensemble: bool = False, strength: float = 1.0,
                   forward_pixels: int | None = None, on_out_of_memory=None) -> list:
    """`denoise_image` for each of `images`, several per forward where they can share one.

    Images that run whole (no larger than `tile`, and within `forward_pixels`) go through the
    model together when they have one padded size and channel arrangement, as many per forward
    as `forward_pixels` allows (None: one); the others one by one, their tiles batched. Out of
    memory, a batch of images halves, and an image alone goes on tiled (`denoise_image`).
    `inplace`: for all images, or one flag per image. Returns each image's output, or the
    exception that stopped it: one image's error never stops the others.
    """
    results: list = [None] * len(images)
    inplace = list(inplace) if isinstance(inplace, (list, tuple)) else [inplace] * len(images)
    multiple = int(getattr(model, "size_multiple", 1))
    device, dtype = model_device_dtype(model)
    margin = _round_up(max(overlap, 0), multiple)
    tile = tile if tile is not None and tile > 0 else None
    limit = forward_pixels

    def out_of_memory(pixels: int, message: str) -> None:
        nonlocal limit
        limit = pixels
        if on_out_of_memory is not None:
            on_out_of_memory(pixels, message)

    groups: dict[tuple, list[int]] = {}
    alone: list[int] = []
    prepared = {}
    for i, pixels in enumerate(images):
        try:
            if pixels.dim() != 3:
                raise ValueError(f"denoise_image expects (C, H, W), got shape {tuple(pixels.shape)}")
            if inplace[i] and pixels.dtype != torch.float32:
                raise ValueError(f"inplace denoising needs float32 pixels, got {pixels.dtype}")
            if not 0.0 <= strength <= 1.0:
                raise ValueError(f"strength must be between 0 and 1, got {strength}")
            prepared[i] = _channels_to_batch(model, pixels)
        except Exception as error:  # noqa: BLE001 - this image's error, returned in its place
            results[i] = error
            continue
        tiling = _tiling(tile, pixels.shape[1], pixels.shape[2], margin, multiple, limit)
        if tiling.side is None:
            groups.setdefault((tiling, prepared[i][0].shape[0], inplace[i]), []).append(i)
        else:
            alone.append(i)
    was_training = getattr(model, "training", False)
    model.eval()
    try:
        for (tiling, rows, image_inplace), members in groups.items():
            start = 0
            while start < len(members):
                per_forward = 1 if limit is None else max(1, limit // (tiling.region_pixels * rows))
                chunk = members[start:start + per_forward]
                try:
                    outputs = _whole_images(model, [images[i] for i in chunk], [prepared[i] for i in chunk], tiling,
                                            device, dtype, self_ensemble, strength, image_inplace)
                except _ForwardOutOfMemory as failure:
                    if len(chunk) > 1:
                        out_of_memory(_halved(tiling, failure, 0, 0, margin, multiple), failure.message)
                        continue
                    H, W = images[chunk[0]].shape[1:]
                    try:
                        out_of_memory(_halved(tiling, failure, H, W, margin, multiple), failure.message)
                    except OutOfMemory as error:
                        results[chunk[0]] = error
                    else:
                        alone.append(chunk[0])
                    start += 1
                    continue
                except Exception as error:  # noqa: BLE001 - not memory: the images of this forward fail
                    outputs = [error] * len(chunk)
                for i, output in zip(chunk, outputs):
                    results[i] = output
                start += len(chunk)
        for i in sorted(alone):
            try:
                results[i] = denoise_image(model, images[i], tile=tile, overlap=overlap, inplace=inplace[i],
                                           self_ensemble=self_ensemble, strength=strength, forward_pixels=limit,
                                           on_out_of_memory=out_of_memory)
            except Exception as error:  # noqa: BLE001 - this image's error, returned in its place
                results[i] = error
    finally:
        model.train(was_training)
    return results
