"""`n2n data`: pack folders into Parquet, unpack them, describe datasets, import course pairs.

    n2n data pack photos/ photos.parquet          # folder -> Parquet (bytes stored as-is)
    n2n data unpack photos.parquet restored/      # Parquet -> folder, same relative paths
    n2n data info photos.parquet [--json]         # counts, sizes, modes, bad files
    n2n data import-pkl train_data.pkl pairs.parquet
    n2n data pairs bursts/ pairs.parquet          # burst shots of still scenes -> training pairs
    n2n data noisy clean/ noisy/ --noise camera   # 8-bit noisy copies (test photos of known noise)

Bad files are reported on stderr as "bad: NAME: REASON", counted in the summary and
skipped; the rest is processed. Every command that writes (`pack`, `unpack`, `pairs`,
`noisy`) exits with status 1 when it left an input out; `info` exits with status 0
(finding bad files is its work). An OUT that is IN, lies inside it or holds it is refused
(exit status 2) before anything is written. The functions `pack`, `unpack` and `info` do
the work and return summaries; the click commands only print them.
"""
from __future__ import annotations

import collections
import dataclasses
import json
import os
import sys
from typing import Callable

import click
from tqdm import tqdm

from pipeline.data.datasets import ImageDataset, is_pairs_table, open_dataset, open_pairs
from pipeline.data.records import BadRecordError
from pipeline.data.writers import FolderWriter, ParquetWriter
from pipeline.errors import UsageError
from pipeline.storage.local_paths import refuse_overlap
from pipeline.storage.locations import is_uri
from pipeline.storage.names import printable, utf8_problem
from pipeline.data.images import DEFAULT_MAX_PIXELS, BadImageError, decode_image
from pipeline.data.pkl_import import import_pkl

Report = Callable[[str, str], None]


@dataclasses.dataclass
class Summary:
    """What a data command did: rows written/seen, and (name, reason) of each bad record."""

    count: int = 0
    bytes: int = 0
    bad: list = dataclasses.field(default_factory=list)
    modes: dict = dataclasses.field(default_factory=dict)
    formats: dict = dataclasses.field(default_factory=dict)
    bit_depths: dict = dataclasses.field(default_factory=dict)
    min_size: tuple | None = None  # (H, W)
    max_size: tuple | None = None
    kind: str = ""
    columns: list = dataclasses.field(default_factory=list)


def _bar(total: int, desc: str, progress: bool):
    return tqdm(total=total, desc=desc, unit="img", disable=not progress, file=sys.stderr, leave=False)


def _report_to(summary: Summary, report: Report | None) -> Report:
    def add(name: str, reason: str) -> None:
        summary.bad.append((name, reason))
        if report is not None:
            report(name, reason)
    return add


def _open(opener, path, **options):
    """open_dataset / open_pairs, with a missing or unusable input as a usage error (exit 2)."""
    try:
        return opener(path, **options)
    except FileNotFoundError:
        raise UsageError(f"{path}: no such file or folder") from None
    except ValueError as e:
        raise UsageError(str(e)) from None


def _exists(path) -> bool:
    return is_uri(path) or os.path.exists(path)


def _check_parquet_out(out, overwrite: bool) -> None:
    """Refuse (exit 2) an OUT that is a folder, or an existing file without `overwrite`."""
    if "://" not in str(out) and os.path.lexists(out):
        if os.path.isdir(out):
            raise UsageError(f"OUT {str(out)!r} is a folder; this command writes one Parquet file")
        if not overwrite:
            raise UsageError(f"OUT {str(out)!r} exists; --overwrite replaces it")


def pack(folder, out, *, check: bool = True, max_pixels: int = DEFAULT_MAX_PIXELS,
         row_group_bytes: int = 64 << 20, row_group_rows: int = 1024, progress: bool = False,
         report: Report | None = None, follow_symlinks: bool = False, overwrite: bool = False) -> Summary:
    """Folder (or any dataset) -> one Parquet file of (path, image). With `check`, files that
    do not decode are reported and left out; the stored bytes are the files' own.
    Symlinked folders are entered only with `follow_symlinks` (each real folder once).
    An existing `out` is replaced only with `overwrite` (a folder never)."""
    _check_parquet_out(out, overwrite)
    if _exists(folder):
        refuse_overlap(folder, out, source_label="FOLDER")
    ds = _open(open_dataset, folder, follow_symlinks=follow_symlinks)
    summary = Summary(kind=ds.kind, columns=["path", "image"])
    bad = _report_to(summary, report)
    for name, reason in ds.problems:  # unlistable folders, FIFOs and broken links named like images
        bad(name, reason)
    with ParquetWriter(out, row_group_bytes=row_group_bytes, row_group_rows=row_group_rows) as w, \
            _bar(len(ds), "pack", progress) as bar:
        for i in range(len(ds)):
            bar.update(1)
            problem = utf8_problem(ds.key(i))
            if problem:
                bad(ds.name(i), problem)
                continue
            try:
                data = ds.read(i)
                if check:
                    decode_image(data, ds.name(i), max_pixels=max_pixels)
            except (BadRecordError, BadImageError) as e:
                bad(e.name, e.reason)
                continue
            w.write(ds.key(i), data)
            summary.count += 1
            summary.bytes += len(data)
    return summary


def _unwritable_keys(ds: ImageDataset) -> dict[int, str]:
    """Rows that cannot be unpacked whatever their bytes: {row: reason} for null keys and
    for every row of a key that appears more than once (which of them is meant is unknown,
    so none is written)."""
    rows_of = collections.defaultdict(list)
    refused = {}
    for i in range(len(ds)):
        if ds.is_null_key(i):
            refused[i] = "null key: no file name"
        else:
            rows_of[ds.key(i)].append(i)
    for key, rows in rows_of.items():
        if len(rows) > 1:
            for i in rows:
                refused[i] = f"key {key!r} appears {len(rows)} times (rows {', '.join(map(str, rows[:5]))}); none written"
    return refused


def unpack(table, folder, *, overwrite: bool = False, progress: bool = False, report: Report | None = None) -> Summary:
    """Parquet -> folder, files named by the `path` column. A pairs table goes to
    FOLDER/noisy_a/... and FOLDER/noisy_b/...

    Every row has its own outcome, and a bad row never stops the others: unreadable rows,
    null, unsafe or duplicate keys, and write errors (a name too long, a file where a
    folder is needed, a symlink inside FOLDER) are reported by name. An existing file is
    kept: one with the same bytes counts as unpacked, one with other bytes is reported,
    unless `overwrite`."""
    if not _exists(table):
        raise UsageError(f"{table}: no such file or folder")
    refuse_overlap(table, folder, source_label="PARQUET", output_label="FOLDER")
    if is_pairs_table(table):
        pairs = _open(open_pairs, table)
        parts = [(pairs.a, f"{folder}/noisy_a"), (pairs.b, f"{folder}/noisy_b")]
    else:
        ds = _open(open_dataset, table)
        parts = [(ds, folder)]
    summary = Summary(kind="parquet", columns=[p[0].image_column for p in parts])
    bad = _report_to(summary, report)
    for name, reason in parts[0][0].problems:
        bad(name, reason)
    refused = _unwritable_keys(parts[0][0])
    for ds, target in parts:
        writer = FolderWriter(target, replace=overwrite)
        with _bar(len(ds), f"unpack {ds.image_column}", progress) as bar:
            for i in range(len(ds)):
                bar.update(1)
                if i in refused:
                    bad(ds.name(i), refused[i])
                    continue
                try:
                    data = ds.read(i)
                    writer.write(ds.key(i), data)
                except BadRecordError as e:
                    bad(e.name, e.reason)
                    continue
                except OSError as e:  # name too long, a file in the way, a symlink, disk full...
                    bad(ds.name(i), f"cannot write: {e.strerror or e}")
                    continue
                except ValueError as e:  # unsafe key
                    bad(ds.name(i), str(e))
                    continue
                summary.count += 1
                summary.bytes += len(data)
    return summary


def _describe(ds: ImageDataset, summary: Summary, bad: Report, decode: bool, max_pixels: int, bar) -> list:
    sizes = []
    modes, formats, depths = (collections.Counter() for _ in range(3))
    for i in range(len(ds)):
        bar.update(1)
        try:
            data = ds.read(i)
            summary.bytes += len(data)
            if decode:
                img = decode_image(data, ds.name(i), max_pixels=max_pixels)
                sizes.append(img.size)
                modes[img.mode] += 1
                formats[img.format] += 1
                depths[str(img.bit_depth)] += 1
            else:
                sizes.append(None)
        except (BadRecordError, BadImageError) as e:
            bad(e.name, e.reason)
            sizes.append(False)
            continue
        summary.count += 1
    for target, counter in ((summary.modes, modes), (summary.formats, formats), (summary.bit_depths, depths)):
        for k, v in counter.items():
            target[k] = target.get(k, 0) + v
    good = [s for s in sizes if s]
    if good:
        summary.min_size = tuple(min(s[k] for s in good) for k in range(2))
        summary.max_size = tuple(max(s[k] for s in good) for k in range(2))
    return sizes


def info(path, *, decode: bool = True, max_pixels: int = DEFAULT_MAX_PIXELS, progress: bool = False,
         report: Report | None = None, follow_symlinks: bool = False) -> Summary:
    """Counts, bytes, modes, formats, bit depths, size range and bad records of a dataset.
    For a pairs table both columns are checked, and pairs whose members differ in size are bad."""
    summary = Summary()
    bad = _report_to(summary, report)
    if not _exists(path):
        raise UsageError(f"{path}: no such file or folder")
    if is_pairs_table(path):
        pairs = _open(open_pairs, path)
        summary.kind, summary.columns = "parquet pairs", ["path", "noisy_a", "noisy_b"]
        for name, reason in pairs.a.problems:
            bad(name, reason)
        with _bar(2 * len(pairs), "info", progress) as bar:
            size_a = _describe(pairs.a, summary, bad, decode, max_pixels, bar)
            size_b = _describe(pairs.b, summary, bad, decode, max_pixels, bar)
        for i, (sa, sb) in enumerate(zip(size_a, size_b)):
            if decode and sa and sb and sa != sb:
                bad(pairs.a.name(i), f"pair members differ in size: {sa} vs {sb}")
        summary.count = sum(1 for sa, sb in zip(size_a, size_b) if sa is not False and sb is not False
                            and (not decode or sa == sb))
        return summary
    ds = _open(open_dataset, path, follow_symlinks=follow_symlinks)
    summary.kind = ds.kind
    summary.columns = ["path", ds.image_column] if ds.kind == "parquet" else []
    for name, reason in ds.problems:
        bad(name, reason)
    with _bar(len(ds), "info", progress) as bar:
        _describe(ds, summary, bad, decode, max_pixels, bar)
    return summary


# ----------------------------------------------------------------------------- click
def _finish(message: str, left_out) -> None:
    """Print the command's one summary line; exit status 1 when anything was left out (`left_out` non-empty)."""
    click.echo(message)
    if left_out:
        sys.exit(1)


def _echo_bad(name: str, reason: str) -> None:
    tqdm.write(f"bad: {printable(name)}: {reason}", file=sys.stderr)


# Options that several `n2n data` commands share, declared once.
progress_option = click.option("--progress/--no-progress", default=True, show_default=True,
                               help="Progress bar on stderr.")
max_pixels_option = click.option("--max-pixels", type=int, default=DEFAULT_MAX_PIXELS, show_default=True,
                                 help="Largest accepted width x height (decompression-bomb guard).")
replace_out_option = click.option("--overwrite", is_flag=True, help="Replace OUT if it exists (default: refuse).")
follow_symlinks_option = click.option("--follow-symlinks", is_flag=True,
                                      help="Enter symlinked folders too (each real folder once).")


@click.group("data")
def data() -> None:
    """Image datasets: pack folders into Parquet, unpack, describe, import course pairs."""


@data.command("pack")
@click.argument("folder")
@click.argument("out")
@click.option("--check/--no-check", default=True, show_default=True,
              help="Decode every file and leave out the ones that fail.")
@max_pixels_option
@click.option("--row-group-mb", type=float, default=64, show_default=True, help="Row-group size bound in MiB.")
@click.option("--row-group-rows", type=int, default=1024, show_default=True, help="Row-group row-count bound.")
@follow_symlinks_option
@replace_out_option
@progress_option
def pack_command(folder, out, check, max_pixels, row_group_mb, row_group_rows, follow_symlinks, overwrite, progress):
    """Pack the images under FOLDER (recursive) into the Parquet file OUT (path, image)."""
    s = pack(folder, out, check=check, max_pixels=max_pixels, row_group_bytes=int(row_group_mb * (1 << 20)),
             row_group_rows=row_group_rows, progress=progress, report=_echo_bad, follow_symlinks=follow_symlinks,
             overwrite=overwrite)
    _finish(f"packed {s.count} images ({s.bytes} bytes), skipped {len(s.bad)} bad -> {out}",
            left_out=s.bad)


@data.command("pairs")
@click.argument("bursts")
@click.argument("out")
@max_pixels_option
@replace_out_option
@progress_option
def pairs_command(bursts, out, max_pixels, overwrite, progress):
    """Real Noise2Noise pairs from burst shots: BURSTS/SCENE/shot files -> the pairs table OUT.

    Shots of a still scene (tripod, no motion) taken one after the other are paired
    consecutively within each scene folder, sorted by name; `n2n train --data OUT`
    then learns the camera's own noise. Unpairable shots are reported and left out."""
    from pipeline.data.bursts import pack_bursts

    _check_parquet_out(out, overwrite)
    if not os.path.isdir(bursts):
        raise UsageError(f"BURSTS {bursts!r}: no such folder (expected BURSTS/SCENE/shot files)")
    refuse_overlap(bursts, out, source_label="BURSTS")
    left_out = Summary()
    report = _report_to(left_out, _echo_bad)
    try:
        count = pack_bursts(bursts, out, max_pixels=max_pixels, progress=progress, report=report)
    except ValueError as e:
        raise UsageError(f"BURSTS {e}") from None
    _finish(f"wrote {count} pairs, left out {len(left_out.bad)} -> {out}",
            left_out=left_out.bad)


@data.command("noisy")
@click.argument("clean")
@click.argument("out")
@click.option("--noise", default="gaussian:25", show_default=True,
              help="Noise spec (see n2n evaluate), e.g. camera, 'camera,jpeg=60-95', gaussian:25.")
@click.option("--seed", type=int, default=0, show_default=True, help="Noise seed (as n2n evaluate --seed).")
@click.option("--limit", type=click.IntRange(min=1), default=None, help="Only the first N images.")
@progress_option
def noisy_command(clean, out, noise, seed, limit, progress):
    """Write 8-bit noisy copies of the CLEAN images into the new folder OUT, as PNG.

    Image i gets exactly the 8-bit input `n2n evaluate --noise NOISE --seed SEED` gives
    the model for it: test photos of known noise for `n2n assess` and `n2n denoise`."""
    from pipeline.quality.noisy_copies import write_noisy_copies

    left_out = Summary()
    report = _report_to(left_out, _echo_bad)
    count = write_noisy_copies(clean, out, noise, seed=seed, limit=limit, progress=progress, report=report)
    _finish(f"wrote {count} noisy copies ({noise}, seed {seed}), left out {len(left_out.bad)} -> {out}",
            left_out=left_out.bad)


@data.command("unpack")
@click.argument("parquet")
@click.argument("folder")
@click.option("--overwrite", is_flag=True, help="Replace existing files whose bytes differ (default: keep them, report the row).")
@progress_option
def unpack_command(parquet, folder, overwrite, progress):
    """Write the images of PARQUET (file or folder of files) under FOLDER, named by `path`.

    Every row is written or reported (bad: NAME: REASON) on its own; existing files are
    kept unless --overwrite."""
    s = unpack(parquet, folder, overwrite=overwrite, progress=progress, report=_echo_bad)
    _finish(f"unpacked {s.count} files ({s.bytes} bytes), skipped {len(s.bad)} bad -> {folder}",
            left_out=s.bad)


@data.command("info")
@click.argument("path")
@click.option("--decode/--no-decode", default=True, show_default=True,
              help="Decode every image (modes, sizes, bad files) or only read the bytes.")
@max_pixels_option
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@follow_symlinks_option
@progress_option
def info_command(path, decode, max_pixels, as_json, follow_symlinks, progress):
    """Describe the folder or Parquet dataset PATH: counts, sizes, modes, bad files."""
    s = info(path, decode=decode, max_pixels=max_pixels, progress=progress, report=None if as_json else _echo_bad,
             follow_symlinks=follow_symlinks)
    if as_json:
        d = dataclasses.asdict(s)
        d["bad"] = [{"name": n, "reason": r} for n, r in s.bad]
        click.echo(json.dumps(d, indent=1))
        return
    click.echo(f"{path}: {s.kind}, {s.count} good images, {len(s.bad)} bad, {s.bytes} bytes")
    if s.columns:
        click.echo(f"  columns: {', '.join(s.columns)}")
    if s.modes:
        click.echo(f"  modes: {dict(s.modes)}  formats: {dict(s.formats)}  bit depths: {dict(s.bit_depths)}")
    if s.min_size:
        click.echo(f"  size (H x W): {s.min_size[0]}x{s.min_size[1]} .. {s.max_size[0]}x{s.max_size[1]}")


@data.command("import-pkl")
@click.argument("pkl")
@click.argument("out")
@click.option("--columns", default="noisy_a,noisy_b", show_default=True,
              help="Names of the two image columns (e.g. noisy,clean for val_data.pkl).")
@replace_out_option
@progress_option
def import_pkl_command(pkl, out, columns, overwrite, progress):
    """Import a course .pkl (two uint8 tensors N x 3 x H x W, loaded with torch.load(weights_only=True),
    never a plain unpickler) into the Parquet pairs file OUT."""
    names = tuple(c.strip() for c in columns.split(","))
    if len(names) != 2:
        raise click.BadParameter("give two column names, e.g. noisy_a,noisy_b", param_hint="--columns")
    if not os.path.exists(pkl):
        raise UsageError(f"PKL {pkl!r}: no such file")
    _check_parquet_out(out, overwrite)
    refuse_overlap(pkl, out, source_label="PKL")
    with tqdm(desc="import-pkl", unit="pair", disable=not progress, file=sys.stderr, leave=False) as bar:
        n = import_pkl(pkl, out, columns=names, progress=bar.update)
    click.echo(f"imported {n} pairs -> {out}")
