"""OUT on an object store (`s3://`, `gs://`, any non-local `pyarrow.fs` URI): the same layout,
manifest and rules as a local OUT, through `pyarrow.fs`.

An object store has no rename, no append, no lock and no symlinks, so the local machinery
(outputs.py, manifest.py's writers, storage/local_paths.py) is replaced here by its equivalent:

- **Atomic objects.** Every object (output, Parquet part, strip, manifest) is written from
  its complete bytes in one upload (`put`): on S3 and GCS an object appears only when its
  single PUT (or its multipart upload) completes, so no reader ever sees a partial object
  under a final name; a killed upload leaves nothing. On another non-local file system the
  bytes go to a temporary name under the run's staging prefix and are then moved.
- **Manifest.** `OUT/_manifest.jsonl` is one object, rewritten whole (from its old bytes plus
  the new lines) by the driver only, when a run starts and when it ends. During a run every
  writer (each actor, and the driver for the lines it decides) adds *shard objects*
  `OUT/_n2n_tmp/<run>/manifest-<writer>-<seq>.jsonl`, never changing one. An output's line
  is in a shard before the output is uploaded, so every output at its final name has a line
  (as locally). The line records size and SHA-256 (modification time 0: not known before the
  upload); after the upload a second line records the object's modification time (whole
  seconds, what every S3 API reports alike), so a resume compares sizes and times from one
  listing instead of downloading outputs. A kill between the two leaves the first line: that
  output is then recognized by its SHA-256 (downloaded once).
- **Fencing.** The driver creates `OUT/_n2n_tmp/<run>/_live` before any actor starts; an actor
  checks it is still there before each upload. A run starting on an OUT deletes the `_live`
  of every other run (fencing their stragglers off), merges their shards into the main
  manifest, then deletes them. Unlike a local rename this is check-then-write: an actor that
  checked just before the fence can still upload the one output it is working on.
- **No lock.** Object stores offer no lock through `pyarrow.fs`: a second run started on the
  same OUT while one is going is not refused; it fences the first run off (its actors stop
  publishing) and takes over. Run one job per OUT.

Endpoint and credentials come from the URI's query or the environment, as for training
(docs/training.md); every node must reach the store (on a cluster: an instance profile).
"""
from __future__ import annotations

import hashlib
import posixpath
import time
import uuid
from dataclasses import dataclass, field

import pyarrow.fs as pafs

from pipeline.inference.manifest import MANIFEST_NAME, ManifestState, entry_line, parse_lines
from pipeline.inference.outputs import STAGING_NAME, FileRecord
from pipeline.storage.names import json_line
from pipeline.storage.uri_writes import write_then_move

LIVE_NAME = "_live"
SHARD_PREFIX = "manifest-"
_SINGLE_PUT = ("S3FileSystem", "GcsFileSystem")  # an object appears only complete: upload in place
_SECOND = 1_000_000_000


def uri_location(uri: str) -> tuple[str, str]:
    """(scheme, normalized path): the place a URI names, without its query (`?endpoint_override=...`),
    doubled or trailing slashes and `.` components; for comparing IN and OUT."""
    scheme, _, rest = uri.partition("://")
    rest = rest.split("?", 1)[0]
    parts = [p for p in rest.split("/") if p not in ("", ".")]
    return scheme.lower(), "/".join(parts)


def mtime_seconds(info: pafs.FileInfo) -> int:
    """An object's modification time in ns, cut to whole seconds (HEAD and listings agree on those)."""
    if info.mtime_ns is None:
        return 0
    return info.mtime_ns // _SECOND * _SECOND


@dataclass
class RemoteOut:
    """OUT as a pyarrow file system and a root path in it (picklable: actors get it)."""

    uri: str
    fs: pafs.FileSystem = field(init=False)
    root: str = field(init=False)

    def __post_init__(self):
        from pipeline.storage.locations import resolve

        self.fs, root = resolve(self.uri)
        self.root = root.rstrip("/")

    def __getstate__(self):
        return {"uri": self.uri}

    def __setstate__(self, state):
        self.uri = state["uri"]
        self.__post_init__()

    def path(self, relative: str = "") -> str:
        return f"{self.root}/{relative}" if relative else self.root

    def where(self, relative: str = "") -> str:
        """What to show a user: the URI (without its query) and `relative`."""
        base = self.uri.split("?", 1)[0].rstrip("/")
        return f"{base}/{relative}" if relative else base

    def info(self, relative: str) -> pafs.FileInfo:
        return self.fs.get_file_info(self.path(relative))

    def listing(self, relative: str = "") -> list[pafs.FileInfo]:
        """Every entry under `relative` (recursive); [] when there is none."""
        selector = pafs.FileSelector(self.path(relative), recursive=True, allow_not_found=True)
        return self.fs.get_file_info(selector)

    def relative(self, info: pafs.FileInfo) -> str:
        return info.path[len(self.root) + 1:]

    def read(self, relative: str) -> bytes | None:
        """The bytes of an object; None when there is none."""
        try:
            with self.fs.open_input_stream(self.path(relative)) as f:
                return f.read()
        except FileNotFoundError:
            return None

    def put(self, relative: str, data: bytes, staging: str | None = None) -> None:
        """Write `data` at `relative` so that the name appears only with all of its bytes."""
        final = self.path(relative)
        parent = posixpath.dirname(final)
        if type(self.fs).__name__ in _SINGLE_PUT:
            stream = self.fs.open_output_stream(final)
            stream.write(data)
            stream.close()  # the object appears here, complete (one PUT or a completed multipart upload)
            return
        self.fs.create_dir(parent, recursive=True)
        tmp = self.path(f"{staging or STAGING_NAME}/{uuid.uuid4().hex}.tmp")
        write_then_move(self.fs, tmp, final, lambda stream: stream.write(data))

    def delete(self, relative: str) -> None:
        try:
            self.fs.delete_file(self.path(relative))
        except FileNotFoundError:
            pass

    def record(self, relative: str, data: bytes) -> FileRecord:
        """The record of the object just written from `data` (its modification time from the store)."""
        info = self.info(relative)
        return FileRecord(len(data), mtime_seconds(info), hashlib.sha256(data).hexdigest())


def staging_prefix(run: str) -> str:
    return f"{STAGING_NAME}/{run}"


def create_live(out: RemoteOut, run: str) -> None:
    """The driver marks its run live before any actor starts (actors never create it)."""
    out.put(f"{staging_prefix(run)}/{LIVE_NAME}", run.encode())


def check_live(out: RemoteOut, run: str) -> None:
    """Raise FileNotFoundError when the run was fenced off by a newer one (its `_live` is gone)."""
    if out.info(f"{staging_prefix(run)}/{LIVE_NAME}").type != pafs.FileType.File:
        raise FileNotFoundError(f"staging {out.where(staging_prefix(run))} is gone: this run was fenced off by a "
                                f"newer one")


def shard_objects(out: RemoteOut) -> dict[str, list[str]]:
    """Every shard object under OUT's staging prefix, by run folder (folders and shards sorted)."""
    runs: dict[str, list[str]] = {}
    for info in out.listing(STAGING_NAME):
        relative = out.relative(info)
        parts = relative.split("/")
        if info.type == pafs.FileType.File and len(parts) == 3:
            runs.setdefault(parts[1], [])
            if parts[2].startswith(SHARD_PREFIX) and parts[2].endswith(".jsonl"):
                runs[parts[1]].append(relative)
    return {run: sorted(names) for run, names in sorted(runs.items())}



def read_remote_state(out: RemoteOut) -> ManifestState:
    """The manifest of an OUT on an object store (as `manifest.read_state` locally): the main
    object, then the shard objects of every run's staging prefix."""
    state = ManifestState()
    names = [MANIFEST_NAME] + [name for names in shard_objects(out).values() for name in names]
    for name in names:
        for record in parse_lines(out.read(name) or b""):
            state.add(record)
    return state

class RemoteShardWriter:
    """One writer's manifest shard: each `append` adds one new object (object stores do not
    append). `check_fence`: check before each object that the run was not fenced off."""

    def __init__(self, out: RemoteOut, run: str, writer: str, check_fence: bool = True, context: dict | None = None):
        self.out, self.run, self.writer = out, run, writer
        self.context = context or {}
        self.check_fence = check_fence
        self.seq = 0

    def append(self, entries) -> None:
        if not entries:
            return
        if self.check_fence:
            check_live(self.out, self.run)
        now = time.time()
        data = "".join(entry_line(e, self.run, now, self.context) + "\n" for e in entries).encode("utf-8")
        name = f"{staging_prefix(self.run)}/{SHARD_PREFIX}{self.writer}-{self.seq:08d}.jsonl"
        self.seq += 1
        self.out.put(name, data, staging_prefix(self.run))

    def close(self) -> None:
        pass


class RemoteManifestWriter:
    """The driver's side of a remote manifest: its own lines go to a shard of its run;
    `merge_all` fences every run's staging off and folds the shards into the main object."""

    def __init__(self, out: RemoteOut, run: str, context: dict | None = None):
        self.out, self.run = out, run
        self.name = MANIFEST_NAME
        self.shard = RemoteShardWriter(out, run, "driver", check_fence=False, context=context)

    def append(self, entries) -> None:
        self.shard.append(entries)

    def merge_all(self) -> int:
        """Fence off every staging folder (this run's too), append the complete lines of all
        shards to the main manifest (one upload of the whole object), then delete the shards
        and the rest of the staging objects; returns how many lines were merged."""
        runs = shard_objects(self.out)
        for run in runs:
            self.out.delete(f"{staging_prefix(run)}/{LIVE_NAME}")  # fenced: stragglers cannot publish
        lines = []
        for run, names in runs.items():
            for name in names:
                lines += [json_line(r) for r in parse_lines(self.out.read(name) or b"")]
        if lines:
            old = self.out.read(self.name) or b""
            if old and not old.endswith(b"\n"):
                old += b"\n"
            self.out.put(self.name, old + ("\n".join(lines) + "\n").encode("utf-8"))
        for info in self.out.listing(STAGING_NAME):
            if info.type == pafs.FileType.File:
                self.out.delete(self.out.relative(info))
        return len(lines)

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class RemoteTree:
    """What OUT holds, from one listing: for planning (is a name taken, by what) and for
    resuming (is an output there as its line recorded it)."""

    def __init__(self, out: RemoteOut):
        self.out = out
        self.files: dict[str, pafs.FileInfo] = {}
        self.folders: set[str] = set()
        for info in out.listing():
            relative = out.relative(info)
            if info.type == pafs.FileType.File:
                self.files[relative] = info
                parts = relative.split("/")
                self.folders.update("/".join(parts[:i]) for i in range(1, len(parts)))
            elif info.type == pafs.FileType.Directory:
                self.folders.add(relative)

    def file_info(self, relative: str) -> tuple[int, int] | None:
        """(size, mtime_ns in whole seconds) of the object at `relative`; None if there is none."""
        info = self.files.get(relative)
        return None if info is None else (info.size, mtime_seconds(info))

    def is_folder(self, relative: str) -> bool:
        return relative in self.folders

    def sha256(self, relative: str) -> str:
        return hashlib.sha256(self.out.read(relative) or b"").hexdigest()

    def __truediv__(self, relative: str) -> str:
        return self.out.where(relative)
