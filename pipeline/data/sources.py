"""Where a dataset's records come from: the image files under a folder, or the rows of Parquet files.

`open_source(path_or_uri)` picks the source:
- a single image file: a source of one record keyed by its file name;
- a folder: every file with an image extension (`IMAGE_EXTENSIONS`, any case) found
  recursively, hidden files and folders skipped; keys are the relative POSIX paths
  ("sub/dir/a.png"), sorted, so the order is stable across machines. On the local file
  system, symlinked folders are not followed unless `follow_symlinks=True`, and then
  every real folder is entered once (a link loop adds nothing); symlinked files are
  read through; FIFOs, devices and broken links with an image extension are listed in
  `problems`, never read;
- one Parquet file, or a folder of `*.parquet` files (read in sorted name order; a folder
  holding any `*.parquet` file is read as Parquet).
Paths may be local or any URI that `pyarrow.fs` resolves (`file://`, `s3://`, `gs://`, ...).

A source reads record j's bytes (`read(j, column)`), names it for errors (`name(j, column)`)
and lists its `keys` and `problems`; `ImageDataset` (`pipeline.data.datasets`) wraps one with
a range of rows. A Parquet source reads whole row groups and keeps a bounded cache of them
(`cache_bytes`); it pickles without that cache.
"""
from __future__ import annotations

import collections
import os
import posixpath

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from pipeline.data.records import BadRecordError, key_text
from pipeline.storage.local_paths import read_regular_file, read_regular_file_stat, walk_files
from pipeline.storage.locations import resolve

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".gif", ".webp", ".ppm", ".pgm", ".pnm")


def _is_image_name(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS)


class FolderSource:
    """Files under a root; read(j) -> bytes of the j-th file."""

    kind = "folder"
    null_rows: frozenset = frozenset()

    def __init__(self, fs: pafs.FileSystem, root: str, only: str | None = None, follow_symlinks: bool = False,
                 exclude: tuple = ()):
        self.fs, self.root = fs, root.rstrip("/")
        self.local = isinstance(fs, pafs.LocalFileSystem)
        self.problems: list[tuple[str, str]] = []
        if only is not None:  # a single image file: its folder, one key
            self.keys = [only]
            return
        if self.local:  # our own walk: pyarrow's follows folder links (a loop 40 levels deep)
            self.keys, self.problems = walk_files(self.root, want=_is_image_name, follow_symlinks=follow_symlinks,
                                                  exclude=exclude)
            return
        infos = fs.get_file_info(pafs.FileSelector(self.root, recursive=True))
        keys = []
        self._listed: dict[str, dict] = {}  # object store: key -> its stamp, from this one listing
        for info in infos:
            if info.type != pafs.FileType.File:
                continue
            rel = posixpath.relpath(info.path, self.root)
            if any(part.startswith(".") for part in rel.split("/")):
                continue
            if rel.lower().endswith(IMAGE_EXTENSIONS):
                keys.append(rel)
                self._listed[rel] = _stamp(info.size, info.mtime_ns)
        self.keys = sorted(keys)

    def name(self, j: int, column: str) -> str:
        return self.keys[j]

    def stamp(self, j: int) -> dict | None:
        """What identifies the j-th file's content now: its size and modification time (None
        when it cannot be told, e.g. the file is gone)."""
        key = self.keys[j]
        if not self.local:
            listed = getattr(self, "_listed", {}).get(key)
            if listed is not None:
                return listed
            try:
                info = self.fs.get_file_info(self.root + "/" + key)
            except OSError:
                return None
            return _stamp(info.size, info.mtime_ns) if info.type == pafs.FileType.File else None
        try:
            info = os.stat(self.root + "/" + key)
        except OSError:
            return None
        return _stamp(info.st_size, info.st_mtime_ns)

    def read_stamped(self, j: int, column: str) -> tuple[bytes, dict | None]:
        """`read`, and the stamp of exactly what was read (local: the open file's status)."""
        key = self.keys[j]
        if not self.local:
            try:
                info = self.fs.get_file_info(self.root + "/" + key)
            except OSError as e:
                raise BadRecordError(key, f"cannot read file: {e}") from None
            return self.read(j, column), _stamp(info.size, info.mtime_ns)
        try:
            data, info = read_regular_file_stat(self.root + "/" + key)
        except OSError as e:
            raise BadRecordError(key, f"cannot read file: {e.strerror or e}") from None
        return data, _stamp(info.st_size, info.st_mtime_ns)

    def read(self, j: int, column: str) -> bytes:
        key = self.keys[j]
        try:
            if self.local:  # never blocks on a FIFO nor reads a device put there after listing
                return read_regular_file(self.root + "/" + key)
            with self.fs.open_input_stream(self.root + "/" + key) as f:  # one GET on an object store
                return f.read()
        except OSError as e:
            raise BadRecordError(key, f"cannot read file: {e.strerror or e}") from None


def _stamp(size, mtime_ns) -> dict | None:
    return None if size is None or mtime_ns is None else {"size": int(size), "mtime_ns": int(mtime_ns)}


class ParquetSource:
    """Rows of one or more Parquet files; row j lives in (file, row group, offset)."""

    kind = "parquet"

    def __init__(self, fs: pafs.FileSystem, files: list[str], key_column: str, cache_bytes: int):
        self.fs = fs
        self.key_column = key_column
        self.cache_bytes = cache_bytes
        self.files: list[str] = []
        self.schema: pa.Schema | None = None
        self.problems: list[tuple[str, str]] = []
        self.keys: list[str] = []
        self.null_rows: set[int] = set()  # rows whose key is null (their key reads "")
        self._where: list[tuple[int, int, int]] = []  # row j -> (file index, row group, offset)
        self._rg_starts: list[list[int]] = []  # file index -> first row (in the file) of each row group
        self._cache: collections.OrderedDict = collections.OrderedDict()
        self._cached = 0
        self.total_bytes = 0  # uncompressed size of every row group, from the files' metadata
        for path in files:
            try:
                meta_file = pq.ParquetFile(path, filesystem=fs)
                if key_column not in meta_file.schema_arrow.names:
                    raise ValueError(f"no {key_column!r} column (columns: {meta_file.schema_arrow.names})")
                fi = len(self.files)
                keys, where, starts, nulls = [], [], [], []
                for rg in range(meta_file.num_row_groups):
                    starts.append(len(keys))
                    col = meta_file.read_row_group(rg, columns=[key_column]).column(0)
                    for k in col.to_pylist():
                        if k is None:
                            nulls.append(len(self.keys) + len(keys))
                        keys.append(key_text(k))
                    where.extend((fi, rg, r) for r in range(col.length()))
            except Exception as e:  # an unreadable file is reported and skipped
                self.problems.append((path, f"unreadable Parquet file: {e}"))
                continue
            self.files.append(path)
            self.total_bytes += sum(meta_file.metadata.row_group(rg).total_byte_size
                                    for rg in range(meta_file.num_row_groups))
            self._rg_starts.append(starts)
            self.schema = self.schema or meta_file.schema_arrow
            self.keys.extend(keys)
            self.null_rows.update(nulls)
            self._where.extend(where)

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_cache"], state["_cached"] = collections.OrderedDict(), 0
        return state

    def name(self, j: int, column: str) -> str:
        fi, rg, r = self._where[j]
        row = self._rg_starts[fi][rg] + r
        key = "null key" if j in self.null_rows else self.keys[j] or "empty key"
        return f"{self.files[fi]} row {row} ({key}, column {column})"

    def _row_group(self, fi: int, rg: int, column: str, j: int) -> pa.ChunkedArray:
        entry = (fi, rg, column)
        if entry in self._cache:
            self._cache.move_to_end(entry)
            return self._cache[entry]
        try:
            pf = pq.ParquetFile(self.files[fi], filesystem=self.fs)
            col = pf.read_row_group(rg, columns=[column]).column(0)
        except Exception as e:
            raise BadRecordError(self.name(j, column), f"unreadable row group {rg}: {e}") from None
        self._cache[entry] = col
        self._cached += col.nbytes
        while self._cached > self.cache_bytes and len(self._cache) > 1:
            _, old = self._cache.popitem(last=False)
            self._cached -= old.nbytes
        return col

    def read(self, j: int, column: str) -> bytes:
        fi, rg, r = self._where[j]
        value = self._row_group(fi, rg, column, j)[r].as_py()
        if value is None:
            raise BadRecordError(self.name(j, column), "image is null")
        if isinstance(value, str):
            value = value.encode("latin-1")
        if not isinstance(value, (bytes, bytearray)):
            raise BadRecordError(self.name(j, column), f"expected binary, got {type(value).__name__}")
        return bytes(value)


def _is_parquet_part(relative: str) -> bool:
    return relative.endswith(".parquet") and not any(p.startswith((".", "_")) for p in relative.split("/"))


def parquet_files(fs: pafs.FileSystem, path: str, follow_symlinks: bool = False,
                  exclude: tuple = ()) -> list[str] | None:
    """The Parquet files at `path`, in sorted order: [path] for a file; the `*.parquet` files
    under a folder (no folder or file on the way hidden or starting with "_"), or None if none."""
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.NotFound:
        raise FileNotFoundError(f"no such file or folder: {path}")
    if info.type == pafs.FileType.File:
        return [path]
    if isinstance(fs, pafs.LocalFileSystem):
        found, _ = walk_files(path, want=_is_parquet_part, follow_symlinks=follow_symlinks, exclude=exclude)
        return [f"{path.rstrip('/')}/{f}" for f in found] or None
    infos = fs.get_file_info(pafs.FileSelector(path, recursive=True))
    files = sorted(
        i.path for i in infos
        if i.type == pafs.FileType.File and _is_parquet_part(posixpath.relpath(i.path, path))
    )
    return files or None


def open_source(path_or_uri, key_column: str, cache_bytes: int, follow_symlinks: bool = False,
                exclude: tuple = ()) -> FolderSource | ParquetSource:
    """The source at a path or URI: Parquet where there are Parquet files, else image files (see above)."""
    fs, path = resolve(path_or_uri)
    files = parquet_files(fs, path, follow_symlinks, exclude)
    if files is None:
        return FolderSource(fs, path, follow_symlinks=follow_symlinks, exclude=exclude)
    if len(files) == 1 and files[0] == path and path.lower().endswith(IMAGE_EXTENSIONS):
        return FolderSource(fs, posixpath.dirname(path), only=posixpath.basename(path))
    source = ParquetSource(fs, files, key_column, cache_bytes)
    if files == [path] and source.problems:  # one file asked for, and it is unreadable
        raise ValueError(f"{path_or_uri}: {source.problems[0][1]}")
    return source

