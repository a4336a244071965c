"""Where an export goes: a new local file or folder, never one that exists.

An export is built in a staging folder beside OUT (`.OUT.<random>.tmp`, removed
afterwards whatever happens), then given its name in one step that fails if the name
is taken: a file by a hard link (`os.link` refuses an existing name, a symlink
included), a folder by `renameat2(RENAME_NOREPLACE)` (where the file system lacks it:
`mkdir` OUT, which refuses an existing name, then its files renamed in). So OUT is
complete or absent, and nothing that exists at OUT, a file, a folder (even an empty
one) or a symlink, is ever replaced or written through. Missing parent folders are
made; OUT is local (a URI is refused: export locally, then copy the result).
"""
from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import shutil
import uuid
from pathlib import Path

from pipeline.errors import UsageError
from pipeline.storage.locations import is_uri

_RENAME_NOREPLACE = 1
_AT_FDCWD = -100


def check_destination(out, *, option: str = "OUT") -> Path:
    """OUT as a Path, or a UsageError when it cannot be a new export's name."""
    text = os.fspath(out) if out is not None else ""
    if not text:
        raise UsageError(f"{option} must name the new export, got {out!r}")
    if is_uri(text):
        raise UsageError(f"{option} {text!r}: n2n export writes local files; export here, then copy the result")
    path = Path(text)
    if os.path.lexists(path):
        raise UsageError(f"{option} {text!r} exists; n2n export never replaces anything: choose a new name")
    parent = Path(os.path.abspath(path)).parent
    while not parent.exists() and not parent.is_symlink():
        parent = parent.parent
    if not parent.is_dir():
        raise UsageError(f"{option} {text!r}: a folder on the way is not a folder ({parent})")
    if not os.access(parent, os.W_OK):  # the first existing folder: the export's folders are made in it
        raise UsageError(f"{option} {text!r}: {parent} is not writable")
    return path


@contextlib.contextmanager
def staging_beside(out: Path):
    """A new empty folder next to `out` to build the export in; removed on the way out."""
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UsageError(f"OUT {os.fspath(out)!r}: its folder cannot be made: {e.strerror or e}") from None
    staging = out.parent / f".{out.name[:200]}.{uuid.uuid4().hex[:12]}.tmp"
    staging.mkdir()
    try:
        yield staging
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _taken(out: Path) -> UsageError:
    return UsageError(f"OUT {os.fspath(out)!r} was made while exporting; not replaced")


def place_file(built: Path, out: Path) -> None:
    """Give the finished file `built` the name `out`, failing if the name exists."""
    try:
        os.link(built, out)
    except FileExistsError:
        raise _taken(out) from None
    except OSError as e:
        if e.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV):
            raise
        if os.path.lexists(out):  # a file system without hard links: check, then rename
            raise _taken(out) from None
        os.rename(built, out)


def _rename_noreplace(source: Path, target: Path) -> bool:
    """renameat2(RENAME_NOREPLACE); False where the system or file system does not offer it."""
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):
        return False
    if renameat2(_AT_FDCWD, os.fsencode(source), _AT_FDCWD, os.fsencode(target), _RENAME_NOREPLACE) == 0:
        return True
    code = ctypes.get_errno()
    if code == errno.EEXIST:
        raise _taken(target)
    if code in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP):
        return False
    raise OSError(code, os.strerror(code), os.fspath(target))


def place_folder(built: Path, out: Path) -> None:
    """Give the finished folder `built` the name `out`, failing if the name exists."""
    if _rename_noreplace(built, out):
        return
    try:
        out.mkdir()
    except FileExistsError:
        raise _taken(out) from None
    for entry in sorted(os.listdir(built)):
        os.rename(built / entry, out / entry)
