"""What `Denoiser.denoise` accepts, as (C, H, W) float32 in [0, 1], and the way back.

| input                                   | read as                                   | returned as          |
| --------------------------------------- | ----------------------------------------- | -------------------- |
| numpy (H, W) or (H, W, C)               | uint8 / 255, uint16 / 65535, float as is  | same shape and dtype |
| PIL image: L, LA, RGB, RGBA, I;16, I, F | the same codes (I: 0..65535 as 16-bit)    | same mode            |
| PIL image: 1, P, CMYK, other colours    | converted to L / RGB(A) first             | L / RGB / RGBA       |
| torch (H, W), (C, H, W), (N, C, H, W)   | uint8 / 255, uint16 / 65535, float as is  | same shape, dtype, device |

C is 1 (grey), 2 (grey + alpha), 3 (RGB) or 4 (RGB + alpha); alpha is never denoised and
comes back exactly as given. Floats are taken to be in [0, 1] (what n2n's models are
trained on); integers are rounded back to their codes, floats keep their dtype.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

_SCALES = {np.dtype(np.uint8): 255.0, np.dtype(np.uint16): 65535.0}
_TORCH_SCALES = {torch.uint8: 255.0, torch.uint16: 65535.0}


@dataclass
class Unpacked:
    """An input taken apart: `images` (C, H, W) float32 in [0, 1] (one per batch entry),
    their alpha planes (or None), and `pack` to build the output of the input's kind."""

    images: list
    alphas: list
    pack: object  # callable(list of (C, H, W) float32 tensors) -> output of the input's kind


def _split_alpha(chw: torch.Tensor, what: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    channels = chw.shape[0]
    if chw.shape[1] == 0 or chw.shape[2] == 0:
        raise ValueError(f"{what}: an empty image ({chw.shape[1]} x {chw.shape[2]} pixels)")
    if channels in (1, 3):
        return chw, None
    if channels in (2, 4):
        return chw[:-1], chw[-1:]
    raise ValueError(f"{what}: {channels} channels; n2n denoises 1 (grey) or 3 (RGB), plus an optional alpha")


def _from_numpy(array: np.ndarray) -> Unpacked:
    if array.ndim not in (2, 3):
        raise ValueError(f"numpy image: shape {array.shape}; expected (H, W) or (H, W, C)")
    dtype = array.dtype
    if dtype in _SCALES:
        scale = _SCALES[dtype]
    elif np.issubdtype(dtype, np.floating):
        scale = None
    else:
        raise TypeError(f"numpy image: dtype {dtype}; expected uint8, uint16 or float in [0, 1]")
    hwc = array if array.ndim == 3 else array[:, :, None]
    chw = torch.from_numpy(np.ascontiguousarray(hwc.transpose(2, 0, 1)).astype(np.float32, copy=True))
    if scale is not None:
        chw.div_(scale)
    pixels, alpha = _split_alpha(chw, "numpy image")
    original_alpha = None if alpha is None else hwc[:, :, -1:]

    def pack(outputs):
        out = outputs[0].detach().to("cpu", torch.float32).numpy().transpose(1, 2, 0)  # (H, W, C)
        if scale is not None:
            out = np.rint(np.clip(out, 0.0, 1.0) * scale).astype(dtype)
        else:
            out = out.astype(dtype)
        if original_alpha is not None:
            out = np.concatenate([out, original_alpha], axis=2)
        return out if array.ndim == 3 else out[:, :, 0]

    return Unpacked([pixels], [alpha], pack)


def _from_pil(image) -> Unpacked:
    from PIL import Image

    mode = image.mode
    if mode in ("I;16", "I;16B", "I;16L", "I;16N"):
        array, back = np.asarray(image).astype(np.uint16), "I;16"
    elif mode == "I":
        raw = np.asarray(image)
        if raw.size and (raw.min() < 0 or raw.max() > 65535):
            raise ValueError(f"PIL image: mode I with values outside 0..65535 ({raw.min()}..{raw.max()})")
        array, back = raw.astype(np.uint16), "I"
    elif mode == "F":
        array, back = np.asarray(image).astype(np.float32), "F"
    elif mode in ("L", "LA", "RGB", "RGBA"):
        array, back = np.asarray(image), mode
    elif mode == "1":
        array, back = np.asarray(image.convert("L")), "L"
    elif mode in ("P", "PA") and ("transparency" in image.info or mode == "PA"):
        array, back = np.asarray(image.convert("RGBA")), "RGBA"
    else:
        try:
            array, back = np.asarray(image.convert("RGB")), "RGB"
        except ValueError as e:
            raise ValueError(f"PIL image: mode {mode} cannot be read ({e})") from None
    inner = _from_numpy(array)

    def pack(outputs):
        out = inner.pack(outputs)  # (H, W) or (H, W, C) of the array's dtype
        if back == "I":
            out = out.astype(np.int32)
        image_out = Image.fromarray(out)  # uint8: L, LA, RGB, RGBA; uint16: I;16; int32: I; float32: F
        assert image_out.mode == back, (image_out.mode, back)
        return image_out

    return Unpacked(inner.images, inner.alphas, pack)


def _from_torch(tensor: torch.Tensor) -> Unpacked:
    shape, dtype, device = tuple(tensor.shape), tensor.dtype, tensor.device
    if tensor.dim() not in (2, 3, 4):
        raise ValueError(f"torch image: shape {shape}; expected (H, W), (C, H, W) or (N, C, H, W)")
    if dtype in _TORCH_SCALES:
        scale = _TORCH_SCALES[dtype]
    elif dtype.is_floating_point:
        scale = None
    else:
        raise TypeError(f"torch image: dtype {dtype}; expected uint8, uint16 or float in [0, 1]")
    batch = tensor.detach().reshape((1, 1) + shape if tensor.dim() == 2 else (1,) + shape if tensor.dim() == 3
                                    else shape)  # (N, C, H, W)
    images, alphas = [], []
    for item in batch:
        chw = item.to(torch.float32)
        if scale is not None:
            chw = chw / scale
        pixels, alpha = _split_alpha(chw, "torch image")
        images.append(pixels)
        alphas.append(None if alpha is None else item[-1:])

    def pack(outputs):
        out = []
        for y, alpha in zip(outputs, alphas):
            y = y.to(device)
            y = torch.round(y.clamp(0.0, 1.0) * scale).to(dtype) if scale is not None else y.to(dtype)
            out.append(y if alpha is None else torch.cat([y, alpha], dim=0))
        return torch.stack(out).reshape(shape)

    return Unpacked(images, alphas, pack)


def unpack(image) -> Unpacked:
    """Take an input of any accepted kind apart (see the module docstring)."""
    if isinstance(image, np.ndarray):
        return _from_numpy(image)
    if isinstance(image, torch.Tensor):
        return _from_torch(image)
    try:
        from PIL import Image
    except ImportError:  # pragma: no cover - Pillow is a dependency
        Image = None
    if Image is not None and isinstance(image, Image.Image):
        return _from_pil(image)
    raise TypeError(f"cannot denoise a {type(image).__name__}: give a numpy array, a PIL image or a torch tensor")
