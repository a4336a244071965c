"""Files shipped inside the package: the built-in default denoising model.

`default_model_path()` is what `n2n denoise`, `n2n evaluate` and `n2n demo` use when no
`--model` is given: `default.n2n`, an n2n checkpoint holding the model alone (how it was
trained and what it measures: docs/default-model.md). An installation that lacks
the file (a build without package data) gets a clear error instead.
"""
from __future__ import annotations

from pathlib import Path

DEFAULT_MODEL_NAME = "default.n2n"


class NoDefaultModelError(FileNotFoundError):
    """The package holds no default model file; pass a checkpoint explicitly."""


def default_model_path() -> Path:
    """Path of the built-in default model checkpoint (pipeline/assets/default.n2n).

    Raises:
        NoDefaultModelError: the file is not in this installation.
    """
    path = Path(__file__).resolve().parent / DEFAULT_MODEL_NAME
    if not path.is_file():
        raise NoDefaultModelError(
            f"no default model in this installation ({path.name} is not in the package); "
            "pass --model CKPT with a checkpoint written by `n2n train`"
        )
    return path


def export_model(checkpoint, destination, *, note: str | None = None) -> Path:
    """Write the model of a training checkpoint alone (no optimizer state) to `destination`.

    This is how a training run's checkpoint becomes the shipped default model: the
    architecture, weights, step and run config are kept, so the file still says how it
    was trained; `note` (e.g. the measured PSNR) goes into its `extra` metadata.
    """
    from n2n_core import load_checkpoint, save_checkpoint

    source = load_checkpoint(checkpoint)
    extra = dict(source.extra or {})
    extra["exported_from_step"] = source.step
    if note:
        extra["note"] = note
    save_checkpoint(destination, source.model, step=source.step, config=source.config, extra=extra)
    return Path(destination)
