"""Widen a trained U-Net without changing what it computes (Net2WiderNet).

`widen_unet(model, width)` returns a U-Net of the same depth with `width` encoder
channels (decoder 2 x width, 4/3 and 2/3 width at the top level) whose output equals the
narrow model's for every input, up to float rounding. Training it further then starts
from everything the narrow model learnt, with room to learn more: the "Net2WiderNet"
transform of Chen, Goodfellow and Shlens, "Net2Net: Accelerating Learning via Knowledge
Transfer" (ICLR 2016).

How, for every convolution's output channels (the "units"):
- the first `old` units of the wide layer are the narrow layer's, in order; each extra
  unit copies the incoming weights and bias of a narrow unit drawn at random;
- a copy computes the same activation as its original (leaky ReLU, max-pooling and
  nearest upsampling act on each channel alone), so the next layer, which reads every
  copy, divides its weight on the original among the copies with shares that sum to
  one. The output is unchanged.
- The shares are drawn at random for every (output, input) weight, not split evenly:
  with even (or merely proportional) shares the copies of a unit would get gradients
  that are equal up to a scale, and Adam, which divides that scale out, would keep them
  identical forever. Random shares give each copy its own gradient direction, so the
  copies part ways from the first step while the function stays exactly the same.

The skip concatenations are followed channel by channel: a decoder convolution's input
is [upsampled decoder channels, skipped encoder channels] (or the image at the top
level), and each part keeps the mapping of the layer that produced it.
"""
from __future__ import annotations

import torch
from torch import Tensor

from n2n_core.architectures import UNet, build_model

__all__ = ["widen_unet"]


def _unit_map(old: int, new: int, generator: torch.Generator) -> Tensor:
    """(new,) int64: wide unit j copies narrow unit map[j]; the first `old` are the originals."""
    extra = torch.randint(0, old, (new - old,), generator=generator) if new > old else torch.empty(0, dtype=torch.long)
    return torch.cat([torch.arange(old), extra])


def _shares(in_map: Tensor, out_channels: int, generator: torch.Generator) -> Tensor:
    """(out_channels, len(in_map)): positive shares that sum to 1 over the copies of each narrow input unit."""
    raw = torch.rand((out_channels, len(in_map)), generator=generator, dtype=torch.float64) + 0.5  # in [0.5, 1.5)
    sums = torch.zeros((out_channels, int(in_map.max()) + 1), dtype=torch.float64)
    sums.index_add_(1, in_map, raw)
    return raw / sums[:, in_map]


def _widen_conv(weight: Tensor, bias: Tensor, in_map: Tensor, out_map: Tensor, generator: torch.Generator):
    """The wide layer's (weight, bias) from the narrow one's, for input/output unit maps.

    weight: (C_out, C_in, k, k) -> (len(out_map), len(in_map), k, k); bias: (C_out,) -> (len(out_map),).
    """
    wide = weight[out_map][:, in_map]
    shares = _shares(in_map, len(out_map), generator)
    wide = (wide.to(torch.float64) * shares[:, :, None, None]).to(weight.dtype)
    return wide, bias[out_map].clone()


def widen_unet(model: UNet, width: int, *, seed: int = 0) -> UNet:
    """A `width`-channel copy of a trained U-Net that computes the same function.

    `model` is a UNet built by `build_model("unet", ...)`; the result has the same
    config except `width` (>= the model's), and its parameters' dtype and device.
    `seed` draws which narrow unit each extra unit copies and the weight shares.
    Raises ValueError for a narrower width or a model that is not a U-Net.
    """
    if not isinstance(model, UNet):
        raise ValueError(f"widening needs a unet, got {type(model).__name__}")
    old_width = model.width
    if not isinstance(width, int) or isinstance(width, bool) or width < old_width:
        raise ValueError(f"widening: the new width must be an int >= the model's ({old_width}), got {width!r}")
    kwargs = dict(model.config.kwargs, width=width)
    params = model.state_dict()
    first = next(iter(params.values()))
    wide = build_model("unet", dtype=first.dtype, device=first.device, **kwargs)
    generator = torch.Generator().manual_seed(seed)
    depth, in_channels, out_channels = model.depth, kwargs["in_channels"], kwargs["out_channels"]
    narrow_sizes = {name: t.shape[0] for name, t in params.items() if name.endswith(".bias")}
    wide_sizes = {name: t.shape[0] for name, t in wide.state_dict().items() if name.endswith(".bias")}

    maps: dict[str, Tensor] = {}  # layer name -> the unit map of its output channels

    def out_map(layer: str) -> Tensor:
        if layer == "dec_conv1":
            return torch.arange(out_channels)  # the image channels are never copied
        maps[layer] = _unit_map(narrow_sizes[f"{layer}.bias"], wide_sizes[f"{layer}.bias"], generator)
        return maps[layer]

    image = torch.arange(in_channels)
    order = [f"enc_conv{i}" for i in range(depth + 2)]
    for i in range(depth, 1, -1):
        order += [f"dec_conv{i}", f"dec_conv{i}b"]
    order += ["dec_conv1a", "dec_conv1b", "dec_conv1"]

    new_state: dict[str, Tensor] = {}
    previous = None
    for layer in order:
        if layer.startswith("enc_conv") and layer != "enc_conv0":
            in_map = maps[previous]
        elif layer.startswith("dec_conv") and layer[len("dec_conv"):].isdigit() and layer != "dec_conv1":
            level = int(layer[len("dec_conv"):])
            # [upsampled decoder channels, the skip from enc_conv{level - 1} after its pooling]
            in_map = torch.cat([maps[previous], maps[f"enc_conv{level - 1}"] + narrow_sizes[f"{previous}.bias"]])
        elif layer == "dec_conv1a":
            # [decoder channels, the input image]
            in_map = torch.cat([maps[previous], image + narrow_sizes[f"{previous}.bias"]])
        elif layer == "enc_conv0":
            in_map = image
        else:  # dec_conv{i}b, dec_conv1b, dec_conv1: the layer just before
            in_map = maps[previous]
        weight, bias = _widen_conv(params[f"{layer}.weight"], params[f"{layer}.bias"], in_map, out_map(layer),
                                   generator)
        new_state[f"{layer}.weight"], new_state[f"{layer}.bias"] = weight, bias
        previous = layer
    wide.load_state_dict(new_state)
    return wide
