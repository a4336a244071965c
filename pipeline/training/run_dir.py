"""A run's output directory (`--out`): a local folder or a `pyarrow.fs` URI (s3://, gs://, file://).

Layout, the same everywhere:
    n2n-run.json                     the marker: this folder is an n2n run (written first)
    checkpoints/step-NNNNNNNN.n2n    every `checkpoint_every` steps, the newest `keep_checkpoints` kept
    model.n2n                        the final checkpoint
    metrics.jsonl                    the config, then one JSON line per step and per validation
    training.png                     curves and a validation strip

A run writes only into a folder that is new, empty, or an n2n run: one holding the
marker, or (a run of an older n2n) step checkpoints in `checkpoints/`. Any other folder
is refused before anything is written (`ownership_problem`), so a folder of someone's
files named model.n2n or training.png, or the photo folder itself, is never written into.

Nothing is ever half-written under a final name. On a local disk a file is written to a
temporary name in its folder and renamed (`n2n_core`'s checkpoints do this themselves).
On an object store a file is written locally first, uploaded under a temporary name next
to its final one (`.NAME.<random>.tmp`) and then moved, which object stores do as one
server-side copy: the final object appears only complete. `metrics.jsonl` and
`training.png` live in a local staging folder during the run and are uploaded at every
checkpoint and at the end; a resumed run downloads them first.

The object store is reached from this process only; workers never write here. Its
endpoint and credentials come from the URI's query (`?endpoint_override=HOST:PORT&scheme=http`)
or the environment (`AWS_ENDPOINT_URL_S3`, `AWS_ACCESS_KEY_ID`, ...), see docs/training.md.
n2n_core never sees a URI: it reads and writes local files.
"""
from __future__ import annotations

import json
import os
import posixpath
import re
import shutil
import tempfile
import uuid
from pathlib import Path

import pyarrow.fs as pafs

from n2n_core import load_checkpoint
from n2n_core.tensorfile import CheckpointError
from pipeline.storage.locations import resolve
from pipeline.storage.uri_writes import write_then_move

MARKER = "n2n-run.json"
CHECKPOINT_DIR = "checkpoints"
FINAL_MODEL = "model.n2n"
METRICS = "metrics.jsonl"
PLOT = "training.png"
_CKPT = re.compile(r"^step-(\d{8})\.n2n$")
_CHUNK = 8 << 20


def checkpoint_name(step: int) -> str:
    return f"{CHECKPOINT_DIR}/step-{step:08d}.n2n"


class RunDir:
    """The files of one run under `out` (a local path or a URI).

    `local` is a folder on this machine holding the files written in place: `out` itself
    for a local run, a temporary staging folder (removed by `close`) for a remote one.
    """

    def __init__(self, out):
        self.out = str(out)
        self.fs, root = resolve(out)
        self.root = root.rstrip("/")
        self.remote = not isinstance(self.fs, pafs.LocalFileSystem)
        self._staging = tempfile.mkdtemp(prefix="n2n-run-") if self.remote else None
        self.local = Path(self._staging) if self.remote else Path(self.root)

    def where(self, name: str) -> str | Path:
        """What to show a user for file `name`: its local path, or its URI."""
        if not self.remote:
            return self.local / name
        base, sep, query = self.out.partition("?")
        return f"{base.rstrip('/')}/{name}" + (f"?{query}" if sep else "")

    def _path(self, name: str) -> str:
        return f"{self.root}/{name}"

    def ownership_problem(self) -> str | None:
        """Why this run may not write into `out` (None when it may): `out` exists and is not
        a folder, or holds anything without being an n2n run (see the module docstring).
        Reads only; an unreachable object store is a problem too."""
        try:
            info = self.fs.get_file_info(self.root)
            if info.type == pafs.FileType.NotFound:
                return self._creatable()
            if info.type != pafs.FileType.Directory:
                return "exists and is not a folder"
            entries = self.fs.get_file_info(pafs.FileSelector(self.root, allow_not_found=True))
        except (OSError, ValueError) as error:
            return f"cannot be read: {error}"
        names = {entry.base_name: entry.type for entry in entries}
        if not names or names.get(MARKER) == pafs.FileType.File or self.checkpoints():
            return None
        if MARKER in names:
            return f"{MARKER} is not a file"
        return (f"is not empty and holds no n2n run (no {MARKER}, no checkpoints/step-*.n2n): n2n trains only into "
                f"a new or empty folder, or a run folder it made, and never replaces files it did not write; "
                f"choose another --out")

    def _creatable(self) -> str | None:
        """For a local `out` that does not exist yet: the folder it would be made in is a folder."""
        if self.remote:
            return None
        parent = Path(self.root).parent
        while not parent.exists() and not parent.is_symlink():
            parent = parent.parent
        if not parent.is_dir():
            return f"cannot be created: {parent} is not a folder"
        if not os.access(parent, os.W_OK | os.X_OK):
            return f"cannot be created: {parent} is not writable"
        return None

    def create(self) -> None:
        """Make the run folder and mark it as n2n's (the marker first); refuses a folder that
        is not n2n's (checked again: it may have changed since the preflight)."""
        problem = self.ownership_problem()
        if problem:
            from pipeline.errors import UsageError

            raise UsageError(f"--out {self.out!r} {problem}")
        self.fs.create_dir(self.root, recursive=True)
        if self.fs.get_file_info(self._path(MARKER)).type != pafs.FileType.File:
            self.mark()
        self.fs.create_dir(self._path(CHECKPOINT_DIR), recursive=True)
        self.local.mkdir(parents=True, exist_ok=True)

    def mark(self) -> None:
        """Write the marker into the existing folder `out`, without checks: for a caller that
        owns the folder already (a sweep's trial folder, inside the sweep's own folder)."""
        data = json.dumps({"n2n": "training run", "files": [CHECKPOINT_DIR + "/", FINAL_MODEL, METRICS, PLOT]}) + "\n"
        if not self.remote:
            tmp = self.local / f".{MARKER}.{uuid.uuid4().hex}.tmp"
            tmp.write_text(data)
            os.replace(tmp, self.local / MARKER)
            return
        with tempfile.TemporaryDirectory(prefix="n2n-marker-") as folder:
            path = Path(folder) / MARKER
            path.write_text(data)
            self.upload(path, MARKER)

    def checkpoints(self) -> list[tuple[int, str]]:
        """(step, name) of the step checkpoints, oldest first (names relative to the run)."""
        selector = pafs.FileSelector(self._path(CHECKPOINT_DIR), allow_not_found=True)
        found = []
        for info in self.fs.get_file_info(selector):
            match = _CKPT.match(info.base_name)
            if match and info.type == pafs.FileType.File:
                found.append((int(match.group(1)), f"{CHECKPOINT_DIR}/{info.base_name}"))
        return sorted(found)

    def write_checkpoint(self, name: str, save) -> None:
        """`save(path)` writes a checkpoint file at a local path; it lands at `name` atomically."""
        if not self.remote:
            save(self.local / name)  # n2n_core writes a temporary file and renames it
            return
        with tempfile.TemporaryDirectory(prefix="n2n-ckpt-") as tmp:
            path = Path(tmp) / posixpath.basename(name)
            save(path)
            self.upload(path, name)

    def read_checkpoint(self, name: str):
        """The n2n_core Checkpoint at `name`; errors name the URI."""
        if not self.remote:
            return load_checkpoint(self.local / name)
        with tempfile.TemporaryDirectory(prefix="n2n-ckpt-") as tmp:
            path = Path(tmp) / posixpath.basename(name)
            if not self.download(name, path):
                raise CheckpointError(self.where(name), "not found")
            try:
                return load_checkpoint(path)
            except CheckpointError as e:
                raise CheckpointError(self.where(name), e.reason) from None

    def delete(self, name: str) -> None:
        try:
            self.fs.delete_file(self._path(name))
        except FileNotFoundError:
            pass

    def upload(self, path: Path, name: str) -> None:
        """Copy local file `path` to `name`: a temporary object first, then moved into place."""
        final = self._path(name)
        parent = posixpath.dirname(final)
        tmp = f"{parent}/.{posixpath.basename(final)}.{uuid.uuid4().hex}.tmp"

        def copy(sink) -> None:
            with open(path, "rb") as source:
                while chunk := source.read(_CHUNK):
                    sink.write(chunk)

        write_then_move(self.fs, tmp, final, copy)

    def download(self, name: str, path: Path) -> bool:
        """Copy `name` to local file `path`; False when there is no such file."""
        return _fetch(self.fs, self._path(name), path)

    def sync(self, *names: str) -> None:
        """Upload the staged files `names` (remote runs; nothing to do for a local one)."""
        if self.remote:
            for name in names:
                if (self.local / name).is_file():
                    self.upload(self.local / name, name)

    def close(self) -> None:
        if self._staging is not None:
            shutil.rmtree(self._staging, ignore_errors=True)
            self._staging = None



def _fetch(fs: pafs.FileSystem, path: str, local: Path) -> bool:
    """Copy file `path` of `fs` to the local file `local`; False when there is no such file."""
    if fs.get_file_info(path).type != pafs.FileType.File:
        return False
    with fs.open_input_stream(path) as source, open(local, "wb") as sink:
        while chunk := source.read(_CHUNK):
            sink.write(chunk)
    return True


def read_checkpoint(path_or_uri):
    """The n2n_core Checkpoint of a local path or a URI (`--init-from`); errors name it."""
    fs, path = resolve(path_or_uri)
    if isinstance(fs, pafs.LocalFileSystem):
        return load_checkpoint(path_or_uri)
    with tempfile.TemporaryDirectory(prefix="n2n-ckpt-") as tmp:
        local = Path(tmp) / posixpath.basename(path)
        if not _fetch(fs, path, local):
            raise CheckpointError(str(path_or_uri), "not found")
        try:
            return load_checkpoint(local)
        except CheckpointError as e:
            raise CheckpointError(str(path_or_uri), e.reason) from None
