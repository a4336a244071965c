"""Where a model comes from: "default" (the built-in model), a checkpoint path, or a URI.

`read_model(source)` returns the loaded checkpoint and a label naming it; every problem is
a one-line `UsageError` naming the option (`MODEL` of `n2n export`, the argument of
`Denoiser.load`). "default" always means the built-in model (a file of that name is
`./default`). A URI (`s3://`, `gs://`, `file://`) is read through `pyarrow.fs` into memory
with the same size bound as a local file; nothing is ever unpickled (n2n_core.checkpoint).
"""
from __future__ import annotations

import os
from dataclasses import dataclass

from pipeline.errors import UsageError

DEFAULT = "default"


@dataclass(frozen=True)
class ModelSource:
    """A loaded model and where it came from.

    `checkpoint`: n2n_core's Checkpoint (`.model` in training mode on the CPU);
    `source`: what was asked for ("default", a path or a URI); `path`: the checkpoint's
    path or URI ("default" resolved to the packaged file); `label`: what it is in a few
    words, for messages and exported metadata (`describe`)."""

    checkpoint: object
    source: str
    path: str
    label: str


def describe(source: str, step: int | None) -> str:
    """"the n2n default model", or "checkpoint NAME (step N)" for a path or URI."""
    if source == DEFAULT:
        return "the n2n default model"
    name = os.path.basename(source.split("?", 1)[0].rstrip("/")) or source
    return f"checkpoint {name}" + (f" (step {step})" if step is not None else "")


def _uri_bytes(uri: str, option: str) -> bytes:
    import pyarrow.fs as pafs

    from n2n_core.tensorfile import MAX_FILE_BYTES
    from pipeline.storage.locations import resolve

    try:
        fs, path = resolve(uri)
        info = fs.get_file_info(path)
        if info.type != pafs.FileType.File:
            raise UsageError(f"{option} {uri!r}: no such file")
        if info.size is not None and info.size > MAX_FILE_BYTES:
            raise UsageError(f"{option} {uri!r}: {info.size} bytes is larger than the {MAX_FILE_BYTES} allowed")
        with fs.open_input_stream(path) as f:
            return f.read()
    except (OSError, ValueError) as e:
        if isinstance(e, UsageError):
            raise
        raise UsageError(f"{option} {uri!r} cannot be reached: {e}") from None


def read_model(source, *, option: str = "MODEL") -> ModelSource:
    """Load `source` ("default", a checkpoint path or a URI) on the CPU, or raise UsageError."""
    from n2n_core import CheckpointError, load_checkpoint
    from pipeline.storage.locations import is_uri, local_path

    text = os.fspath(source) if source is not None else DEFAULT
    if not isinstance(text, str) or not text:
        raise UsageError(f"{option} must be 'default', a checkpoint path or a URI, got {source!r}")
    try:
        if text == DEFAULT:
            from pipeline.assets import NoDefaultModelError, default_model_path

            try:
                path = str(default_model_path())
            except NoDefaultModelError as e:
                raise UsageError(f"{option} default: {e}") from None
            return ModelSource(load_checkpoint(path, name="the default model"), text, path, describe(text, None))
        if is_uri(text) and local_path(text) is None:
            checkpoint = load_checkpoint(_uri_bytes(text, option), name=text)
        else:
            checkpoint = load_checkpoint(local_path(text), name=text)
    except CheckpointError as e:
        raise UsageError(f"{option} {e}") from None
    except OSError as e:
        raise UsageError(f"{option} {text!r}: {e.strerror or e}") from None
    return ModelSource(checkpoint, text, text, describe(text, checkpoint.step))
