"""The manifest of a denoising job: one JSON line per input and outcome, kept up with the outputs.

Each line is {"key", "status", "reason", "output", "megapixels", "seconds", "run",
"time", "in", "settings"} with status "done" (written), "skipped" (done by an earlier
run) or "failed" (with its reason); a done or skipped line also records the output file
as written: "size", "mtime_ns" and "sha256", and what it was made from: "source" (the
input file's "size" and "mtime_ns", or for a Parquet IN the "table" fingerprint of its
files). "in" names the IN of the run (its real path, or its URI's place), "settings"
what changes pixels (the model's SHA-256, tile, overlap, self-ensemble, strength). The
file is a log: a key's latest line is its state. Lines of older versions lack "in",
"settings" and "source"; their outputs are trusted as they were.

Names that are not UTF-8 (a file system may hold any bytes) are written with JSON's
backslash-u escapes (`pipeline.storage.names.json_line`) and read back as the same `str`.

Where lines are written:
- `OUT/_manifest.jsonl`, by the driver only: the lines it decides itself (skipped and
  refused inputs), and, when a run ends, the actors' shards merged in.
- `OUT/_n2n_tmp/<run>/manifest-<actor>.jsonl`, one shard per actor, inside the run's
  staging folder: an actor appends an output's line *before* renaming the output into
  place (one `write` per line, no other writer). So every output at its final name has
  a line, whenever the job is killed; a line whose output never landed (a kill between
  the two) is caught by the file record: no such file, or not that one.
Readers (`read_state` here, `remote.read_remote_state` on an object store,
`pipeline.inference.read_manifest` for either) take the main file, then the shards; a torn
last line in any of them is ignored. A run starting on an OUT first fences off the staging folders of
earlier runs (renames them, so a straggling actor of a killed run can no longer
publish anything), merges their shards into the main file and only then deletes them.

An output counts as finished (`output_matches`) when the file at its name has the
recorded size and modification time, or else the recorded SHA-256 (an OUT copied
elsewhere keeps its content, not its times); a file matching no line ever written for
that name was not written by n2n (`written_by_us`), and the job never replaces it.
"""
from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import stat
import time
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.inference.outputs import STAGING_NAME, FileRecord
from pipeline.storage.names import json_line

MANIFEST_NAME = "_manifest.jsonl"
SHARD_PREFIX = "manifest-"
DONE, SKIPPED, FAILED = "done", "skipped", "failed"
FINISHED = (DONE, SKIPPED)


@dataclass(frozen=True)
class Entry:
    """One input's outcome. `output` is the written file (relative to the output root),
    `file` its record; `stop` asks the driver to stop the run (the disk is full)."""

    key: str
    status: str
    reason: str = ""
    output: str = ""
    megapixels: float = 0.0
    seconds: float = 0.0
    file: FileRecord | None = None
    stop: bool = False
    source: dict | None = None  # what the output was made from (see the module docstring)


def entry_line(entry: Entry, run: str, now: float, context: dict | None = None) -> str:
    """The JSON line of an entry (no newline); `context`: the run's "in" and "settings"."""
    record = {
        "key": entry.key, "status": entry.status, "reason": entry.reason, "output": entry.output,
        "megapixels": round(entry.megapixels, 6), "seconds": round(entry.seconds, 6), "run": run, "time": now,
    }
    if entry.file is not None:
        record.update(size=entry.file.size, mtime_ns=entry.file.mtime_ns, sha256=entry.file.sha256)
    if entry.source is not None:
        record["source"] = entry.source
    record.update(context or {})
    return json_line(record)


def made_from_same(record: dict, source: dict | None, settings: dict | None) -> bool:
    """Whether a finished line's output was made from this input and these settings. A line of
    an older version (no "source", no "settings") is trusted; an input whose source cannot
    be told (None) counts as changed."""
    if "source" not in record and "settings" not in record:
        return True
    return record.get("settings") == settings and source is not None and record.get("source") == source


def record_file(record: dict) -> FileRecord | None:
    """The file record of a manifest line (None for lines of older versions, or failures)."""
    try:
        return FileRecord(int(record["size"]), int(record["mtime_ns"]), str(record["sha256"]))
    except (KeyError, TypeError, ValueError):
        return None


# -- reading -----------------------------------------------------------------------------------
def parse_lines(data) -> list[dict]:
    """Parsed complete lines of a manifest's bytes (or an iterable of byte lines); a torn
    last line or a foreign line is skipped."""
    records = []
    for line in (data.splitlines(keepends=True) if isinstance(data, bytes) else data):
        if not line.endswith(b"\n"):
            break  # torn by a kill: the rest of that write never happened
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and isinstance(record.get("key"), str) and "status" in record:
            records.append(record)
    return records


def _lines(path: Path):
    """Parsed complete lines of one file; a torn or foreign line is skipped."""
    try:
        with open(path, "rb") as f:
            yield from parse_lines(f)
    except FileNotFoundError:
        return


def shard_paths(root: str | os.PathLike) -> list[Path]:
    """Every actor shard under OUT's staging folders (this run's and unmerged earlier ones)."""
    base = Path(root) / STAGING_NAME
    if base.is_symlink() or not base.is_dir():
        return []
    return sorted(base.glob(f"*/{SHARD_PREFIX}*.jsonl"))


@dataclass
class ManifestState:
    """What the manifest says: the latest record per key, and every file ever recorded per
    output name (to recognize n2n's own files, including earlier versions)."""

    latest: dict[str, dict] = field(default_factory=dict)
    files: dict[str, set] = field(default_factory=dict)  # output -> {FileRecord}
    outputs: set = field(default_factory=set)  # every output any line names
    last_in: str | None = None  # the IN of the latest line that names one: what OUT was last written from
    last_time: float = float("-inf")

    def add(self, record: dict) -> None:
        self.latest[record["key"]] = record
        if isinstance(record.get("in"), str):
            when = record.get("time")
            when = when if isinstance(when, (int, float)) else self.last_time
            if when >= self.last_time:
                self.last_in, self.last_time = record["in"], when
        output = record.get("output")
        if isinstance(output, str) and output:
            self.outputs.add(output)
            file = record_file(record)
            if file is not None:
                self.files.setdefault(output, set()).add(file)


def read_state(manifest_path: str | os.PathLike) -> ManifestState:
    """The main manifest, then the shards of its OUT's staging folders."""
    manifest_path = Path(manifest_path)
    state = ManifestState()
    for path in [manifest_path] + shard_paths(manifest_path.parent):
        for record in _lines(path):
            state.add(record)
    return state


# -- is a file ours, and finished? ----------------------------------------------------------------
def _sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _regular(path: Path) -> os.stat_result | None:
    try:
        info = os.lstat(path)
    except OSError:
        return None
    return info if stat.S_ISREG(info.st_mode) else None


def _matches(path: Path, info: os.stat_result, files) -> bool:
    if any(f.size == info.st_size and f.mtime_ns == info.st_mtime_ns for f in files):
        return True
    sized = {f.sha256 for f in files if f.size == info.st_size}
    return bool(sized) and _sha256_of(path) in sized


def _remote_matches(tree, output: str, files) -> bool:
    found = tree.file_info(output)
    if found is None:
        return False
    size, mtime_ns = found
    if any(f.size == size and f.mtime_ns == mtime_ns for f in files):
        return True
    sized = {f.sha256 for f in files if f.size == size}
    return bool(sized) and tree.sha256(output) in sized


def output_matches(root, record: dict) -> bool:
    """The record's output is at its name, exactly as the record wrote it (a record of an
    older version without a file record: the file exists). `root` is OUT's local folder,
    or a `remote.RemoteTree` of an OUT on an object store."""
    output = record.get("output")
    if not output:
        return False
    file = record_file(record)
    if hasattr(root, "file_info"):
        return root.file_info(output) is not None if file is None else _remote_matches(root, output, [file])
    info = _regular(root / output)
    if info is None:
        return False
    return True if file is None else _matches(root / output, info, [file])


def written_by_us(root, output: str, state: ManifestState, legacy_ok: bool) -> bool:
    """Whether the regular file at `output` is one a manifest line recorded (any version);
    `legacy_ok`: a line of an older version (no file record) names it, so trust it.
    `root` as in `output_matches`."""
    files = state.files.get(output)
    if hasattr(root, "file_info"):
        if root.file_info(output) is None:
            return False
        return _remote_matches(root, output, files) if files else legacy_ok
    info = _regular(root / output)
    if info is None:
        return False
    if files:
        return _matches(root / output, info, files)
    return legacy_ok


# -- writing -----------------------------------------------------------------------------------
class ManifestWriter:
    """Appends entries to OUT's main manifest, holding an exclusive lock on it: a second
    run on the same OUT is refused (`OutputBusyError`) instead of mixing with this one.

    Use as a context manager, or call `close()`.
    """

    def __init__(self, path: str | os.PathLike, run: str, context: dict | None = None):
        self.path = Path(path)
        self.run = run
        self.context = context or {}
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self._fd)
            self._fd = -1
            raise OutputBusyError(f"{self.path.parent}: another n2n run is writing this OUT") from None
        self._last_sync = time.monotonic()
        self._end_line()

    def _end_line(self) -> None:
        """A torn line from a killed run must not glue onto our first line."""
        if self.path.stat().st_size:
            with open(self.path, "rb") as f:
                f.seek(-1, os.SEEK_END)
                if f.read(1) != b"\n":
                    os.write(self._fd, b"\n")

    def append(self, entries: list[Entry]) -> None:
        """Write entries as JSON lines in one system call."""
        if entries:
            now = time.time()
            self.append_lines([entry_line(e, self.run, now, self.context) for e in entries])

    def append_lines(self, lines: list[str]) -> None:
        if not lines:
            return
        data = ("\n".join(lines) + "\n").encode("utf-8")
        view = memoryview(data)
        while view:  # a regular file takes it in one write; loop for the exotic case
            view = view[os.write(self._fd, view):]
        if time.monotonic() - self._last_sync > 5.0:
            os.fsync(self._fd)
            self._last_sync = time.monotonic()

    def merge_staging(self, staging: Path) -> int:
        """Append the complete lines of the shards in the staging folder `staging` (fenced
        off or finished) and fsync; returns how many. The caller deletes the folder after."""
        lines = []
        for path in sorted(staging.glob(f"{SHARD_PREFIX}*.jsonl")):
            lines += [json_line(record) for record in _lines(path)]
        for start in range(0, len(lines), 10_000):
            self.append_lines(lines[start:start + 10_000])
        os.fsync(self._fd)
        return len(lines)

    def close(self) -> None:
        if self._fd >= 0:
            try:
                os.fsync(self._fd)
            finally:
                os.close(self._fd)  # releases the lock
                self._fd = -1

    def __enter__(self) -> "ManifestWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class OutputBusyError(OSError):
    """Another run holds OUT's manifest lock."""


class ShardWriter:
    """One actor's manifest shard in its run's staging folder: lines appended with one
    `write` each. The staging folder must exist (the driver makes it); the shard is
    created, never its folder, so an actor of a fenced-off run cannot write one."""

    def __init__(self, staging: Path, actor: str, run: str, context: dict | None = None):
        self.run = run
        self.context = context or {}
        self.path = staging / f"{SHARD_PREFIX}{actor}.jsonl"
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
        self._torn = False  # a short write left a line without its end

    def append(self, entries: list[Entry]) -> None:
        """Append the entries' lines in one `write`; OSError if they did not all land (the
        cut line is then ended by the next append, and readers skip it)."""
        if not entries:
            return
        now = time.time()
        data = ("\n" if self._torn else "") + "".join(entry_line(e, self.run, now, self.context) + "\n"
                                                      for e in entries)
        data = data.encode("utf-8")
        self._torn = True
        written = os.write(self._fd, data)
        if written != len(data):
            raise OSError(errno.ENOSPC, "No space left on device (manifest line cut short)")
        self._torn = False

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
