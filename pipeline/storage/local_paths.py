"""Safety of reads and writes on the local file system: overlap, symlinks, listing.

Every function here is about local paths (and shared mounts, which behave the same).
A URI output (`s3://...`) has no symlinks or inodes: code writing through `pyarrow.fs`
skips these functions and keeps only their rules (a key stays under the root; IN and
OUT do not overlap, compared as normalized URIs).

- `overlap(a, b)`: whether two paths are the same place, or one lies inside the other,
  after resolving `.`, `..` and symlinks (`photos/.`, `./photos`, a link to `photos`).
- `open_parent` / `publish` / `write_beside`: write `root/relative/path` without ever
  following a symlink below `root` (each folder is opened with `O_NOFOLLOW` from its
  parent's descriptor, so a link planted anywhere along the path, even while the job
  runs, makes the write fail instead of landing outside the root). The root itself may
  be a link: the user named it.
- `walk_files`: the files under a folder without following symlinked folders, or, when
  asked to, following them with every real folder visited once (a link loop is listed
  once, not 40 levels deep).
"""
from __future__ import annotations

import errno
import os
import stat
import uuid
from pathlib import Path
from typing import Callable, Iterable

from pipeline.storage.locations import is_uri


class UnsafePathError(OSError):
    """A folder on the way to a file to write is a symbolic link or a file, or the file's
    own name is taken by something that is not a regular file. Its message is the whole
    story (no errno prefix)."""


def real_path(path) -> Path:
    """The absolute path with `.`, `..` and every existing symlink resolved (the rest kept)."""
    return Path(os.path.realpath(os.path.abspath(os.fspath(path))))


def overlap(a, b) -> str | None:
    """"same", "b inside a", "a inside b", or None: how the local paths a and b overlap."""
    ra, rb = real_path(a), real_path(b)
    if ra == rb:
        return "same"
    if ra in rb.parents:
        return "b inside a"
    if rb in ra.parents:
        return "a inside b"
    return None


def refuse_overlap(source, output, *, source_label: str = "IN", output_label: str = "OUT") -> None:
    """A `UsageError` when the local paths `source` (read) and `output` (written) are the
    same place or one holds the other: an output inside its input would be read back as
    input on the next run (a Parquet file in a folder of images turns the folder into a
    table), an input inside its output could be replaced. URIs are not compared here."""
    from pipeline.errors import UsageError

    if is_uri(source) or is_uri(output):
        return
    how = overlap(source, output)
    if how == "same":
        raise UsageError(f"{output_label} {os.fspath(output)!r} is {source_label} {os.fspath(source)!r}; "
                         f"choose another {output_label}")
    if how == "b inside a":
        raise UsageError(f"{output_label} {os.fspath(output)!r} is inside {source_label} {os.fspath(source)!r}: "
                         f"it would be read as part of {source_label} from then on; choose an {output_label} "
                         f"outside it")
    if how == "a inside b":
        raise UsageError(f"{source_label} {os.fspath(source)!r} is inside {output_label} {os.fspath(output)!r}; "
                         f"choose an {output_label} that does not contain it")


# -- writing without following symlinks ------------------------------------------------------
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC


class ParentDir:
    """An open descriptor of the folder that will hold one file, and that file's name.

    Use as a context manager (the descriptor is closed on exit).
    """

    def __init__(self, fd: int, name: str, relative: str):
        self.fd, self.name, self.relative = fd, name, relative

    def lstat(self) -> os.stat_result | None:
        """The entry `name` in this folder, not following a symlink; None if absent."""
        try:
            return os.stat(self.name, dir_fd=self.fd, follow_symlinks=False)
        except FileNotFoundError:
            return None

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> "ParentDir":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def open_parent(root, relative: str, *, create: bool = True) -> ParentDir:
    """Open the folder holding `root/relative` (a normalized relative POSIX path), walking
    from `root` one folder at a time with O_NOFOLLOW and creating missing ones.

    Raises:
        UnsafePathError: a folder on the way is a symlink or a file.
        OSError: anything else the file system says (permission, name too long, ...).
    """
    parts = relative.split("/")
    fd = os.open(root, _DIR_FLAGS)
    try:
        for depth, part in enumerate(parts[:-1]):
            try:
                child = os.open(part, _DIR_FLAGS | os.O_NOFOLLOW, dir_fd=fd)
            except FileNotFoundError:
                if not create:
                    raise
                try:
                    os.mkdir(part, 0o777, dir_fd=fd)
                except FileExistsError:
                    pass  # made meanwhile by another writer: opened (and checked) just below
                child = os.open(part, _DIR_FLAGS | os.O_NOFOLLOW, dir_fd=fd)
            except OSError as error:
                if error.errno in (errno.ELOOP, errno.ENOTDIR):
                    where = "/".join(parts[:depth + 1])
                    raise UnsafePathError(f"{where!r} is a symbolic link (n2n never writes through one)"
                                          if _is_link(fd, part) else f"{where!r} is a file, not a folder") from None
                raise
            os.close(fd)
            fd = child
    except BaseException:
        os.close(fd)
        raise
    return ParentDir(fd, parts[-1], relative)


def _is_link(dir_fd: int, name: str) -> bool:
    try:
        return stat.S_ISLNK(os.stat(name, dir_fd=dir_fd, follow_symlinks=False).st_mode)
    except OSError:
        return False


def check_replaceable(parent: ParentDir) -> None:
    """Refuse to replace anything but a regular file (or nothing) at the final name."""
    info = parent.lstat()
    if info is not None and not stat.S_ISREG(info.st_mode):
        kind = "a symbolic link" if stat.S_ISLNK(info.st_mode) else "a folder" if stat.S_ISDIR(info.st_mode) \
            else "not a regular file"
        raise UnsafePathError(f"{parent.relative!r} exists and is {kind}; not replaced")


def publish(source: str, parent: ParentDir) -> None:
    """Rename the finished file `source` (a path) to `parent.name` inside `parent`."""
    check_replaceable(parent)
    os.replace(source, parent.name, dst_dir_fd=parent.fd)


def write_beside(parent: ParentDir, data: bytes) -> None:
    """Write `data` to a temporary file in `parent`'s folder and rename it to `parent.name`."""
    check_replaceable(parent)
    tmp = f".{parent.name[:200]}.{uuid.uuid4().hex}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o666, dir_fd=parent.fd)
    try:
        with open(fd, "wb", closefd=True) as f:
            f.write(data)
        os.replace(tmp, parent.name, src_dir_fd=parent.fd, dst_dir_fd=parent.fd)
    except BaseException:
        try:
            os.unlink(tmp, dir_fd=parent.fd)
        except OSError:
            pass
        raise


# -- listing -----------------------------------------------------------------------------------
def walk_files(root, *, want: Callable[[str], bool] = lambda name: True, follow_symlinks: bool = False,
               skip_hidden: bool = True, exclude: Iterable = ()) -> tuple[list[str], list[tuple[str, str]]]:
    """Relative POSIX paths of the regular files under `root` whose path `want`s, sorted;
    and (path, reason) of what could not be listed or is wanted but not a regular file.

    Symlinks to regular files are listed (reading follows them); a wanted name that is a
    FIFO, a device, a socket or a broken link is a problem, never read. Symlinks to
    folders are skipped unless `follow_symlinks`; then each real folder is entered once
    (a loop, or a second link to the same folder, adds nothing), and folders whose real
    path is in `exclude` (or inside one of them) are not entered. Names starting with "."
    are skipped when `skip_hidden`.
    """
    root = os.fspath(root)
    excluded = [real_path(p) for p in exclude]
    files: list[str] = []
    problems: list[tuple[str, str]] = []
    seen: set[tuple[int, int]] = set()
    stack = [(root, "")]
    while stack:
        path, relative = stack.pop()
        try:
            info = os.stat(path)
            if (info.st_dev, info.st_ino) in seen:
                continue
            seen.add((info.st_dev, info.st_ino))
            with os.scandir(path) as entries:
                entries = list(entries)
        except OSError as error:
            problems.append((relative or ".", f"cannot list the folder: {error.strerror or error}"))
            continue
        for entry in entries:
            if skip_hidden and entry.name.startswith("."):
                continue
            name = f"{relative}/{entry.name}" if relative else entry.name
            try:
                if entry.is_dir(follow_symlinks=False):
                    stack.append((entry.path, name))
                elif entry.is_symlink() and entry.is_dir(follow_symlinks=True):
                    real = real_path(entry.path)
                    if follow_symlinks and not any(real == e or e in real.parents for e in excluded):
                        stack.append((entry.path, name))
                elif not want(name):
                    continue
                elif entry.is_file(follow_symlinks=True):
                    files.append(name)
                elif entry.is_symlink() and not os.path.exists(entry.path):
                    problems.append((name, "broken symbolic link"))
                else:
                    problems.append((name, "not a regular file (a FIFO, device or socket); not read"))
            except OSError as error:
                problems.append((name, f"cannot inspect: {error.strerror or error}"))
    return sorted(files), problems


def read_regular_file(path) -> bytes:
    """The bytes of the regular file at `path` (following a symlink), refusing FIFOs and
    devices without blocking on them."""
    return read_regular_file_stat(path)[0]


def read_regular_file_stat(path) -> tuple[bytes, os.stat_result]:
    """`read_regular_file`, and the file's status as it was opened (size, modification time
    of exactly what was read)."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise OSError(errno.EINVAL, "not a regular file (a FIFO, device or socket); not read")
        os.set_blocking(fd, True)
        with open(fd, "rb", closefd=False) as f:
            return f.read(), info
    finally:
        os.close(fd)
