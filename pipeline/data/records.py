"""A record of a dataset: its key (a relative POSIX path, checked before anything is written
under it) and the error that names a record which cannot be read.

Shared by the sources (`pipeline.data.sources`), the datasets (`pipeline.data.datasets`), the
writers (`pipeline.data.writers`) and the denoising workers, which read keys straight from
Parquet batches.
"""
from __future__ import annotations


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

