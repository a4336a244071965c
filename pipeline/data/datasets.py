"""Image datasets: folders of image files and Parquet tables of encoded images, local or remote.

`open_dataset(path_or_uri)` opens a single image file, a folder of image files, one Parquet
file or a folder of `*.parquet` files (what is found where, and the keys: `pipeline.data.sources`);
`open_pairs` opens a table of pairs; `is_pairs_table` tells the two tables apart.
Paths may be local or any URI that `pyarrow.fs` resolves (`file://`, `s3://`, `gs://`, ...).

Parquet schema (images):

| column  | type               | meaning                                           |
| ------- | ------------------ | ------------------------------------------------- |
| `path`  | string             | id / relative path of the image ("a/b.png")       |
| `image` | binary (or large)  | the encoded file's bytes, exactly as on disk      |

Parquet schema (pairs, two noisy shots of one scene): `path` (string), `noisy_a` (binary),
`noisy_b` (binary). Open it with `open_pairs`. Files written by `pipeline.data.writers` carry
the key-value metadata `n2n.schema` = `images/v1` or `pairs/v1`; readers do not require it.
Other columns are ignored. Column names can be changed with `image_column=` / `key_column=`.
Bytes are stored as-is (no re-encoding), so folder -> Parquet -> folder is byte-identical.

Sharding: `dataset.shard(i, n)` keeps the i-th of n contiguous blocks of rows; a shard
of a Parquet dataset only ever reads the row groups holding its rows, so worker i reads
only its part. Datasets pickle without their caches (metadata only), so a driver can
send one to Ray workers without shipping pixels.

Bad data: `read(i)` raises `BadRecordError(name, reason)` (`pipeline.data.records`) naming the
file or the Parquet file and row (null image, unreadable row group, missing file);
`records(on_error=...)` reports and skips such records. Unreadable Parquet files in a folder
are listed in `dataset.problems` and skipped at open.
"""
from __future__ import annotations

from typing import Callable, Iterator

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from pipeline.data.records import BadRecordError
from pipeline.data.sources import open_source, parquet_files
from pipeline.storage.locations import resolve


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



def open_dataset(path_or_uri, *, image_column: str = "image", key_column: str = "path",
                 cache_bytes: int = 256 << 20, follow_symlinks: bool = False, exclude: tuple = ()) -> ImageDataset:
    """Open a folder, one Parquet file or a folder of Parquet files.

    A folder holding any `*.parquet` file is read as Parquet, otherwise as image files.
    `cache_bytes` bounds the decoded Parquet row groups kept in memory (per process).
    Local folders: `follow_symlinks` enters symlinked folders (each real folder once);
    folders in `exclude` (real paths, e.g. the job's output) are never entered.
    """
    source = open_source(path_or_uri, key_column, cache_bytes, follow_symlinks, exclude)
    if source.kind == "parquet" and source.schema is not None and image_column not in source.schema.names:
        hint = " (a pairs table: use open_pairs)" if "noisy_a" in source.schema.names else ""
        raise ValueError(f"{path_or_uri}: no {image_column!r} column{hint}; columns: {source.schema.names}")
    return ImageDataset(source, image_column)


def open_pairs(path_or_uri, *, columns: tuple[str, str] = ("noisy_a", "noisy_b"), key_column: str = "path",
               cache_bytes: int = 256 << 20) -> PairDataset:
    """Open a Parquet table in the pairs schema (`path`, `noisy_a`, `noisy_b`)."""
    source = open_source(path_or_uri, key_column, cache_bytes)
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
    files = parquet_files(fs, path)
    for f in files or []:
        try:
            names = pq.ParquetFile(f, filesystem=fs).schema_arrow.names
        except Exception:
            continue
        return "noisy_a" in names and "noisy_b" in names
    return False
