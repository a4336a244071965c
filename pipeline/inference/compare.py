"""Before/after strips: the input and its denoised output side by side, as an 8-bit PNG."""
from __future__ import annotations

import io
import re

import torch
from PIL import Image
from torch import Tensor


def compare_strip(before: Tensor, after: Tensor, *, max_height: int = 512) -> Image.Image:
    """An RGB image with `before` on the left and `after` on the right.

    Shape: before, after (C, H, W) in [0, 1], C = 1 or 3 -> a PIL image (2W', H') with
    H' = min(H, max_height) (both scaled down together when H is larger).
    """
    if before.shape != after.shape:
        raise ValueError(f"compare_strip: shapes differ, {tuple(before.shape)} vs {tuple(after.shape)}")
    pair = torch.cat([before, after], dim=2).float().clamp(0, 1)  # (C, H, 2W)
    if pair.shape[0] == 1:
        pair = pair.expand(3, -1, -1)
    array = (pair * 255).round().to(torch.uint8).permute(1, 2, 0).contiguous().numpy()  # (H, 2W, 3)
    image = Image.fromarray(array)  # uint8 (H, 2W, 3) -> RGB
    if image.height > max_height:
        width = max(2, round(image.width * max_height / image.height))
        image = image.resize((width, max_height), Image.Resampling.LANCZOS)
    return image


def compare_png(before: Tensor, after: Tensor, *, max_height: int = 512) -> bytes:
    """The strip of `compare_strip` encoded as PNG bytes."""
    buffer = io.BytesIO()
    compare_strip(before, after, max_height=max_height).save(buffer, format="PNG")
    return buffer.getvalue()


def compare_name(key: str) -> str:
    """A flat file name for the strip of `key` (path separators and odd characters -> '_')."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", key).strip("._") + ".png"
