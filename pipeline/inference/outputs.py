"""Where denoised images go: a mirrored folder tree or Parquet part files, written atomically.

Every output is first written under the run's staging folder `OUT/_n2n_tmp/<run>/`
(on the output's own filesystem), its manifest line is appended (see manifest.py),
and then it is renamed into place with `os.replace`: a reader, or a rerun after a
kill, sees either nothing or the complete file, and every file at its final name has
its line. Folders below OUT are entered without following symlinks
(`pipeline.storage.local_paths`), so a link planted inside OUT never carries a write elsewhere.

Staging folders fence off stragglers: the driver creates its run's folder before any
actor starts, actors only open it, and a run starting on an OUT renames every earlier
run's folder (`fence_staging`) before merging its shards and deleting it. An actor of
a killed run that is still working then finds no staging folder and cannot publish.

Keys become paths relative to the output root; a key that is absolute or climbs out
of the root (`..`), holds a NUL, or names one of the job's own files, is refused.
"""
from __future__ import annotations

import errno
import hashlib
import io
import os
import re
import shutil
import stat
import uuid
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.storage.local_paths import open_parent, publish

STAGING_NAME = "_n2n_tmp"
COMPARE_NAME = "_compare"
RESERVED = {STAGING_NAME, COMPARE_NAME, "_manifest.jsonl"}
PART_PREFIX = "part-"
PART_NAME = re.compile(r"part-[0-9a-f]{32}\.parquet")  # the parts n2n writes; no other file is ever deleted
FENCED_SUFFIX = ".fenced"


class PathEscapeError(ValueError):
    """A key that would be written outside the output root."""


@dataclass(frozen=True)
class FileRecord:
    """An output file as written: size, modification time (ns) and SHA-256 of its bytes."""

    size: int
    mtime_ns: int
    sha256: str


def safe_relative_path(key: str) -> str:
    """The key as a normalized relative POSIX path inside the output root: backslashes
    become slashes, empty and "." components go (`x//./y.png` is `x/y.png`).

    Raises:
        PathEscapeError: absolute paths, drive letters, `..` components, NUL characters,
            empty keys and keys naming the job's reserved files.
    """
    text = key.replace("\\", "/")
    if "\0" in text:
        raise PathEscapeError(f"refused {key!r}: a NUL character cannot be in a file name")
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


def is_disk_full(error: BaseException) -> bool:
    return isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT)


# -- staging -----------------------------------------------------------------------------------
def staging_dir(root: str | os.PathLike, run: str) -> Path:
    return Path(root) / STAGING_NAME / run


def create_staging(root: str | os.PathLike, run: str) -> Path:
    """The driver makes its run's staging folder before any actor starts; returns it."""
    base = Path(root) / STAGING_NAME
    if base.is_symlink():
        raise OSError(errno.ELOOP, f"{base} is a symbolic link (n2n never writes through one)")
    base.mkdir(exist_ok=True)
    path = base / run
    path.mkdir()
    return path


def open_staging(root: str | os.PathLike, run: str) -> Path:
    """An actor's view of its run's staging folder, which must exist (the driver made it).

    Never created here: a run removes every earlier staging folder when it starts, so an
    actor that outlived its killed driver (Ray reaps those within seconds, and they keep
    working until then) finds none and cannot publish into a rerun's results.
    """
    path = staging_dir(root, run)
    if not path.is_dir():
        raise FileNotFoundError(errno.ENOENT, f"staging folder {path} is gone: this run was fenced off by a newer one")
    return path


def fence_staging(root: str | os.PathLike) -> list[Path]:
    """Rename every run's staging folder under OUT to `<run>.fenced` (a writer still using
    the old name fails from then on); returns all fenced folders, older ones included."""
    base = Path(root) / STAGING_NAME
    if not base.is_dir() or base.is_symlink():
        return []
    fenced = []
    for path in sorted(base.iterdir()):
        if path.is_symlink() or not path.is_dir():
            continue
        if not path.name.endswith(FENCED_SUFFIX):
            target = path.with_name(f"{path.name}.{uuid.uuid4().hex[:8]}{FENCED_SUFFIX}")
            os.rename(path, target)
            path = target
        fenced.append(path)
    return sorted(set(fenced))


def remove_staging(root: str | os.PathLike, folder: Path | None = None) -> None:
    """Delete one staging folder (its merged shards and temporary files), and the staging
    base when it is left empty; with folder None, only the empty base."""
    if folder is not None:
        shutil.rmtree(folder, ignore_errors=True)
    base = Path(root) / STAGING_NAME
    try:
        base.rmdir()
    except OSError:
        pass  # not empty (another folder left to merge) or absent


# -- writing -----------------------------------------------------------------------------------
def stage(staging: Path, data: bytes, suffix: str = ".tmp") -> tuple[Path, FileRecord]:
    """Write `data` to a new temporary file in `staging` (which must exist); returns its
    path and its record (size, modification time, SHA-256), which a rename keeps."""
    tmp = staging / f"{uuid.uuid4().hex}{suffix}"
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
        with open(fd, "wb") as f:
            f.write(data)
            f.flush()
            info = os.fstat(f.fileno())
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return tmp, FileRecord(info.st_size, info.st_mtime_ns, hashlib.sha256(data).hexdigest())


def write_file(root: Path, target: str, data: bytes, staging: Path, before_publish=None) -> FileRecord:
    """Write `data` to `root/target` atomically, never through a symlink below root.

    `before_publish(record)` runs after the bytes are staged and before the rename (the
    actor appends the output's manifest line there); if it raises, nothing is renamed.
    """
    with open_parent(root, target) as parent:
        tmp, record = stage(staging, data)
        try:
            if before_publish is not None:
                before_publish(record)
            publish(str(tmp), parent)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
    return record


def write_part(root: Path, table: pa.Table, staging: Path, before_publish=None) -> tuple[str, FileRecord]:
    """Write a Parquet part file under root atomically (`staging` must exist); returns its
    name and record. `before_publish(name, record)` as in `write_file`."""
    buffer = io.BytesIO()
    pq.write_table(table, buffer)
    name = f"{PART_PREFIX}{uuid.uuid4().hex}.parquet"
    tmp, record = stage(staging, buffer.getvalue(), ".parquet.tmp")
    try:
        if before_publish is not None:
            before_publish(name, record)
        os.replace(tmp, Path(root) / name)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return name, record


def remove_parts(root: str | os.PathLike, names) -> list[str]:
    """Delete the named part files that n2n wrote (a part name of its own pattern, a
    regular file); returns the names removed. Nothing else is ever deleted."""
    removed = []
    for name in sorted(names):
        if not PART_NAME.fullmatch(name):
            continue
        path = Path(root) / name
        try:
            if stat.S_ISREG(os.lstat(path).st_mode):
                path.unlink()
                removed.append(name)
        except FileNotFoundError:
            continue
    return removed
