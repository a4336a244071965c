"""Pictures for people: side-by-side comparison strips saved as PNG.

Used by `n2n evaluate --strip`, the denoise job's `--compare`, training's end-of-run
picture and the demo report. Pillow only; written to a temporary name and renamed.
"""
from __future__ import annotations

import os
from typing import Sequence

import torch
from PIL import Image, ImageDraw

CAPTION_HEIGHT = 18


def to_pil(pixels: torch.Tensor) -> Image.Image:
    """(C, H, W) float in [0, 1], C = 1 or 3 -> an 8-bit RGB PIL image."""
    if pixels.dim() != 3 or pixels.shape[0] not in (1, 3):
        raise ValueError(f"to_pil expects (C, H, W) with C = 1 or 3, got {tuple(pixels.shape)}")
    pixels = pixels.detach().float().cpu()
    if pixels.shape[0] == 1:
        pixels = pixels.expand(3, -1, -1)
    array = (pixels.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).contiguous().numpy()
    return Image.fromarray(array, mode="RGB")


def save_png_atomic(image: Image.Image, path: str) -> None:
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    temporary = os.path.join(directory, f".{os.path.basename(path)}.tmp-{os.getpid()}")
    image.save(temporary, format="PNG")
    os.replace(temporary, path)


def comparison_strip(
    rows: Sequence[Sequence[torch.Tensor]],
    captions: Sequence[str],
    path: str | None,
    *,
    height: int = 256,
    gap: int = 4,
) -> Image.Image:
    """Each row: panels of (C, H, W) images side by side, scaled to `height`, with a caption.

    Returns the picture; saves it as PNG at `path` when given.
    """
    if len(rows) != len(captions):
        raise ValueError(f"{len(rows)} rows but {len(captions)} captions")
    rendered = []
    for panels in rows:
        images = [to_pil(p) for p in panels]
        scaled = [im.resize((max(1, round(im.width * height / im.height)), height), Image.LANCZOS) for im in images]
        rendered.append(scaled)
    width = max(sum(im.width for im in row) + gap * (len(row) - 1) for row in rendered)
    total_height = sum(height + CAPTION_HEIGHT + gap for _ in rendered)
    canvas = Image.new("RGB", (width, total_height), "white")
    draw = ImageDraw.Draw(canvas)
    y = 0
    for row, caption in zip(rendered, captions):
        draw.text((2, y + 3), caption, fill="black")
        x = 0
        for image in row:
            canvas.paste(image, (x, y + CAPTION_HEIGHT))
            x += image.width + gap
        y += height + CAPTION_HEIGHT + gap
    if path:
        save_png_atomic(canvas, path)
    return canvas
