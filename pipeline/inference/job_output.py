"""The bulk job's OUT: a local folder (or a shared mount) or a prefix on an object store,
behind one interface, so the job never asks which one it has.

    out = output_at(config.output)    # checked (preflight.py): new, empty or n2n's; nothing created
    out.read_state()                  # what earlier runs did (its manifest and unmerged shards)
    with out.open(run, context):      # OUT and its manifest made; the manifest lock held (local)
        out.merge_staging(); out.create_staging(); out.check_shared(device); ...

`LocalOutput` builds on outputs.py and manifest.py, `RemoteOutput` on remote.py; both keep
the same layout and rules (docs/denoise.md).
"""
from __future__ import annotations

import contextlib
import os
from pathlib import Path

import pyarrow.fs as pafs

from pipeline.errors import UsageError
from pipeline.inference.manifest import MANIFEST_NAME, ManifestWriter, OutputBusyError, read_state
from pipeline.inference.outputs import (
    PART_NAME, create_staging, fence_staging, remove_parts, remove_staging, staging_dir,
)
from pipeline.inference.preflight import check_output, check_remote_output, make_output
from pipeline.inference.remote import RemoteManifestWriter, RemoteOut, RemoteTree, create_live, read_remote_state
from pipeline.storage.locations import is_remote, local_path


def output_at(given: str) -> "LocalOutput | RemoteOutput":
    """OUT as the user named it (a path or a URI), checked before anything is created."""
    if is_remote(given):
        return RemoteOutput(RemoteOut(given))
    return LocalOutput(local_path(given), given)


class _Output:
    """What the job asks of its OUT. `open(run, context)` makes OUT and its manifest writer
    (`self.manifest`) and returns self, a context manager that closes the writer."""

    run: str

    def where(self, name: str = "") -> str:
        """OUT (or `name` in it) as shown to the user."""
        raise NotImplementedError

    def actor_root(self) -> str:
        """OUT as the actors open it: an absolute path, or the URI with its query."""
        raise NotImplementedError

    def check_shared(self, device: str) -> str:
        """Refuse (UsageError, after `undo`) when an actor's node may not see OUT; returns the
        marker token the actors check ("" when no check is needed)."""
        return ""

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        pass


class LocalOutput(_Output):
    """OUT as a local folder (or a shared mount): the manifest lock, staging folders, parts."""

    def __init__(self, path: str, given: str):
        check_output(path)
        self.path, self.root, self.given = path, Path(path), given
        self.manifest_path = self.root / MANIFEST_NAME

    def open(self, run: str, context: dict | None = None) -> "LocalOutput":
        self.run, self.created = run, not os.path.lexists(self.root)
        make_output(self.path)
        had_manifest = os.path.lexists(self.manifest_path)
        try:
            self.manifest = ManifestWriter(self.manifest_path, run, context)
        except OutputBusyError:
            raise UsageError(f"OUT {self.given!r}: another n2n run is writing it; wait for it to end") from None
        except OSError as e:
            raise UsageError(f"OUT {self.given!r} is not writable: {e.strerror or e}") from None
        self.created_manifest = not had_manifest
        return self

    def where(self, name: str = "") -> str:
        return str(self.root / name) if name else str(self.root)

    def actor_root(self) -> str:
        return os.path.abspath(self.root)

    def read_state(self):
        return read_state(self.manifest_path)

    def merge_staging(self) -> None:
        _merge_staging(self.root, self.manifest)

    def tree(self):
        return self.root

    def remove_parts(self, names) -> None:
        remove_parts(self.root, names)

    def create_staging(self) -> None:
        create_staging(self.root, self.run)

    def undo(self) -> None:
        """A refused start: remove what this run created (its staging folder; the manifest and
        OUT when this run made them and they are still empty)."""
        remove_staging(self.root, staging_dir(self.root, self.run))
        self.manifest.close()
        if self.created_manifest and self.manifest_path.stat().st_size == 0:
            self.manifest_path.unlink()
            if self.created:
                with contextlib.suppress(OSError):
                    self.root.rmdir()

    def check_shared(self, device: str) -> str:
        """Actors possibly on other nodes: the marker check of shared_storage.py."""
        from pipeline.inference.shared_storage import NotSharedError, check_nodes, needs_check, write_marker

        if not needs_check(device):
            return ""
        try:
            token = write_marker(str(self.root), self.run)
            check_nodes(str(self.root), self.run, token, device)
        except NotSharedError as e:
            self.undo()
            raise UsageError(str(e).replace(repr(str(self.root)), repr(self.given), 1)) from None
        return token

    def close(self) -> None:
        self.manifest.close()


class RemoteOutput(_Output):
    """OUT on an object store (remote.py): no lock; staging fenced by its `_live` object."""

    def __init__(self, out: RemoteOut):
        check_remote_output(out)
        self.out = out

    def open(self, run: str, context: dict | None = None) -> "RemoteOutput":
        self.run = run
        self.manifest = RemoteManifestWriter(self.out, run, context)
        try:  # first of all, as locally: a killed first run leaves an OUT that says it is n2n's
            if self.out.info(MANIFEST_NAME).type == pafs.FileType.NotFound:
                self.out.put(MANIFEST_NAME, b"")
        except OSError as e:
            raise UsageError(f"OUT {self.out.where()!r} is not writable: {e}") from None
        return self

    def where(self, name: str = "") -> str:
        return self.out.where(name)

    def actor_root(self) -> str:
        return self.out.uri

    def read_state(self):
        return read_remote_state(self.out)

    def merge_staging(self) -> None:
        self.manifest.merge_all()

    def tree(self):
        return RemoteTree(self.out)

    def remove_parts(self, names) -> None:
        for name in sorted(names):
            if PART_NAME.fullmatch(name):
                self.out.delete(name)

    def create_staging(self) -> None:
        create_live(self.out, self.run)

    def undo(self) -> None:
        self.manifest.merge_all()


def _merge_staging(root: Path, manifest: ManifestWriter) -> None:
    """Fence off every staging folder under OUT, merge its shards into the main manifest,
    then delete it (not before: a failed merge leaves it for the next run)."""
    for folder in fence_staging(root):
        manifest.merge_staging(folder)
        remove_staging(root, folder)
    remove_staging(root)


def read_manifest(manifest: str | os.PathLike) -> dict[str, dict]:
    """The latest record per input key of an OUT's manifest ({} if none): the main file, then
    the shards of runs not merged yet. `manifest`: the path of `OUT/_manifest.jsonl`, or its
    URI (file:// or an object store's, a query such as `?endpoint_override=...` kept)."""
    text = os.fspath(manifest)
    if is_remote(text):
        base, sep, query = text.partition("?")
        return read_remote_state(RemoteOut(base.rsplit("/", 1)[0] + sep + query)).latest
    return read_state(local_path(text)).latest
