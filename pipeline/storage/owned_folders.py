"""Folders n2n writes into: new, empty, or marked as n2n's own.

A command that writes several files into a folder it names (`n2n demo --out`) first
claims the folder: it may be absent (it is made), empty, or hold the command's marker
file (`n2n-demo.json` for the demo, written when the folder is claimed), so a rerun
goes on where the last one wrote. Any other folder, someone's photos or a project
folder that happens to hold a `train/` or `clean/`, is refused before anything is
written (a `UsageError`, exit status 2). Training runs have the same rule for object
stores too (`pipeline.training.run_dir`); the bulk job's marker is its manifest.
"""
from __future__ import annotations

import json
import os
import uuid
from pathlib import Path

from pipeline.errors import UsageError


def claim_folder(path, marker: str, *, option: str, what: str, legacy: tuple[str, ...] = ()) -> Path:
    """Make `path` n2n's for this command, or refuse: returns the folder, made if needed.

    `legacy`: names that together mark a folder an older n2n wrote (accepted and marked)."""
    folder = Path(path)
    if not os.fspath(path):
        raise UsageError(f"{option} must name a folder")
    if folder.exists() and not folder.is_dir():
        raise UsageError(f"{option} {os.fspath(path)!r} exists and is not a folder")
    if folder.is_dir():
        names = set(os.listdir(folder))
        ours = marker in names and (folder / marker).is_file() and not (folder / marker).is_symlink()
        older = bool(legacy) and set(legacy) <= names
        if names and not ours and not older:
            raise UsageError(f"{option} {os.fspath(path)!r} is not empty and holds no {marker}: n2n writes {what} "
                             f"only into a new or empty folder, or one it made, and never replaces files it did "
                             f"not write; choose another {option}")
        if ours:
            return folder
    else:
        try:
            folder.mkdir(parents=True)
        except OSError as error:
            raise UsageError(f"{option} {os.fspath(path)!r} cannot be created: {error.strerror or error}") from None
    tmp = folder / f".{marker}.{uuid.uuid4().hex}.tmp"
    tmp.write_text(json.dumps({"n2n": what}) + "\n")
    os.replace(tmp, folder / marker)
    return folder
