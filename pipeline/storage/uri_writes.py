"""Writing a file through a pyarrow filesystem (a URI's store) without leaving a partial one.

`write_then_move` writes to a temporary path and moves it into place; if anything fails
(or the process is interrupted in Python), the temporary is deleted and the error goes on.
On object stores a move is a copy and a delete, so callers that need the final object to
appear in one step write it directly instead (see pipeline/inference/remote.py).
"""
from __future__ import annotations

from typing import Callable

import pyarrow.fs as pafs


def write_then_move(fs: pafs.FileSystem, tmp: str, final: str, write: Callable) -> None:
    """Call `write(stream)` on a new output stream at `tmp`, close it, then move `tmp` to `final`."""
    try:
        with fs.open_output_stream(tmp) as stream:
            write(stream)
        fs.move(tmp, final)
    except BaseException:
        try:
            fs.delete_file(tmp)
        except OSError:
            pass
        raise
