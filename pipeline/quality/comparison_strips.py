"""Pictures for people: side-by-side comparison strips saved as PNG.

Used by `n2n evaluate --strip`, `n2n assess --strip` and the noisy copies of `n2n data
noisy`. Pillow only; written to a temporary name and then put in place.

A picture n2n writes carries a PNG text chunk `n2n` (`PICTURE_KEY`), and n2n replaces a
file only if it carries one: `--strip notes.png`, or `--strip photos/a.png` aimed at an
image of the dataset, is refused before anything runs (`check_picture_path`), and the
write itself never replaces a file n2n did not write (`save_png_atomic`), not even one
made meanwhile. A strip inside the dataset being read is refused too: it would be read
as an image by the next run.
"""
from __future__ import annotations

import errno
import os
import stat
from typing import Iterable, Sequence

import torch
from PIL import Image, ImageDraw, PngImagePlugin

CAPTION_HEIGHT = 18
PICTURE_KEY = "n2n"  # PNG text chunk of every picture n2n writes: its mark of ownership


def to_pil(pixels: torch.Tensor) -> Image.Image:
    """(C, H, W) float in [0, 1], C = 1 or 3 -> an 8-bit RGB PIL image."""
    if pixels.dim() != 3 or pixels.shape[0] not in (1, 3):
        raise ValueError(f"to_pil expects (C, H, W) with C = 1 or 3, got {tuple(pixels.shape)}")
    pixels = pixels.detach().float().cpu()
    if pixels.shape[0] == 1:
        pixels = pixels.expand(3, -1, -1)
    array = (pixels.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).contiguous().numpy()
    return Image.fromarray(array, mode="RGB")


def is_n2n_picture(path) -> bool:
    """Whether `path` is a regular file (not a link) holding a PNG that n2n wrote."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return False
    with open(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
            return False
        try:
            with Image.open(f) as image:
                return image.format == "PNG" and PICTURE_KEY in image.info
        except Exception:  # not an image at all
            return False


def check_picture_path(path, option: str, *, inputs: Iterable = ()) -> None:
    """Refuse (UsageError, before anything runs) a picture path n2n may not write: empty, a
    folder, a file n2n did not write (or a link), under a file, or inside one of `inputs`
    (local folders or files the command reads)."""
    from pipeline.errors import UsageError
    from pipeline.storage.local_paths import overlap
    from pipeline.storage.locations import is_uri

    text = os.fspath(path) if path is not None else ""
    if not text:
        raise UsageError(f"{option} must name a PNG file, got {text!r}")
    if os.path.isdir(text) and not os.path.islink(text):
        raise UsageError(f"{option} {text!r} is a folder; name a PNG file")
    for source in inputs:
        if source and not is_uri(source) and os.path.exists(source) and overlap(source, text) in ("same", "b inside a"):
            raise UsageError(f"{option} {text!r} is inside the data {os.fspath(source)!r}: it would replace an input "
                             f"or be read as one from then on; write it elsewhere")
    if os.path.lexists(text) and not is_n2n_picture(text):
        raise UsageError(f"{option} {text!r} exists and n2n did not write it; it is not replaced: choose a new file")
    parent = os.path.dirname(os.path.abspath(text))
    while not os.path.lexists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise UsageError(f"{option} {text!r}: {parent} is a file, not a folder")


def save_png_atomic(image: Image.Image, path: str) -> None:
    """Write `image` as a PNG marked as n2n's at `path`: to a temporary name, then put in place
    without replacing anything but a picture n2n wrote (FileExistsError otherwise)."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    temporary = os.path.join(directory, f".{os.path.basename(path)[:200]}.tmp-{os.getpid()}")
    mark = PngImagePlugin.PngInfo()
    mark.add_text(PICTURE_KEY, "a picture written by n2n")
    image.save(temporary, format="PNG", pnginfo=mark)
    try:
        _put_in_place(temporary, path)
    finally:
        if os.path.lexists(temporary):
            os.unlink(temporary)


def _put_in_place(temporary: str, path: str) -> None:
    try:
        os.link(temporary, path)  # a new name: atomic, and never replaces one made meanwhile
        return
    except FileExistsError:
        pass
    except OSError as error:  # a file system without hard links: check, then rename
        if error.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV):
            raise
        if not os.path.lexists(path):
            os.replace(temporary, path)
            return
    if not is_n2n_picture(path):
        raise FileExistsError(errno.EEXIST, f"{path} exists and n2n did not write it; not replaced")
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
