"""`n2n average`: a checkpoint whose weights are the weighted mean of other checkpoints'.

The inputs are n2n checkpoints of one architecture (training checkpoints or exported
models); the output holds the averaged model alone, no optimizer state: an average has no
Adam moments of its own, so it trains on with `n2n train --init-from OUT` (a fresh
optimizer), not with `--resume`. Its metadata says where it came from: `extra.averaged_from`
lists each source's file name, step, weight (scaled to sum to 1) and training config, and
its step is the largest of the sources' steps.

The output is written to a temporary name beside it and then linked into place, so a
crash leaves no half-written file and an existing file (or symlink) of that name is never
replaced, not even one made meanwhile by another process.
"""
from __future__ import annotations

import errno
import os
import uuid
from dataclasses import dataclass
from pathlib import Path

from n2n_core import average_models, load_checkpoint, save_checkpoint
from n2n_core.average import normalized_weights
from pipeline.storage.locations import is_uri


@dataclass(frozen=True)
class AverageConfig:
    """sources: checkpoint paths, or "default" for the built-in model (two or more); destination: the new file (must not exist);
    weights: one per source (scaled to sum to 1), None for the plain mean."""

    sources: tuple[str, ...]
    destination: str
    weights: tuple[float, ...] | None = None

    def __post_init__(self):
        if len(self.sources) < 2:
            raise ValueError(f"give at least 2 checkpoints to average, got {len(self.sources)}")
        for path in (*self.sources, self.destination):
            if is_uri(path):
                raise ValueError(f"{path}: n2n average reads and writes local files only")
        try:
            normalized_weights(self.weights, len(self.sources))
        except ValueError as e:
            raise ValueError(f"--weights: {e}") from None
        if not os.fspath(self.destination):
            raise ValueError("--out must name the new checkpoint file, got ''")
        if os.path.lexists(self.destination):
            raise ValueError(f"--out {self.destination}: exists; n2n average never replaces a file, choose a new name")
        parent = Path(os.path.abspath(self.destination)).parent
        while not parent.exists() and not parent.is_symlink():
            parent = parent.parent
        if not parent.is_dir():
            raise ValueError(f"--out {self.destination}: a folder on the way is a file ({parent})")


def average_checkpoints(config: AverageConfig) -> Path:
    """Average `config.sources` into `config.destination`; returns its path.

    Raises CheckpointError (a source cannot be read), ValueError (the sources do not fit
    together, or the destination was made meanwhile), OSError (writing failed). The
    destination's checks (`AverageConfig`) come before any source is read.
    """
    shares = normalized_weights(config.weights, len(config.sources))
    loaded = [load_checkpoint(_checkpoint_path(path)) for path in config.sources]
    model = average_models([c.model for c in loaded], shares, names=[os.fspath(p) for p in config.sources])
    extra = {"averaged_from": [
        {"file": os.path.basename(os.fspath(path)), "step": c.step, "weight": share, "config": c.config}
        for path, c, share in zip(config.sources, loaded, shares)
    ]}
    destination = Path(config.destination)
    try:
        destination.parent.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise ValueError(f"{destination}: a folder on the way is a file") from None
    staging = destination.parent / f".{destination.name[:200]}.{uuid.uuid4().hex}.tmp"
    save_checkpoint(staging, model, step=max(c.step for c in loaded), config=None, extra=extra)
    try:
        _place_without_replacing(staging, destination)
    finally:
        if staging.exists():
            staging.unlink()
    return destination


def _checkpoint_path(source: str):
    """A source's file: "default" is the built-in model, as for --model elsewhere."""
    if source == "default":
        from pipeline.assets import default_model_path

        return default_model_path()
    return source


def _place_without_replacing(staging: Path, destination: Path) -> None:
    """Give the finished file `staging` the name `destination`, failing if that name exists."""
    try:
        os.link(staging, destination)  # atomic, and refuses an existing name (a symlink included)
    except FileExistsError:
        raise ValueError(f"{destination}: exists (made while averaging); not replaced") from None
    except OSError as e:
        if e.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV):
            raise
        if os.path.lexists(destination):  # a file system without hard links: check, then rename
            raise ValueError(f"{destination}: exists (made while averaging); not replaced") from None
        os.rename(staging, destination)
