"""n2n denoisers in plain torch.nn: the architectures, their weights file, and denoising.

This one file needs nothing but torch and Python's standard library. `n2n export MODEL
OUT --format torch` copies it unchanged into OUT as `n2n_model.py`, beside the model's
weights `n2n_model.safetensors`; inside n2n it is also the torch.nn twin of every
n2n_core architecture, which the tests (the autograd oracle) and the benchmarks (the
peer) build with the same parameter names and copy weights into.

    from n2n_model import load, denoise
    model = load("n2n_model.safetensors")   # a torch.nn.Module in eval mode
    clean = denoise(model, noisy)           # (N, C, H, W) float in [0, 1], any H and W

The networks (as NVlabs/noise2noise network.py):
- "unet" (`TorchUNet`): 3x3 convolutions with leaky ReLU 0.1, 2x2 max-pooling, nearest
  x2 upsampling then concatenation with the skip, a linear output layer, and with
  `residual` the input added to the output.
- "seed" and "seed-deep" (`torch_seed`, `torch_seed_deep`): stride-2 2x2 convolutions
  with ReLU, then nearest x2 upsampling + 3x3 convolution, a sigmoid at the end.
A model's input height and width must be multiples of `model.size_multiple`
(2^depth for the U-Net, 4 and 16 for the seeds); `denoise` pads any image the way n2n
does (reflection at the bottom and right, cropped back after the network).

The weights file is a standard safetensors file (readable by `safetensors.torch.load_file`
too): the state dict of the module, and in its metadata "n2n_architecture", a JSON
{"name": ..., "kwargs": {...}} that rebuilds the module (`load` reads it with the small
reader below, so torch alone suffices).
"""
from __future__ import annotations

import json
import struct
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

ARCHITECTURE_KEY = "n2n_architecture"  # safetensors metadata: JSON {"name": ..., "kwargs": {...}}


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
    model = nn.Sequential(*layers)
    model.size_multiple = 2 ** len(convs)
    return model


def torch_seed(in_channels=3, out_channels=3, width=48, **factory) -> nn.Sequential:
    """n2n's "seed": (N, in, H, W) -> (N, out, 4 floor(H/4), 4 floor(W/4))."""
    return _torch_seed([width, 2 * width], [width], in_channels, out_channels, **factory)


def torch_seed_deep(in_channels=3, out_channels=3, width=48, **factory) -> nn.Sequential:
    """n2n's "seed-deep": (N, in, H, W) -> (N, out, 16 floor(H/16), 16 floor(W/16))."""
    return _torch_seed([width] * 3 + [2 * width], [2 * width, 2 * width, width], in_channels, out_channels, **factory)


class TorchUNet(nn.Module):
    """The Noise2Noise U-Net in torch.nn; the same layer names as n2n_core's UNet.

    Shape: (N, in_channels, H, W) -> (N, out_channels, H, W), H and W multiples of 2^depth.
    """

    def __init__(self, in_channels=3, out_channels=3, depth=5, width=48, residual=False, **factory):
        super().__init__()
        self.depth, self.residual = depth, residual
        self.size_multiple = 2**depth
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
            h = F.max_pool2d(lrelu(f"enc_conv{i}", h), 2)  # (N, width, H/2^i, W/2^i)
            if i < self.depth:
                skips.append(h)
        h = lrelu(f"enc_conv{self.depth + 1}", h)
        for i in range(self.depth, 1, -1):
            h = torch.cat((F.interpolate(h, scale_factor=2, mode="nearest"), skips.pop()), dim=1)
            h = lrelu(f"dec_conv{i}b", lrelu(f"dec_conv{i}", h))
        h = torch.cat((F.interpolate(h, scale_factor=2, mode="nearest"), skips.pop()), dim=1)
        h = self.dec_conv1(lrelu("dec_conv1b", lrelu("dec_conv1a", h)))  # linear output
        return x + h if self.residual else h


TORCH_ARCHITECTURES = {"seed": torch_seed, "seed-deep": torch_seed_deep, "unet": TorchUNet}


def build_torch_model(name: str, *, dtype=torch.float32, device=None, **kwargs) -> nn.Module:
    """The torch.nn module of architecture `name` (torch's default initialization);
    `kwargs` are those of `n2n_core.build_model(name, **kwargs)`."""
    if name not in TORCH_ARCHITECTURES:
        raise ValueError(f"unknown architecture {name!r} (known: {', '.join(sorted(TORCH_ARCHITECTURES))})")
    return TORCH_ARCHITECTURES[name](**kwargs, dtype=dtype, device=device)


# -- the weights file ---------------------------------------------------------------------
_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


def read_safetensors(path) -> tuple[dict, dict]:
    """(tensors by name, metadata) of a safetensors file of floating-point tensors."""
    data = Path(path).read_bytes()
    if len(data) < 8:
        raise ValueError(f"{path}: not a safetensors file (too short)")
    (size,) = struct.unpack("<Q", data[:8])
    if 8 + size > len(data):
        raise ValueError(f"{path}: not a safetensors file (header runs past the end)")
    header = json.loads(data[8:8 + size].decode("utf-8"))
    metadata = header.pop("__metadata__", None) or {}
    body = memoryview(data)[8 + size:]
    tensors = {}
    for name, entry in header.items():
        if entry["dtype"] not in _DTYPES:
            raise ValueError(f"{path}: tensor {name!r} has dtype {entry['dtype']}, not a float type")
        begin, end = entry["data_offsets"]
        if not 0 <= begin <= end <= len(body):
            raise ValueError(f"{path}: tensor {name!r} lies outside the file")
        flat = torch.frombuffer(bytearray(body[begin:end]), dtype=_DTYPES[entry["dtype"]]) if end > begin \
            else torch.empty(0, dtype=_DTYPES[entry["dtype"]])
        tensors[name] = flat.reshape(entry["shape"])
    return tensors, metadata


def load(path=None, device="cpu") -> nn.Module:
    """The module saved in `path` (default: n2n_model.safetensors beside this file), weights
    loaded strictly, in eval mode, on `device`."""
    path = Path(__file__).with_suffix(".safetensors") if path is None else Path(path)
    tensors, metadata = read_safetensors(path)
    if ARCHITECTURE_KEY not in metadata:
        raise ValueError(f"{path}: no {ARCHITECTURE_KEY!r} in its metadata (not written by n2n export)")
    architecture = json.loads(metadata[ARCHITECTURE_KEY])
    dtype = next(iter(tensors.values())).dtype
    model = build_torch_model(architecture["name"], dtype=dtype, **architecture["kwargs"])
    model.load_state_dict(tensors, strict=True)
    return model.to(device).eval()


# -- denoising images of any size ----------------------------------------------------------
def _reflect_indices(size: int, total: int, device) -> torch.Tensor:
    """0..total-1 folded into 0..size-1 by reflection (edge not repeated), as often as needed."""
    index = torch.arange(total, device=device)
    if size == 1:
        return torch.zeros_like(index)
    period = 2 * (size - 1)
    index = index % period
    return torch.where(index < size, index, period - index)


def pad_to_multiple(x: torch.Tensor, multiple: int) -> torch.Tensor:
    """Reflect-pad x (N, C, H, W) at the bottom and right to the next multiple of `multiple`."""
    height, width = x.shape[-2:]
    to_h, to_w = -(-height // multiple) * multiple, -(-width // multiple) * multiple
    if to_h > height:
        x = x.index_select(2, _reflect_indices(height, to_h, x.device))
    if to_w > width:
        x = x.index_select(3, _reflect_indices(width, to_w, x.device))
    return x


@torch.no_grad()
def denoise(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The model's output for x (N, C, H, W) float in [0, 1] of any H and W, clipped to [0, 1].

    x is padded to the model's size multiple by reflection and the output cropped back,
    exactly as n2n does, so the result equals `n2n denoise` without tiling.
    """
    height, width = x.shape[-2:]
    parameter = next(model.parameters())
    y = model(pad_to_multiple(x.to(device=parameter.device, dtype=parameter.dtype), model.size_multiple))
    return y[:, :, :height, :width].clamp(0.0, 1.0).to(device=x.device, dtype=x.dtype)
