"""Image datasets: folders of image files and Parquet tables of encoded images, local or remote.

Sources (`open_dataset(path_or_uri)`):
- a single image file: a dataset of one record keyed by its file name;
- a folder: every file with an image extension (`IMAGE_EXTENSIONS`, any case) found
  recursively, hidden files and folders skipped; keys are the relative POSIX paths
  ("sub/dir/a.png"), sorted, so the order is stable across machines. On the local file
  system, symlinked folders are not followed unless `follow_symlinks=True`, and then
  every real folder is entered once (a link loop adds nothing); symlinked files are
  read through; FIFOs, devices and broken links with an image extension are listed in
  `problems`, never read;
- one Parquet file, or a folder of `*.parquet` files (read in sorted name order).
Paths may be local or any URI that `pyarrow.fs` resolves (`file://`, `s3://`, `gs://`, ...).

Parquet schema (images):

| column  | type               | meaning                                           |
| ------- | ------------------ | ------------------------------------------------- |
| `path`  | string             | id / relative path of the image ("a/b.png")       |
| `image` | binary (or large)  | the encoded file's bytes, exactly as on disk      |

Parquet schema (pairs, two noisy shots of one scene): `path` (string), `noisy_a` (binary),
`noisy_b` (binary). Open it with `open_pairs`. Files written here carry the key-value
metadata `n2n.schema` = `images/v1` or `pairs/v1`; readers do not require it. Other
columns are ignored. Column names can be changed with `image_column=` / `key_column=`.

Bytes are stored as-is (no re-encoding), so folder -> Parquet -> folder is byte-identical.
Writers (`FolderWriter`, `ParquetWriter`) write to a temporary name and rename it into
place when done, so a crash never leaves a half-written output under the final name.
Image columns are written uncompressed (encoded images do not compress). Parquet row groups are bounded (`row_group_bytes`, `row_group_rows`) so a reader holds at
most one bounded row group per cached entry.

Sharding: `dataset.shard(i, n)` keeps the i-th of n contiguous blocks of rows; a shard
of a Parquet dataset only ever reads the row groups holding its rows, so worker i reads
only its part. Datasets pickle without their caches (metadata only), so a driver can
send one to Ray workers without shipping pixels.

Bad data: `read(i)` raises `BadRecordError(name, reason)` naming the file or the Parquet
file and row (null image, unreadable row group, missing file); `records(on_error=...)`
reports and skips such records. Unreadable Parquet files in a folder are listed in
`dataset.problems` and skipped at open.
"""
from __future__ import annotations

import collections
import errno
import os
import posixpath
import uuid
from typing import Callable, Iterator

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from pipeline.storage.local_paths import (
    check_replaceable, open_parent, read_regular_file, read_regular_file_stat, walk_files, write_beside,
)
from pipeline.storage.locations import resolve
from pipeline.storage.uri_writes import write_then_move

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".gif", ".webp", ".ppm", ".pgm", ".pnm")
SCHEMA_KEY = b"n2n.schema"


class BadRecordError(ValueError):
    """A record that cannot be read; `name` names the file or "file.parquet row N"."""

    def __init__(self, name: str, reason: str):
        super().__init__(f"{name}: {reason}")
        self.name = name
        self.reason = reason

    def __reduce__(self):
        return (type(self), (self.name, self.reason))


def key_text(value) -> str:
    """A key column's value as text: strings as they are, bytes decoded as UTF-8 (bytes
    that are not UTF-8 as backslash escapes), numbers as `str`; null reads "" (a
    source's `null_rows` tells the two apart)."""
    if value is None:
        return ""
    if isinstance(value, (bytes, bytearray)):
        return bytes(value).decode("utf-8", errors="backslashreplace")
    return str(value)


def check_key(key: str) -> str:
    """Reject keys that would escape the output root: absolute, `..`, empty parts, backslashes."""
    if not key or key.startswith("/") or "\\" in key or ":" in key.split("/")[0]:
        raise ValueError(f"unsafe key {key!r}: must be a relative POSIX path")
    parts = key.split("/")
    if any(p in ("", ".", "..") for p in parts):
        raise ValueError(f"unsafe key {key!r}: empty, '.' or '..' path component")
    return key


# ----------------------------------------------------------------------------- sources
def _is_image_name(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS)


class _FolderSource:
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


class _ParquetSource:
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


# ----------------------------------------------------------------------------- datasets
class ImageDataset:
    """An ordered, shardable list of encoded images with keys.

    Attributes:
        keys: list of str, stable order (relative paths for folders, the key column for Parquet).
        kind: "folder" or "parquet".
        image_column: the Parquet column read by `read` (ignored for folders).
        problems: list of (file, reason) for Parquet files that could not be opened.
    """

    def __init__(self, source, image_column: str = "image", rows: range | None = None):
        self._source = source
        self.image_column = image_column
        self._rows = rows if rows is not None else range(len(source.keys))

    def __getstate__(self):  # the key list is rebuilt on demand, not shipped twice
        state = dict(self.__dict__)
        state.pop("_keys", None)
        return state

    @property
    def kind(self) -> str:
        return self._source.kind

    @property
    def problems(self) -> list[tuple[str, str]]:
        return self._source.problems

    @property
    def files(self) -> list[str]:
        """Parquet: the files read, in order (paths of `filesystem`); [] for a folder."""
        return list(getattr(self._source, "files", []))

    @property
    def filesystem(self) -> pafs.FileSystem:
        return self._source.fs

    @property
    def schema(self) -> pa.Schema | None:
        """Parquet: the Arrow schema of the first file; None for a folder."""
        return getattr(self._source, "schema", None)

    @property
    def keys(self) -> list[str]:
        """Keys of this dataset's rows, in order (built once; treat as read-only)."""
        if getattr(self, "_keys", None) is None:
            self._keys = [self._source.keys[j] for j in self._rows]
        return self._keys

    def __len__(self) -> int:
        return len(self._rows)

    def mean_row_bytes(self) -> float | None:
        """Parquet: the mean uncompressed size of a row (all columns), from the metadata;
        None for a folder."""
        total = getattr(self._source, "total_bytes", None)
        return total / max(1, len(self._source.keys)) if total is not None else None

    def key(self, i: int) -> str:
        return self._source.keys[self._rows[i]]

    def is_null_key(self, i: int) -> bool:
        """True when record i's key cell is null (its `key` then reads "")."""
        return self._rows[i] in self._source.null_rows

    def name(self, i: int) -> str:
        """Human-readable location of record i (file, or Parquet file and row)."""
        return self._source.name(self._rows[i], self.image_column)

    def read(self, i: int) -> bytes:
        """Encoded bytes of record i; raises BadRecordError naming the file/row."""
        return self._source.read(self._rows[i], self.image_column)

    def stamp(self, i: int) -> dict | None:
        """Folder: what identifies record i's file now ({"size", "mtime_ns"}), None if unknown.
        Parquet: None (a table's rows are identified by `table_stamp`)."""
        stamp = getattr(self._source, "stamp", None)
        return stamp(self._rows[i]) if stamp is not None else None

    def read_stamped(self, i: int) -> tuple[bytes, dict | None]:
        """`read`, and for a folder the stamp of the very file read (None for Parquet)."""
        read = getattr(self._source, "read_stamped", None)
        if read is None:
            return self.read(i), None
        return read(self._rows[i], self.image_column)

    def table_stamp(self) -> dict | None:
        """Parquet: one fingerprint of every file's name, size and modification time (any change
        to the table changes it); None for a folder."""
        if self.kind != "parquet":
            return None
        import hashlib
        import json

        infos = self.filesystem.get_file_info(self.files)
        listed = sorted([i.path, i.size, i.mtime_ns] for i in infos)
        return {"table": hashlib.sha256(json.dumps(listed).encode("utf-8", "surrogateescape")).hexdigest()}

    def shard(self, index: int, count: int) -> "ImageDataset":
        """The index-th of count contiguous blocks (sizes differ by at most one)."""
        if count < 1 or not 0 <= index < count:
            raise ValueError(f"shard index {index} out of range for {count} shards")
        n = len(self._rows)
        return type(self)(self._source, self.image_column, self._rows[index * n // count:(index + 1) * n // count])

    def records(self, on_error: Callable[[BadRecordError], None] | None = None) -> Iterator[tuple[str, bytes]]:
        """Yield (key, bytes) in order; bad records go to `on_error` (skipped) or raise if None."""
        for i in range(len(self)):
            try:
                data = self.read(i)
            except BadRecordError as e:
                if on_error is None:
                    raise
                on_error(e)
                continue
            yield self.key(i), data


class PairDataset:
    """Rows holding two encoded noisy shots of the same scene (the pairs schema).

    Attributes:
        a, b: ImageDatasets over the same rows reading `noisy_a` and `noisy_b`.
    """

    def __init__(self, a: ImageDataset, b: ImageDataset):
        if a.keys != b.keys:
            raise ValueError("pair members must share their keys")
        self.a, self.b = a, b

    @property
    def keys(self) -> list[str]:
        return self.a.keys

    def __len__(self) -> int:
        return len(self.a)

    def key(self, i: int) -> str:
        return self.a.key(i)

    def read_pair(self, i: int) -> tuple[bytes, bytes]:
        return self.a.read(i), self.b.read(i)

    def shard(self, index: int, count: int) -> "PairDataset":
        return PairDataset(self.a.shard(index, count), self.b.shard(index, count))


def _is_parquet_part(relative: str) -> bool:
    return relative.endswith(".parquet") and not any(p.startswith((".", "_")) for p in relative.split("/"))


def _parquet_files(fs: pafs.FileSystem, path: str, follow_symlinks: bool = False,
                   exclude: tuple = ()) -> list[str] | None:
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


def _open_source(path_or_uri, key_column: str, cache_bytes: int, follow_symlinks: bool = False,
                 exclude: tuple = ()):
    fs, path = resolve(path_or_uri)
    files = _parquet_files(fs, path, follow_symlinks, exclude)
    if files is None:
        return _FolderSource(fs, path, follow_symlinks=follow_symlinks, exclude=exclude)
    if len(files) == 1 and files[0] == path and path.lower().endswith(IMAGE_EXTENSIONS):
        return _FolderSource(fs, posixpath.dirname(path), only=posixpath.basename(path))
    source = _ParquetSource(fs, files, key_column, cache_bytes)
    if files == [path] and source.problems:  # one file asked for, and it is unreadable
        raise ValueError(f"{path_or_uri}: {source.problems[0][1]}")
    return source


def open_dataset(path_or_uri, *, image_column: str = "image", key_column: str = "path",
                 cache_bytes: int = 256 << 20, follow_symlinks: bool = False, exclude: tuple = ()) -> ImageDataset:
    """Open a folder, one Parquet file or a folder of Parquet files.

    A folder holding any `*.parquet` file is read as Parquet, otherwise as image files.
    `cache_bytes` bounds the decoded Parquet row groups kept in memory (per process).
    Local folders: `follow_symlinks` enters symlinked folders (each real folder once);
    folders in `exclude` (real paths, e.g. the job's output) are never entered.
    """
    source = _open_source(path_or_uri, key_column, cache_bytes, follow_symlinks, exclude)
    if source.kind == "parquet" and source.schema is not None and image_column not in source.schema.names:
        hint = " (a pairs table: use open_pairs)" if "noisy_a" in source.schema.names else ""
        raise ValueError(f"{path_or_uri}: no {image_column!r} column{hint}; columns: {source.schema.names}")
    return ImageDataset(source, image_column)


def open_pairs(path_or_uri, *, columns: tuple[str, str] = ("noisy_a", "noisy_b"), key_column: str = "path",
               cache_bytes: int = 256 << 20) -> PairDataset:
    """Open a Parquet table in the pairs schema (`path`, `noisy_a`, `noisy_b`)."""
    source = _open_source(path_or_uri, key_column, cache_bytes)
    if source.kind != "parquet":
        raise ValueError(f"{path_or_uri}: pairs must be a Parquet table with columns {columns}")
    if source.schema is not None:
        missing = [c for c in columns if c not in source.schema.names]
        if missing:
            raise ValueError(f"{path_or_uri}: missing pair columns {missing}; columns: {source.schema.names}")
    return PairDataset(ImageDataset(source, columns[0]), ImageDataset(source, columns[1]))


def is_pairs_table(path_or_uri) -> bool:
    """True when the path is Parquet with `noisy_a` and `noisy_b` columns."""
    fs, path = resolve(path_or_uri)
    files = _parquet_files(fs, path)
    for f in files or []:
        try:
            names = pq.ParquetFile(f, filesystem=fs).schema_arrow.names
        except Exception:
            continue
        return "noisy_a" in names and "noisy_b" in names
    return False


# ----------------------------------------------------------------------------- writers
class FolderWriter:
    """Write (key, bytes) records as files under `root`, each atomically (temp name + rename).

    On the local file system no write goes through a symlink below `root` (a link
    planted at `root/sub` makes writes under `sub/` fail, naming it), and an existing
    file is replaced only when `replace` is true: otherwise one with the same bytes
    counts as written and one with other bytes is an error.
    """

    def __init__(self, root, *, replace: bool = True):
        self.fs, self.root = resolve(root)
        self.root = self.root.rstrip("/")
        self.local = isinstance(self.fs, pafs.LocalFileSystem)
        self.replace = replace
        self.fs.create_dir(self.root, recursive=True)
        self.count = 0

    def write(self, key: str, data: bytes) -> str:
        check_key(key)
        final = self.root + "/" + key
        if self.local:
            with open_parent(self.root, key) as parent:
                if not self.replace and parent.lstat() is not None:
                    check_replaceable(parent)
                    if not _same_content(parent, data):
                        raise FileExistsError(errno.EEXIST, "exists with other content; not replaced")
                else:
                    write_beside(parent, data)
            self.count += 1
            return final
        parent = posixpath.dirname(final)
        self.fs.create_dir(parent, recursive=True)
        tmp = f"{parent}/.{posixpath.basename(final)}.{uuid.uuid4().hex}.tmp"
        write_then_move(self.fs, tmp, final, lambda stream: stream.write(data))
        self.count += 1
        return final

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _same_content(parent, data: bytes) -> bool:
    """Whether the regular file `parent.name` holds exactly `data` (read without following a link)."""
    try:
        fd = os.open(parent.name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK, dir_fd=parent.fd)
    except OSError:
        return False
    with open(fd, "rb") as f:
        return os.fstat(f.fileno()).st_size == len(data) and f.read(len(data) + 1) == data


class ParquetWriter:
    """Write (key, bytes...) records to one Parquet file, in bounded row groups, atomically.

    Args:
        path: output file (local or URI); written as a temporary sibling and renamed on close().
        image_columns: ("image",) for images, ("noisy_a", "noisy_b") for pairs.
        row_group_bytes, row_group_rows: a row group is flushed when either is reached.
    Use as a context manager: on an exception the temporary file is removed and nothing appears.
    """

    def __init__(self, path, *, image_columns: tuple[str, ...] = ("image",), key_column: str = "path",
                 row_group_bytes: int = 64 << 20, row_group_rows: int = 1024):
        self.fs, self.path = resolve(path)
        self.image_columns, self.key_column = tuple(image_columns), key_column
        self.row_group_bytes, self.row_group_rows = row_group_bytes, row_group_rows
        kind = b"pairs/v1" if self.image_columns == ("noisy_a", "noisy_b") else b"images/v1"
        fields = [pa.field(key_column, pa.string())] + [pa.field(c, pa.binary()) for c in self.image_columns]
        self.schema = pa.schema(fields, metadata={SCHEMA_KEY: kind})
        parent = posixpath.dirname(self.path)
        if parent:
            self.fs.create_dir(parent, recursive=True)
        self._tmp = f"{parent}/.{posixpath.basename(self.path)}.{uuid.uuid4().hex}.tmp"
        self._stream = self.fs.open_output_stream(self._tmp)
        # Encoded images neither compress nor repeat: no codec, dictionary or statistics for
        # them (cheaper writes and reads); the key column gets all three.
        compression = {key_column: "snappy", **{c: "none" for c in self.image_columns}}
        self._writer = pq.ParquetWriter(self._stream, self.schema, compression=compression,
                                        use_dictionary=[key_column], write_statistics=[key_column])
        self._rows: list[tuple] = []
        self._bytes = 0
        self.count = 0
        self.row_groups = 0
        self._closed = False

    def write(self, key: str, *images: bytes) -> None:
        check_key(key)
        if len(images) != len(self.image_columns):
            raise ValueError(f"expected {len(self.image_columns)} images {self.image_columns}, got {len(images)}")
        self._rows.append((key, *images))
        self._bytes += sum(len(b) for b in images)
        self.count += 1
        if self._bytes >= self.row_group_bytes or len(self._rows) >= self.row_group_rows:
            self._flush()

    def _flush(self) -> None:
        if not self._rows:
            return
        columns = list(zip(*self._rows))
        table = pa.Table.from_arrays([pa.array(c, type=f.type) for c, f in zip(columns, self.schema)],
                                     schema=self.schema)
        self._writer.write_table(table, row_group_size=len(self._rows))
        self.row_groups += 1
        self._rows, self._bytes = [], 0

    def close(self) -> None:
        if self._closed:
            return
        try:
            self._flush()
            self._writer.close()
            self._stream.close()
            self.fs.move(self._tmp, self.path)
        except BaseException:
            self._closed = True
            try:  # the temporary file never outlives a failed close
                self.fs.delete_file(self._tmp)
            except OSError:
                pass
            raise
        self._closed = True

    def abort(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            self._writer.close()
            self._stream.close()
        finally:
            try:
                self.fs.delete_file(self._tmp)
            except OSError:
                pass

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            self.close()
        else:
            self.abort()
