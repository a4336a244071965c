"""torch.nn twins of the n2n architectures, with identical parameter names.

Tests (as the oracle) and benchmarks (as the peer) build the same network in plain
torch.nn and copy weights between the two by name:

    model = build_model("unet", depth=3, width=8)
    twin = torch_twin(model)              # same config, weights copied, same dtype/device
    # or: twin = build_torch_model("unet", depth=3, width=8)

`TorchUNet` follows NVlabs/noise2noise network.py: 3x3 convs with leaky ReLU 0.1,
2x2 max-pooling, nearest x2 upsampling then concatenation with the skip, linear output.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class TorchUpsampling(nn.Conv2d):
    """Nearest upsampling by `scale_factor`, then this convolution (n2n's `Upsampling`)."""

    def __init__(self, in_channels, out_channels, kernel_size=3, scale_factor=2, stride=1, padding=1, bias=True,
                 **factory):
        super().__init__(in_channels, out_channels, kernel_size, stride=stride, padding=padding, bias=bias, **factory)
        self.scale_factor = scale_factor

    def forward(self, x):
        return super().forward(F.interpolate(x, scale_factor=self.scale_factor, mode="nearest"))


def _torch_seed(convs, ups, in_channels, out_channels, **factory) -> nn.Sequential:
    layers, channels = [], in_channels
    for out in convs:
        layers += [nn.Conv2d(channels, out, 2, stride=2, **factory), nn.ReLU()]
        channels = out
    for i, out in enumerate(ups + [out_channels]):
        layers += [TorchUpsampling(channels, out, **factory), nn.Sigmoid() if i == len(ups) else nn.ReLU()]
        channels = out
    return nn.Sequential(*layers)


def torch_seed(in_channels=3, out_channels=3, width=48, **factory) -> nn.Sequential:
    return _torch_seed([width, 2 * width], [width], in_channels, out_channels, **factory)


def torch_seed_deep(in_channels=3, out_channels=3, width=48, **factory) -> nn.Sequential:
    return _torch_seed([width] * 3 + [2 * width], [2 * width, 2 * width, width], in_channels, out_channels, **factory)


class TorchUNet(nn.Module):
    """The Noise2Noise U-Net in torch.nn; same layer names as n2n_core's UNet."""

    def __init__(self, in_channels=3, out_channels=3, depth=5, width=48, residual=False, **factory):
        super().__init__()
        self.depth, self.residual = depth, residual
        wide, dec1a, dec1b = 2 * width, max(1, round(width * 4 / 3)), max(1, round(width * 2 / 3))

        def conv(name, cin, cout):
            setattr(self, name, nn.Conv2d(cin, cout, 3, padding=1, **factory))

        conv("enc_conv0", in_channels, width)
        for i in range(1, depth + 2):
            conv(f"enc_conv{i}", width, width)
        channels = width
        for i in range(depth, 1, -1):
            conv(f"dec_conv{i}", channels + width, wide)
            conv(f"dec_conv{i}b", wide, wide)
            channels = wide
        conv("dec_conv1a", channels + in_channels, dec1a)
        conv("dec_conv1b", dec1a, dec1b)
        conv("dec_conv1", dec1b, out_channels)

    def forward(self, x):
        def lrelu(name, h):
            return F.leaky_relu(getattr(self, name)(h), 0.1)

        skips = [x]
        h = lrelu("enc_conv0", x)
        for i in range(1, self.depth + 1):
            h = F.max_pool2d(lrelu(f"enc_conv{i}", h), 2)
            if i < self.depth:
                skips.append(h)
        h = lrelu(f"enc_conv{self.depth + 1}", h)
        for i in range(self.depth, 1, -1):
            h = torch.cat((F.interpolate(h, scale_factor=2, mode="nearest"), skips.pop()), dim=1)
            h = lrelu(f"dec_conv{i}b", lrelu(f"dec_conv{i}", h))
        h = torch.cat((F.interpolate(h, scale_factor=2, mode="nearest"), skips.pop()), dim=1)
        h = self.dec_conv1(lrelu("dec_conv1b", lrelu("dec_conv1a", h)))
        return x + h if self.residual else h


TORCH_ARCHITECTURES = {"seed": torch_seed, "seed-deep": torch_seed_deep, "unet": TorchUNet}


def build_torch_model(name: str, *, dtype=torch.float32, device=None, **kwargs) -> nn.Module:
    """The torch.nn twin of `n2n_core.build_model(name, **kwargs)` (torch's default init)."""
    if name not in TORCH_ARCHITECTURES:
        raise ValueError(f"unknown architecture {name!r} (known: {', '.join(sorted(TORCH_ARCHITECTURES))})")
    return TORCH_ARCHITECTURES[name](**kwargs, dtype=dtype, device=device)


def copy_weights(model, twin: nn.Module) -> None:
    """Copy every parameter of an n2n model into the twin's parameter of the same name."""
    ours = model.state_dict()
    theirs = dict(twin.named_parameters())
    if set(ours) != set(theirs):
        raise KeyError(f"parameter names differ: n2n only {sorted(set(ours) - set(theirs))}, "
                       f"torch only {sorted(set(theirs) - set(ours))}")
    with torch.no_grad():
        for name, value in ours.items():
            theirs[name].copy_(value)


def torch_twin(model) -> nn.Module:
    """A torch.nn twin of an n2n model built by build_model, with its weights, dtype and device."""
    p = model.parameters()[0].data
    twin = build_torch_model(model.config.name, dtype=p.dtype, device=p.device, **model.config.kwargs)
    copy_weights(model, twin)
    return twin
