"""Import the course's `.pkl` pairs (two uint8 tensors N x 3 x H x W) into the pairs schema.

The course files (`train_data.pkl`: two noisy shots per scene; `val_data.pkl`: noisy and
clean) were written with `torch.save((a, b), path)`. Loading a pickle can run arbitrary
code, so they are read ONLY with `torch.load(path, weights_only=True)`: torch's restricted
unpickler, which rebuilds tensors and plain containers and refuses every other object.
A file that needs anything else is rejected with `PklFormatError`, never executed.

Row i becomes `path` = "000123.png" (zero-padded index), `noisy_a` = PNG of a[i],
`noisy_b` = PNG of b[i] (lossless 8-bit RGB), see `pipeline.data.datasets` for the schema. For
`val_data.pkl` the second column holds the clean image: pass `columns=("noisy", "clean")`
to name it so.
"""
from __future__ import annotations

import io
import os
import re
from typing import Callable

import torch
from PIL import Image

from pipeline.data.writers import ParquetWriter
from pipeline.errors import UserError


class PklFormatError(UserError, ValueError):
    """The file is not (or not safely) a pair of uint8 tensors N x 3 x H x W (exit status 1)."""


def _refusal(name: str, error: Exception) -> str:
    """Why the restricted loader refused `name`, in n2n's words: torch's own message ends with
    advice to load the file with `weights_only=False`, which would run whatever it holds."""
    text = str(error)
    if "Weights only load failed" in text or "weights_only" in text:
        found = re.search(r"GLOBAL ([\w.]+)", text)
        what = f"it asks to run or build {found.group(1)}" if found else "it holds objects other than tensors"
        return (f"{name}: refused: {what}; a course .pkl holds two uint8 tensors and plain containers only, "
                f"and n2n never unpickles anything else")
    first = (text.strip().splitlines() or [type(error).__name__])[0]
    return f"{name}: not a torch-saved pair of tensors ({first})"


def load_pkl_pairs(path) -> tuple[torch.Tensor, torch.Tensor]:
    """Both tensors of a course `.pkl`, safely.

    Shape:
        returns (a, b), each (N, 3, H, W) uint8, the same shape.
    """
    name = os.fspath(path)
    try:
        obj = torch.load(name, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as e:  # UnpicklingError for forbidden globals, RuntimeError for garbage
        raise PklFormatError(_refusal(name, e)) from None
    if not isinstance(obj, (tuple, list)) or len(obj) != 2 or not all(isinstance(t, torch.Tensor) for t in obj):
        raise PklFormatError(f"{name}: expected a tuple of two tensors, got {type(obj).__name__}")
    a, b = obj
    for label, t in (("first", a), ("second", b)):
        if t.dtype != torch.uint8 or t.ndim != 4 or t.shape[1] != 3:
            raise PklFormatError(f"{name}: {label} tensor must be uint8 N x 3 x H x W, got {t.dtype} {tuple(t.shape)}")
    if a.shape != b.shape:
        raise PklFormatError(f"{name}: tensors differ in shape: {tuple(a.shape)} vs {tuple(b.shape)}")
    return a, b


def _png(chw: torch.Tensor) -> bytes:
    out = io.BytesIO()
    Image.fromarray(chw.permute(1, 2, 0).contiguous().numpy()).save(out, format="PNG")  # (3, H, W) -> (H, W, 3)
    return out.getvalue()


def import_pkl(path, out, *, columns: tuple[str, str] = ("noisy_a", "noisy_b"),
               progress: Callable[[int], None] | None = None, **writer_options) -> int:
    """Write the pairs of `path` to the Parquet file `out` (atomically); returns the row count."""
    a, b = load_pkl_pairs(path)
    width = max(6, len(str(len(a))))
    with ParquetWriter(out, image_columns=columns, **writer_options) as w:
        for i in range(len(a)):
            w.write(f"{i:0{width}d}.png", _png(a[i]), _png(b[i]))
            if progress is not None:
                progress(1)
    return len(a)
