"""Writers of (key, bytes) records: files under a folder (`FolderWriter`) or one Parquet file
(`ParquetWriter`, in the images or the pairs schema of `pipeline.data.datasets`).

Both write to a temporary name and rename it into place when done, so a crash never leaves a
half-written output under the final name. Bytes are written as given (no re-encoding). Image
columns are written uncompressed (encoded images do not compress); Parquet row groups are
bounded (`row_group_bytes`, `row_group_rows`) so a reader holds at most one bounded row group
per cached entry. Parquet files carry the key-value metadata `n2n.schema` (`SCHEMA_KEY`) =
`images/v1` or `pairs/v1`.
"""
from __future__ import annotations

import errno
import os
import posixpath
import uuid

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from pipeline.data.records import check_key
from pipeline.storage.local_paths import check_replaceable, open_parent, write_beside
from pipeline.storage.locations import resolve
from pipeline.storage.uri_writes import write_then_move

SCHEMA_KEY = b"n2n.schema"


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
