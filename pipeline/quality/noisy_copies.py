"""Noisy copies of clean images, as 8-bit PNG files: test photos with a known noise.

`n2n data noisy CLEAN OUT --noise SPEC` writes, for image i of CLEAN, exactly the 8-bit
input that `n2n evaluate --data CLEAN --noise SPEC --seed S` gives the model for image i
(same spec, seed and index: the same noise), as OUT/<key without extension>.png. With
them, the no-reference tools (`n2n assess`, `n2n denoise --compare`) can be tried on
photos whose clean versions are known, and two models compared on the very same files.

OUT must not exist or be an empty folder: nothing there is ever overwritten. Each file
is written to a temporary name and renamed. Images that fail to decode are reported by
name and left out.
"""
from __future__ import annotations

import os
import posixpath
from typing import Callable

from tqdm import tqdm

from pipeline.data.datasets import open_dataset
from pipeline.data.records import BadRecordError
from pipeline.errors import UsageError
from pipeline.quality.evaluate import add_evaluation_noise
from pipeline.data.images import DEFAULT_MAX_PIXELS, BadImageError, decode_image
from pipeline.inference.outputs import PathEscapeError, safe_relative_path
from pipeline.storage.local_paths import overlap
from pipeline.data.noise import parse_noise
from pipeline.quality.comparison_strips import save_png_atomic, to_pil

Report = Callable[[str, str], None]


def _check_out(data: str, out: str) -> None:
    if os.path.exists(data) and overlap(data, out) is not None:
        raise UsageError(f"OUT {out!r} and CLEAN {data!r} overlap; give a folder outside the clean images")
    if os.path.islink(out):
        raise UsageError(f"OUT {out!r} is a symbolic link; give a new folder")
    if os.path.exists(out) and (not os.path.isdir(out) or os.listdir(out)):
        raise UsageError(f"OUT {out!r} exists and is not an empty folder; noisy copies never overwrite files")


def write_noisy_copies(data: str, out: str, noise: str, *, seed: int = 0, limit: int | None = None,
                       max_pixels: int = DEFAULT_MAX_PIXELS, progress: bool = False,
                       report: Report | None = None) -> int:
    """Write the 8-bit noisy input of each image of `data` (folder or Parquet) as a PNG under `out`.

    Returns the number of files written; `report(name, reason)` gets each image left out.
    """
    try:
        parse_noise(noise)
    except ValueError as e:
        raise UsageError(f"--noise: {e}") from None
    if limit is not None and limit < 1:
        raise UsageError(f"--limit must be at least 1, got {limit}")
    _check_out(data, out)
    try:
        dataset = open_dataset(data)
    except FileNotFoundError:
        raise UsageError(f"CLEAN {data!r}: no such file or folder") from None
    except ValueError as e:
        raise UsageError(str(e)) from None
    count = len(dataset) if limit is None else min(limit, len(dataset))
    written = 0
    for index in tqdm(range(count), desc="noisy copies", unit="img", disable=not progress):
        key = dataset.keys[index]
        try:
            name = posixpath.splitext(safe_relative_path(key))[0] + ".png"
            clean = decode_image(dataset.read(index), key, max_pixels=max_pixels).pixels  # (C, H, W) in [0, 1]
        except (BadRecordError, BadImageError, PathEscapeError, OSError, ValueError) as error:
            if report is not None:  # the reason alone: the report line names the image already
                report(key, getattr(error, "reason", None) or str(error))
            continue
        noisy = add_evaluation_noise(clean, noise, seed, index, clip=True)  # (C, H, W), k / 255
        path = os.path.join(out, *name.split("/"))
        if os.path.lexists(path):  # two keys with one stem (a.jpg, a.png): the second is left out
            if report is not None:
                report(key, f"{name} was already written for another image")
            continue
        save_png_atomic(to_pil(noisy), path)
        written += 1
    return written
