"""`Denoiser`: an n2n model loaded once, denoising arrays, PIL images, tensors and folders.

    denoiser = Denoiser.load("default", device="auto", strength=1.0, self_ensemble=False, tile=512)
    clean = denoiser.denoise(noisy)                  # the same kind, shape and dtype as `noisy`
    clean = denoiser.denoise(noisy, strength=0.7)    # any setting, for one call
    summary = denoiser.denoise_folder("noisy/", "clean/")   # the bulk job (Ray), like `n2n denoise`
    denoiser.export("denoiser.onnx")                 # like `n2n export`

`denoise` runs in this process on `device` with the tiling, padding, self-ensemble and
strength of `n2n denoise` (pipeline.inference.tiling.denoise_image), so one image gives
the same result both ways. The kinds of input it takes: n2n/images.py.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch

from n2n.images import unpack

_UNSET = object()


def _device(device) -> torch.device:
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


class Denoiser:
    """An n2n denoising model with its settings.

    Args:
        model: an n2n_core model (built by `n2n_core.build_model` or loaded from a checkpoint).
        source: where it came from ("default", a checkpoint path or a URI), for
            `denoise_folder` and `export`; None for a model only in memory.
        device: "auto" (CUDA when available, else the CPU), "cpu", "cuda", "cuda:1" or a
            torch.device; the model is moved there.
        strength: the correction applied, in [0, 1]: noisy + strength x (denoised - noisy).
        self_ensemble: average the model over the 8 flips and rotations (8 passes).
        tile: tile side in pixels for large images; 0 or None runs whole images.
        overlap: context pixels around each tile.

    Attributes:
        model: the n2n_core model (eval mode) on `device`.
        size_multiple: what the network's input height and width must be multiples of
            (`denoise` pads any image to it).
    """

    def __init__(self, model, *, source: str | None = None, device="auto", strength: float = 1.0,
                 self_ensemble: bool = False, tile: int | None = 512, overlap: int = 32):
        _check_settings(strength, self_ensemble, tile, overlap)
        self.device = _device(device)
        self.model = model.to(device=self.device).eval()
        self.source = source
        self.strength, self.self_ensemble, self.tile, self.overlap = float(strength), self_ensemble, tile, overlap

    @classmethod
    def load(cls, model: str = "default", *, device="auto", strength: float = 1.0, self_ensemble: bool = False,
             tile: int | None = 512, overlap: int = 32) -> "Denoiser":
        """Load "default" (the built-in model), a checkpoint path or a URI (s3://, gs://, file://).

        Raises pipeline.errors.UsageError (a ValueError) naming `model` when it cannot be read."""
        from pipeline.model_files.source import read_model

        loaded = read_model(model, option="model")
        return cls(loaded.checkpoint.model, source=loaded.source, device=device, strength=strength,
                   self_ensemble=self_ensemble, tile=tile, overlap=overlap)

    @property
    def size_multiple(self) -> int:
        return int(getattr(self.model, "size_multiple", 1))

    def __repr__(self) -> str:
        config = self.model.config
        return (f"Denoiser({self.source or 'in memory'}: {config.name} {dict(config.kwargs)}, device={self.device}, "
                f"strength={self.strength}, self_ensemble={self.self_ensemble}, tile={self.tile})")

    def denoise(self, image, *, strength=_UNSET, self_ensemble=_UNSET, tile=_UNSET, overlap=_UNSET):
        """The denoised `image`, of the same kind: a numpy array (H, W) or (H, W, C) of uint8,
        uint16 or float in [0, 1]; a PIL image; or a torch tensor (H, W), (C, H, W) or
        (N, C, H, W) (n2n/images.py). Settings given here apply to this call only."""
        strength = self.strength if strength is _UNSET else strength
        self_ensemble = self.self_ensemble if self_ensemble is _UNSET else self_ensemble
        tile = self.tile if tile is _UNSET else tile
        overlap = self.overlap if overlap is _UNSET else overlap
        _check_settings(strength, self_ensemble, tile, overlap)
        from pipeline.inference.tiling import denoise_image

        parts = unpack(image)
        outputs = [denoise_image(self.model, pixels, tile=tile or None, overlap=overlap, self_ensemble=self_ensemble,
                                 strength=float(strength)) for pixels in parts.images]  # (C, H, W) float32
        return parts.pack(outputs)

    def denoise_folder(self, input, output, *, verbose: bool = False, **options):
        """Run the bulk job of `n2n denoise IN OUT` with this model and settings; returns its
        DenoiseSummary. `options` are DenoiseConfig's other fields (workers, batch_size,
        overwrite, compare, address, progress, ...). Ray's logs go to a log file whose path
        is printed once (`verbose=True` shows them here instead)."""
        import tempfile

        from pipeline.runtime.console import quiet_console
        from pipeline.inference.config import DenoiseConfig
        from pipeline.inference.job import run_denoise

        settings = dict(tile=self.tile or None, overlap=self.overlap, self_ensemble=self.self_ensemble,
                        strength=self.strength, device="cuda" if self.device.type == "cuda" else "cpu")
        settings.update(options)
        with tempfile.TemporaryDirectory(prefix="n2n-model-") as folder:
            model = None if self.source == "default" else self.source
            if self.source is None:  # a model only in memory: the job's actors read it from a file
                from n2n_core import save_checkpoint

                model = os.path.join(folder, "model.n2n")
                save_checkpoint(model, self.model)
            config = DenoiseConfig(input=os.fspath(input), output=os.fspath(output), model=model, **settings)
            with quiet_console("denoise", verbose=verbose):
                return run_denoise(config)

    def export(self, output, format: str | None = None, **package):
        """Write this model as `n2n export` does (onnx, torch or bioimageio; docs/export.md);
        returns the ExportResult. `package`: PackageInfo fields for bioimageio (name, authors,
        maintainers, license, description)."""
        from pipeline.export.bioimageio_format import PackageInfo
        from pipeline.export.run import ExportConfig, run_export
        from pipeline.model_files.source import ModelSource, describe

        label = describe(self.source, step=None) if self.source else "a model in memory"
        loaded = ModelSource(_Held(self.model), self.source or "", self.source or "", label)
        config = ExportConfig(model=self.source or "", output=os.fspath(output), format=format,
                              package=PackageInfo(**package))
        return run_export(config, loaded=loaded)


class _Held:
    """A model already loaded, in the shape of a Checkpoint for run_export."""

    def __init__(self, model):
        self.model, self.step = model, 0


def _check_settings(strength, self_ensemble, tile, overlap) -> None:
    if isinstance(strength, bool) or not isinstance(strength, (int, float)) or not 0.0 <= strength <= 1.0:
        raise ValueError(f"strength must be a number from 0 to 1, got {strength!r}")
    if not isinstance(self_ensemble, bool):
        raise ValueError(f"self_ensemble must be True or False, got {self_ensemble!r}")
    if tile is not None and (isinstance(tile, bool) or not isinstance(tile, int) or tile < 0):
        raise ValueError(f"tile must be a tile side in pixels (0 or None: whole images), got {tile!r}")
    if isinstance(overlap, bool) or not isinstance(overlap, int) or overlap < 0:
        raise ValueError(f"overlap must be an integer >= 0, got {overlap!r}")
