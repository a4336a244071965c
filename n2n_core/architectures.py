"""Named architectures: `build_model("seed" | "seed-deep" | "unet", **kwargs)`.

- "seed": the "NN" of the course design this project started from (a from-scratch
  framework whose network reached only 12.68 dB, see README "Initialization"), kept as
  the baseline, a `Sequential`: conv 2x2/2 + ReLU (48), conv 2x2/2 + ReLU (96),
  Upsampling + ReLU (48), Upsampling + Sigmoid (3). Layers keep their default (torch's)
  initialization.
- "seed-deep": that design's "deep NN": four conv 2x2/2 + ReLU (48, 48, 48, 96), then
  Upsampling + ReLU (96, 96, 48) and Upsampling + Sigmoid (3).
- "unet": the Noise2Noise paper's U-Net (Lehtinen et al. 2018, NVlabs/noise2noise
  network.py), with `depth` pooling levels and encoder `width` (decoder 2 x width).

Every model carries `config` (a `ModelConfig` with every argument filled in, so a
checkpoint rebuilds exactly the same network), `size_multiple` (H and W of the input
must be multiples of it) and `in_channels`.

`parameter_shapes(name, **kwargs)` names the tensors `build_model` would create, with
their shapes, without allocating any: a checkpoint loader compares them with the
file's own before building (a file asking for 6000 channels costs nothing), and
`count_parameters` bounds a model's size before anything is allocated.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Iterator

import torch
from torch import Tensor

from n2n_core.activation import LeakyReLU, ReLU, Sigmoid
from n2n_core.conv import Conv2d, UpsampleConcatConv2d, Upsampling
from n2n_core.module import Module, Parameter, Sequential
from n2n_core.pooling import MaxPool2d
from n2n_core.skip import Add


@dataclass(frozen=True)
class ModelConfig:
    """An architecture's name and the keyword arguments that rebuild it (JSON-able values)."""

    name: str
    kwargs: dict = field(default_factory=dict)


# -- initialization ---------------------------------------------------------------------
def he_normal_(param: Parameter, negative_slope: float, generator: torch.Generator | None) -> None:
    """He et al. (2015) normal init on the fan-in: std = gain / sqrt(fan_in).

    gain = sqrt(2 / (1 + negative_slope^2)) for a (leaky) ReLU that follows the layer
    (torch's kaiming_normal_(a=negative_slope, mode="fan_in")); pass
    negative_slope=1 for gain 1 (a linear layer). Drawn on the generator's device
    (CPU by default) so results do not depend on where the model lives.
    """
    fan_in = param.data[0].numel()  # in_channels * kh * kw for a (out, in, kh, kw) weight
    std = math.sqrt(2.0 / (1.0 + negative_slope**2)) / math.sqrt(fan_in)
    device = generator.device if generator is not None else torch.device("cpu")
    values = torch.randn(param.shape, generator=generator, dtype=param.dtype, device=device) * std
    param.data.copy_(values)


# -- seed networks ------------------------------------------------------------------------
def _seed(convs: list[int], ups: list[int], in_channels: int, out_channels: int, generator, dtype, device):
    layers: list[Module] = []
    channels = in_channels
    for out in convs:
        layers += [Conv2d(channels, out, 2, stride=2, generator=generator, dtype=dtype, device=device), ReLU()]
        channels = out
    for i, out in enumerate(ups + [out_channels]):
        last = i == len(ups)
        layers += [Upsampling(channels, out, generator=generator, dtype=dtype, device=device),
                   Sigmoid() if last else ReLU()]
        channels = out
    return Sequential(*layers)


def seed(in_channels: int = 3, out_channels: int = 3, width: int = 48, *, generator=None,
         dtype=torch.float32, device=None) -> Sequential:
    """Table 1: conv 2x2/2 (width), conv 2x2/2 (2 width), Upsampling (width), Upsampling (out).

    Shape: (N, in_channels, H, W) -> (N, out_channels, 4 floor(H/4), 4 floor(W/4)).
    """
    return _seed([width, 2 * width], [width], in_channels, out_channels, generator, dtype, device)


def seed_deep(in_channels: int = 3, out_channels: int = 3, width: int = 48, *, generator=None,
              dtype=torch.float32, device=None) -> Sequential:
    """Table 2: conv 2x2/2 x3 (width), conv 2x2/2 (2 width), Upsampling (2w, 2w, w), Upsampling (out).

    Shape: (N, in_channels, H, W) -> (N, out_channels, 16 floor(H/16), 16 floor(W/16)).
    """
    return _seed([width] * 3 + [2 * width], [2 * width, 2 * width, width], in_channels, out_channels,
                 generator, dtype, device)


# -- the Noise2Noise U-Net -----------------------------------------------------------------
class UNet(Module):
    """The Noise2Noise U-Net, layer names as in the paper's network.py.

    Encoder: enc_conv0, enc_conv1, pool1, enc_conv2, pool2, ..., enc_conv{D}, pool{D},
    enc_conv{D+1} (width channels; 3x3 convolutions, padding 1, leaky ReLU 0.1;
    2x2 max-pooling). The input and the output of pool1 .. pool{D-1} go on a skip stack.
    Decoder, for level i = D .. 2: dec_conv{i} over (nearest x2 upsampling, then the
    popped skip concatenated) and dec_conv{i}b (2 width channels, leaky ReLU). Level 1:
    dec_conv1a over (upsampling, the input concatenated) (4/3 width), dec_conv1b (2/3
    width), both leaky ReLU, and dec_conv1 with a linear output. With D = 5 and width = 48
    this is exactly the paper's network (decoder 96, 96, 64, 32 channels). The paper's
    upsample and concat layers have no parameters: here they are part of the decoder's
    first convolution at each level (conv.UpsampleConcatConv2d, the Conv2d's weights).
    `residual=True` returns input + network(input) (then out_channels == in_channels).

    Initialization: He normal on the fan-in with the leaky-ReLU gain
    sqrt(2 / (1 + 0.1^2)) for every convolution followed by a leaky ReLU, gain 1 for
    the linear output dec_conv1; biases zero (the paper's TensorFlow code does the same
    with gain sqrt(2)).

    Shape:
        Input: (N, in_channels, H, W) with H and W multiples of 2^depth.
        Output: (N, out_channels, H, W).
    """

    negative_slope = 0.1

    def __init__(self, in_channels: int = 3, out_channels: int = 3, depth: int = 5, width: int = 48,
                 residual: bool = False, *, generator=None, dtype=torch.float32, device=None):
        super().__init__()
        if depth < 1:
            raise ValueError(f"unet: depth must be >= 1, got {depth}")
        if width < 1 or in_channels < 1 or out_channels < 1:
            raise ValueError(f"unet: channel counts must be >= 1 (width={width}, in={in_channels}, out={out_channels})")
        if residual and in_channels != out_channels:
            raise ValueError(f"unet: residual=True needs in_channels == out_channels ({in_channels} != {out_channels})")
        self.depth, self.width, self.residual = depth, width, residual
        wide, dec1a, dec1b = 2 * width, max(1, round(width * 4 / 3)), max(1, round(width * 2 / 3))

        def conv(name: str, cin: int, cout: int, leaky: bool = True, skip: int = 0) -> None:
            # skip > 0: the input is cat(upsample(h), skip) with cin - skip channels of h, one fused layer
            if skip:
                layer = UpsampleConcatConv2d(cin - skip, skip, cout, generator=generator, dtype=dtype, device=device)
            else:
                layer = Conv2d(cin, cout, 3, padding=1, generator=generator, dtype=dtype, device=device)
            he_normal_(layer.weight, self.negative_slope if leaky else 1.0, generator)
            layer.bias.data.zero_()
            setattr(self, name, layer)
            if leaky:
                # in place: the convolution's output (and input gradient) is a fresh buffer no one else reads
                setattr(self, name + "_act", LeakyReLU(self.negative_slope, inplace=True))

        # encoder
        conv("enc_conv0", in_channels, width)
        for i in range(1, depth + 1):
            conv(f"enc_conv{i}", width, width)
            setattr(self, f"pool{i}", MaxPool2d(2, output_padding=1))  # read by 3x3 convolutions, padding 1
        conv(f"enc_conv{depth + 1}", width, width)
        # decoder
        channels = width  # coming up from the bottleneck
        for i in range(depth, 1, -1):
            conv(f"dec_conv{i}", channels + width, wide, skip=width)  # upsample{i}, concat{i} and the conv
            conv(f"dec_conv{i}b", wide, wide)
            channels = wide
        conv("dec_conv1a", channels + in_channels, dec1a, skip=in_channels)
        conv("dec_conv1b", dec1a, dec1b)
        conv("dec_conv1", dec1b, out_channels, leaky=False)
        if residual:
            self.add_input = Add()

    def _layer(self, name: str) -> Module:
        return self._modules[name]

    def _conv_act(self, name: str, h: Tensor) -> Tensor:
        # the activation runs fused into the convolution, on each block of its output while in cache
        return self._layer(name)(h, activation=self._layer(name + "_act"))

    def _up_cat_conv_act(self, name: str, h: Tensor, skip: Tensor) -> Tensor:
        # upsample h, concatenate the skip, convolve and activate: one UpsampleConcatConv2d
        return self._layer(name)(h, skip, activation=self._layer(name + "_act"))

    def _conv_act_backward(self, name: str, g: Tensor, **kwargs):
        return self._layer(name).backward(self._layer(name + "_act").backward(g), **kwargs)

    def forward(self, x: Tensor) -> Tensor:
        n, c, height, width = x.shape
        m = 2**self.depth
        if height % m or width % m:
            raise ValueError(f"unet: input H and W must be multiples of {m}, got {height}x{width}")
        skips = [x]
        h = self._conv_act("enc_conv0", x)
        for i in range(1, self.depth + 1):
            h = self._layer(f"pool{i}")(self._conv_act(f"enc_conv{i}", h))  # (N, width, H/2^i, W/2^i)
            if i < self.depth:
                skips.append(h)
        h = self._conv_act(f"enc_conv{self.depth + 1}", h)
        for i in range(self.depth, 1, -1):
            h = self._up_cat_conv_act(f"dec_conv{i}", h, skips.pop())
            h = self._conv_act(f"dec_conv{i}b", h)
        h = self._up_cat_conv_act("dec_conv1a", h, skips.pop())  # (N, dec1a, H, W)
        h = self._conv_act("dec_conv1b", h)
        h = self.dec_conv1(h)  # linear output
        return self.add_input(x, h) if self.residual else h

    def backward(self, grad_output: Tensor, input_grad: bool = True) -> Tensor | None:
        """grad_output (N, out_channels, H, W) -> the input's gradient (N, in_channels, H, W), or None
        with `input_grad=False` (training: only the parameters' gradients are needed, and enc_conv0
        and dec_conv1a skip their products with respect to the input)."""
        grad_x = None
        g = grad_output
        if self.residual:
            grad_x, g = self.add_input.backward(g)
        grad_skips = []  # filled in the order the decoder visits the skips backwards: input first
        g = self.dec_conv1.backward(g)
        g, grad_skip = self._conv_act_backward("dec_conv1a", self._conv_act_backward("dec_conv1b", g),
                                               skip_grad=input_grad)
        grad_skips.append(grad_skip)
        for i in range(2, self.depth + 1):
            g, grad_skip = self._conv_act_backward(f"dec_conv{i}", self._conv_act_backward(f"dec_conv{i}b", g))
            grad_skips.append(grad_skip)
        g = self._conv_act_backward(f"enc_conv{self.depth + 1}", g)
        for i in range(self.depth, 0, -1):
            if i < self.depth:
                g += grad_skips.pop()  # the skip pushed after pool{i} (in place: g is this step's own buffer)
            g = self._conv_act_backward(f"enc_conv{i}", self._layer(f"pool{i}").backward(g))
        g = self._conv_act_backward("enc_conv0", g, input_grad=input_grad)
        if not input_grad:
            return None
        g = g + grad_skips.pop()  # the input itself was the first skip
        return g if grad_x is None else g + grad_x

    def extra_repr(self) -> str:
        return f"depth={self.depth}, width={self.width}, residual={self.residual}"


def unet(in_channels: int = 3, out_channels: int = 3, depth: int = 5, width: int = 48, residual: bool = False,
         *, generator=None, dtype=torch.float32, device=None) -> UNet:
    return UNet(in_channels, out_channels, depth, width, residual, generator=generator, dtype=dtype, device=device)


# -- registry -----------------------------------------------------------------------------
ARCHITECTURES = {"seed": seed, "seed-deep": seed_deep, "unet": unet}
_SIZE_MULTIPLE = {"seed": lambda kw: 4, "seed-deep": lambda kw: 16, "unet": lambda kw: 2 ** kw["depth"]}
_DEFAULTS = {
    "seed": dict(in_channels=3, out_channels=3, width=48),
    "seed-deep": dict(in_channels=3, out_channels=3, width=48),
    "unet": dict(in_channels=3, out_channels=3, depth=5, width=48, residual=False),
}


def _check_kwargs(name: str, kwargs: dict) -> dict:
    if name not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {name!r} (known: {', '.join(sorted(ARCHITECTURES))})")
    defaults = _DEFAULTS[name]
    unknown = sorted(set(kwargs) - set(defaults))
    if unknown:
        raise TypeError(f"build_model({name!r}): unknown arguments {unknown} (accepted: {sorted(defaults)})")
    full = {**defaults, **kwargs}
    for key, value in full.items():
        expected = type(defaults[key])
        if expected is int and (isinstance(value, bool) or not isinstance(value, int)):
            raise TypeError(f"build_model({name!r}): {key} must be an int, got {value!r}")
        if expected is bool and not isinstance(value, bool):
            raise TypeError(f"build_model({name!r}): {key} must be a bool, got {value!r}")
        if expected is int and value < 1:
            raise ValueError(f"build_model({name!r}): {key} must be >= 1, got {value}")
    if name == "unet" and full["residual"] and full["in_channels"] != full["out_channels"]:
        raise ValueError(f"build_model('unet'): residual=True needs in_channels == out_channels "
                         f"({full['in_channels']} != {full['out_channels']})")
    return full


Shapes = Iterator[tuple[str, tuple[int, ...]]]
MAX_TENSORS = 100_000  # count_parameters' bound on layers when given a limit (the paper's U-Net has 36 tensors)


def _conv_shapes(name: str, cin: int, cout: int, kernel: int) -> Shapes:
    yield f"{name}.weight", (cout, cin, kernel, kernel)
    yield f"{name}.bias", (cout,)


def _seed_shapes(convs: list[int], ups: list[int], in_channels: int, out_channels: int) -> Shapes:
    index, channels = 0, in_channels  # every layer is followed by an activation: indices 0, 2, 4, ...
    for out in convs:
        yield from _conv_shapes(str(index), channels, out, 2)
        index, channels = index + 2, out
    for out in ups + [out_channels]:
        yield from _conv_shapes(str(index), channels, out, 3)
        index, channels = index + 2, out


def _unet_shapes(in_channels: int, out_channels: int, depth: int, width: int, residual: bool) -> Shapes:
    wide, dec1a, dec1b = 2 * width, max(1, round(width * 4 / 3)), max(1, round(width * 2 / 3))
    yield from _conv_shapes("enc_conv0", in_channels, width, 3)
    for i in range(1, depth + 2):  # enc_conv1 .. enc_conv{depth + 1}
        yield from _conv_shapes(f"enc_conv{i}", width, width, 3)
    channels = width
    for i in range(depth, 1, -1):
        yield from _conv_shapes(f"dec_conv{i}", channels + width, wide, 3)
        yield from _conv_shapes(f"dec_conv{i}b", wide, wide, 3)
        channels = wide
    yield from _conv_shapes("dec_conv1a", channels + in_channels, dec1a, 3)
    yield from _conv_shapes("dec_conv1b", dec1a, dec1b, 3)
    yield from _conv_shapes("dec_conv1", dec1b, out_channels, 3)


def parameter_shapes(name: str, **kwargs) -> Shapes:
    """(state-dict name, shape) of every tensor `build_model(name, **kwargs)` creates, in order.

    Nothing is allocated, and the shapes come one at a time, so a caller comparing them
    with a file's tensors stops at the first difference however large the arguments.
    Raises ValueError / TypeError for what `build_model` would reject (checked at once).
    """
    full = _check_kwargs(name, kwargs)
    if name == "seed":
        return _seed_shapes([full["width"], 2 * full["width"]], [full["width"]], full["in_channels"],
                            full["out_channels"])
    if name == "seed-deep":
        width = full["width"]
        return _seed_shapes([width] * 3 + [2 * width], [2 * width, 2 * width, width], full["in_channels"],
                            full["out_channels"])
    return _unet_shapes(**full)


def count_parameters(name: str, limit: int | None = None, **kwargs) -> int:
    """Number of parameters `build_model(name, **kwargs)` would have, without building it.

    With `limit`, counting stops with a ValueError as soon as the total passes it, or
    the tensors pass `MAX_TENSORS` (so a depth of a billion costs no time either).
    """
    total = 0
    for count, (_, shape) in enumerate(parameter_shapes(name, **kwargs), 1):
        total += math.prod(shape)
        if limit is not None and total > limit:
            raise ValueError(f"{name} with {kwargs} has more than {limit:,} parameters (the limit)")
        if limit is not None and count > MAX_TENSORS:
            raise ValueError(f"{name} with {kwargs} has more than {MAX_TENSORS:,} weight tensors (the limit)")
    return total


def model_config(name: str, **kwargs) -> ModelConfig:
    """The ModelConfig `build_model(name, **kwargs)` would record (defaults filled in), without
    building anything; raises what `build_model` would for bad arguments."""
    return ModelConfig(name, dict(_check_kwargs(name, kwargs)))


def size_multiple(name: str, **kwargs) -> int:
    """What H and W of the input of `build_model(name, **kwargs)` must be a multiple of."""
    return _SIZE_MULTIPLE[name](_check_kwargs(name, kwargs))


def build_model(name: str, *, generator: torch.Generator | None = None, dtype: torch.dtype = torch.float32,
                device=None, **kwargs) -> Module:
    """Build a named architecture; see the module docstring for the names and arguments.

    `generator` drives every random initialization (None: torch's default generator);
    `dtype` and `device` are those of the parameters. The returned model has
    `config` (ModelConfig with all arguments), `size_multiple` and `in_channels`.
    """
    full = _check_kwargs(name, kwargs)
    model = ARCHITECTURES[name](**full, generator=generator, dtype=dtype, device=device)
    object.__setattr__(model, "config", ModelConfig(name, dict(full)))
    object.__setattr__(model, "size_multiple", _SIZE_MULTIPLE[name](full))
    object.__setattr__(model, "in_channels", full["in_channels"])
    return model


__all__ = ["ModelConfig", "UNet", "build_model", "he_normal_", "ARCHITECTURES", "parameter_shapes",
           "count_parameters", "model_config", "size_multiple"]
