"""File names that are not UTF-8: kept exactly, shown readably.

A Linux file system may hold any bytes in a name (`b"bad\\xff\\xfeutf8.png"`). Python
lists such a name as a `str` with lone surrogates ("surrogateescape", `os.fsdecode`),
which opens the very same file again but cannot be encoded as UTF-8: printed, written
into a JSON line or a Parquet string column as is, it raises `UnicodeEncodeError`. So:

- keys stay as Python lists them (the file is opened by exactly that name);
- messages show `printable(name)`, the bytes that are not UTF-8 as `\\xff` escapes;
- the manifest's JSON lines escape such names (`json_line`), and read back to the same
  `str`; Ray's tables carry them as bytes (`to_wire` / `from_wire`);
- where a name must become UTF-8 text (a Parquet key column), `utf8_problem` gives the
  one-line reason that input fails with.
"""
from __future__ import annotations

import json


def printable(name: str) -> str:
    """`name` for messages: bytes that are not UTF-8 shown as backslash escapes."""
    return name.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def utf8_problem(name: str) -> str | None:
    """None when `name` is UTF-8 text; else why it cannot be a Parquet key."""
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return "the file name is not valid UTF-8, and a Parquet key must be text: rename the file"
    return None


def to_wire(name: str) -> bytes:
    """The name's bytes, exactly as the file system holds them (lossless for any listed name)."""
    return name.encode("utf-8", "surrogateescape")


def from_wire(data: bytes) -> str:
    return data.decode("utf-8", "surrogateescape")


def json_line(record: dict) -> str:
    """One JSON line: UTF-8 text as it is, and a record holding a name that is not UTF-8
    written with \\u escapes (ASCII), which `json.loads` turns back into the same `str`."""
    text = json.dumps(record, ensure_ascii=False)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return json.dumps(record, ensure_ascii=True)
    return text
