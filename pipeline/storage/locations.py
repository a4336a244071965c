"""Where a path or URI points: the one place that answers "is this a URI?", "is it remote?",
"which local path is it?" and "which file system holds it?".

A plain path and a `file://` URI are local; any other `scheme://` URI (`s3://`, `gs://`,
`hdfs://`, ...) is remote and reached through `pyarrow.fs`.
"""
from __future__ import annotations

import os

import pyarrow.fs as pafs


def is_uri(path) -> bool:
    """Whether `path` is written as a URI (`scheme://...`, `file://` included)."""
    return "://" in os.fspath(path)


def local_path(path) -> str | None:
    """The local path of a plain path or a `file://` URI; None for other URIs."""
    text = os.fspath(path)
    if text.startswith("file://"):
        return text[len("file://"):] or "/"
    return None if is_uri(text) else text


def is_remote(path) -> bool:
    """Whether `path` names a non-local file system (a `file://` URI or a plain path is local)."""
    return local_path(path) is None


def resolve(path_or_uri) -> tuple[pafs.FileSystem, str]:
    """A `pyarrow.fs` filesystem and the path inside it; plain paths are local (made absolute)."""
    text = os.fspath(path_or_uri)
    if is_uri(text):
        return pafs.FileSystem.from_uri(text)
    return pafs.LocalFileSystem(), os.path.abspath(text).replace(os.sep, "/")
