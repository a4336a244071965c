"""Real Noise2Noise pairs from burst shots: a folder of scenes in, a pairs table out.

Two photos of a still scene taken one after the other (a tripod, or a phone's burst)
carry the same clean image under independent noise: exactly the pairs Noise2Noise trains
on, for any noise the camera makes, no clean image needed. The input layout:

    bursts/
      kitchen/   0001.jpg 0002.jpg 0003.jpg 0004.jpg
      window/    a.png b.png

Each scene folder's image files (recursively below it, sorted by name) are paired
consecutively: (1st, 2nd), (3rd, 4th), ...; an odd last shot is left out. A pair becomes
one row of the pairs schema (`pipeline.data.datasets`): `path` = "scene/first-shot-name",
`noisy_a`, `noisy_b` = the two files' bytes as they are (no re-encoding). Shots of one
pair must have the same size and colour (checked by decoding them); pairs that do not,
files that do not decode (and the partner of such a file, named with it), names that are
not UTF-8, and scenes with fewer than two shots are reported and left out.
Shots must be aligned (no camera motion): training does not register them.
"""
from __future__ import annotations

import posixpath
from typing import Callable

from pipeline.data.datasets import open_dataset
from pipeline.data.records import BadRecordError
from pipeline.data.writers import ParquetWriter
from pipeline.data.images import DEFAULT_MAX_PIXELS, BadImageError, decode_codes
from pipeline.storage.names import printable, utf8_problem

Report = Callable[[str, str], None]


def burst_pairs(keys: list[str]) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """Consecutive pairs of shots per scene (the first path component), and (file, reason) left out.

    Keys are relative paths "scene/.../shot.ext"; files directly in the root have no scene.
    """
    scenes: dict[str, list[str]] = {}
    skipped = []
    for key in sorted(keys):
        scene, sep, _ = key.partition("/")
        if not sep:
            skipped.append((key, "not in a scene folder (bursts/SCENE/shot files)"))
            continue
        scenes.setdefault(scene, []).append(key)
    pairs = []
    for scene, shots in scenes.items():
        if len(shots) < 2:
            skipped.append((shots[0] if shots else scene, f"{len(shots)} shot: a pair needs two"))
            continue
        pairs.extend((shots[i], shots[i + 1]) for i in range(0, len(shots) - 1, 2))
        if len(shots) % 2:
            skipped.append((shots[-1], "odd shot out (shots are paired consecutively)"))
    return pairs, skipped


def pack_bursts(folder, out, *, max_pixels: int = DEFAULT_MAX_PIXELS, progress: bool = False,
                report: Report | None = None) -> int:
    """Write the pairs of a burst folder to the Parquet file `out`; returns the number of pairs.

    Raises ValueError (and writes nothing) when no pair could be made."""
    from tqdm import tqdm

    dataset = open_dataset(folder)
    if dataset.kind != "folder":
        raise ValueError(f"{folder}: expected a folder of scene folders with image files, got {dataset.kind}")
    index = {key: i for i, key in enumerate(dataset.keys)}
    pairs, skipped = burst_pairs(dataset.keys)
    for name, reason in skipped:
        if report is not None:
            report(name, reason)
    written = 0
    with ParquetWriter(out, image_columns=("noisy_a", "noisy_b")) as writer:
        for a, b in tqdm(pairs, desc="pairs", unit="pair", disable=not progress):
            shots, problems = [], {}
            for key in (a, b):
                problem = utf8_problem(key)
                try:
                    if problem:
                        raise BadImageError(key, problem)
                    data = dataset.read(index[key])
                    shots.append((data, decode_codes(data, key, max_pixels=max_pixels)[0].shape))
                except (BadRecordError, BadImageError) as e:
                    problems[key] = e.reason
            if problems:  # the bad shot with its reason, and its partner with why it is left out too
                for key, partner in ((a, b), (b, a)):
                    if report is None:
                        break
                    if key in problems:
                        report(key, problems[key])
                    else:
                        report(key, f"left out with its pair: {printable(partner)} cannot be used")
                continue
            mismatch = _mismatch(shots[0][1], shots[1][1])
            if mismatch:
                if report is not None:
                    report(f"{a} + {b}", mismatch)
                continue
            scene = a.partition("/")[0]
            writer.write(f"{scene}/{posixpath.basename(a)}", shots[0][0], shots[1][0])
            written += 1
        if not written:  # raised inside the writer: no empty table is left behind
            raise ValueError(f"{folder}: no pair of same-size shots in any scene folder; nothing to train on")
    return written


def _mismatch(shape_a: tuple, shape_b: tuple) -> str:
    """Why two shots (C, H, W) cannot be a pair ("" when they can): colour first, then size."""
    colour = {1: "grey", 3: "RGB"}
    if shape_a[0] != shape_b[0]:
        return (f"shots differ in colour: {colour.get(shape_a[0], shape_a[0])} vs "
                f"{colour.get(shape_b[0], shape_b[0])} (a pair is one scene shot twice by one camera)")
    if shape_a[1:] != shape_b[1:]:
        return f"shots differ in size: {shape_a[1]}x{shape_a[2]} vs {shape_b[1]}x{shape_b[2]} (H x W)"
    return ""
