"""Where denoised images go: a mirrored folder tree or Parquet part files, written atomically.

Every output is first written under the run's staging folder `OUT/_n2n_tmp/<run>/`
(on the output's own filesystem) and then renamed into place with `os.replace`, so a
reader (or a rerun after a kill) sees either nothing or the complete file. A run
removes stale staging folders when it starts and its own when it ends.

Keys become paths relative to the output root; a key that is absolute or climbs out
of the root (`..`), or that names one of the job's own files, is refused.
"""
from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path, PurePosixPath

import pyarrow as pa
import pyarrow.parquet as pq

STAGING_NAME = "_n2n_tmp"
COMPARE_NAME = "_compare"
RESERVED = {STAGING_NAME, COMPARE_NAME, "_manifest.jsonl"}
PART_PREFIX = "part-"


class PathEscapeError(ValueError):
    """A key that would be written outside the output root."""


def safe_relative_path(key: str) -> str:
    """The key as a normalized relative POSIX path inside the output root.

    Raises:
        PathEscapeError: absolute paths, drive letters, `..` components, empty keys and
            keys naming the job's reserved files.
    """
    text = key.replace("\\", "/")
    if not text or text.startswith("/") or (len(text) > 1 and text[1] == ":"):
        raise PathEscapeError(f"refused {key!r}: absolute path escapes the output root")
    parts = [p for p in PurePosixPath(text).parts if p not in ("", ".")]
    if any(p == ".." for p in parts):
        raise PathEscapeError(f"refused {key!r}: '..' escapes the output root")
    if not parts:
        raise PathEscapeError(f"refused {key!r}: empty path")
    if parts[0] in RESERVED:
        raise PathEscapeError(f"refused {key!r}: {parts[0]} is reserved for the job's own files")
    return "/".join(parts)


def staging_dir(root: str | os.PathLike, run: str) -> Path:
    return Path(root) / STAGING_NAME / run


def open_staging(root: str | os.PathLike, run: str) -> Path:
    """Create the staging folder of `run` (each actor does, once, when it starts) and return it.

    The writers below never create it again. A run removes every staging folder when it
    starts (`clear_staging`), so an actor that outlived its killed driver (Ray reaps
    those within seconds, and they keep working until then) can no longer publish an
    output into a rerun's results: its next write finds no staging folder and fails.
    """
    path = staging_dir(root, run)
    path.mkdir(parents=True, exist_ok=True)
    return path


def clear_staging(root: str | os.PathLike, run: str | None = None) -> None:
    """Remove the staging folder of `run` (or every run's, when run is None)."""
    base = Path(root) / STAGING_NAME
    target = base if run is None else base / run
    shutil.rmtree(target, ignore_errors=True)
    if run is not None and base.is_dir() and not any(base.iterdir()):
        base.rmdir()


def write_atomic(final: Path, data: bytes, staging: Path) -> None:
    """Write data to a temporary file in `staging` (which must exist), then rename it to `final`."""
    tmp = staging / f"{uuid.uuid4().hex}.tmp"
    try:
        with open(tmp, "wb") as f:
            f.write(data)
        final.parent.mkdir(parents=True, exist_ok=True)
        os.replace(tmp, final)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_part_atomic(root: Path, table: pa.Table, staging: Path) -> str:
    """Write a Parquet part file under root atomically (`staging` must exist); returns its name."""
    name = f"{PART_PREFIX}{uuid.uuid4().hex}.parquet"
    tmp = staging / f"{name}.tmp"
    try:
        pq.write_table(table, tmp)
        os.replace(tmp, root / name)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return name


def remove_orphan_parts(root: str | os.PathLike, keep: set[str]) -> list[str]:
    """Delete part files no finished manifest entry refers to (a run killed after the
    rename but before the manifest line); returns their names."""
    removed = []
    for path in sorted(Path(root).glob(f"{PART_PREFIX}*.parquet")):
        if path.name not in keep:
            path.unlink()
            removed.append(path.name)
    return removed
