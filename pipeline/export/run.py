"""`n2n export MODEL OUT --format onnx|torch|bioimageio`: one model, written for another tool.

    onnx        OUT.onnx: the network, dynamic batch, height and width (onnx_format.py)
    torch       OUT/ (a new folder): n2n_model.py (torch.nn, torch alone) and
                n2n_model.safetensors (torch_format.py)
    bioimageio  OUT.zip: a BioImage Model Zoo package (bioimageio_format.py)

MODEL is "default" (the built-in model), a checkpoint path or a URI (pipeline.model_files.source).
Without --format the format follows OUT's suffix (.onnx, .zip); a torch export needs
--format torch. Every check that can refuse the command comes before anything is read
or written; OUT is then built beside itself and named in one step that never replaces
anything (destination.py).
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.errors import UsageError
from pipeline.export.bioimageio_format import PackageInfo
from pipeline.storage.names import printable

FORMATS = ("onnx", "torch", "bioimageio")
SUFFIXES = {"onnx": ".onnx", "bioimageio": ".zip"}


@dataclass(frozen=True)
class ExportConfig:
    """One export; each field is an argument or option of `n2n export`."""

    model: str  # "default", a checkpoint path or a URI
    output: str  # the new file (onnx: .onnx, bioimageio: .zip) or folder (torch)
    format: str | None = None  # onnx, torch or bioimageio; None: from OUT's suffix
    package: PackageInfo = field(default_factory=PackageInfo)  # bioimageio: name, authors, licence

    def resolved_format(self) -> str:
        """The format, checked against OUT's name (a UsageError naming both when they disagree)."""
        out = os.fspath(self.output) if self.output is not None else ""
        suffix = Path(out).suffix.lower()
        chosen = self.format
        if chosen is None:
            chosen = next((name for name, ending in SUFFIXES.items() if suffix == ending), None)
            if chosen is None:
                raise UsageError(f"--format is needed for OUT {out!r}: onnx (OUT ending in .onnx), torch (a new "
                                 f"folder) or bioimageio (OUT ending in .zip)")
        if chosen not in FORMATS:
            raise UsageError(f"--format must be one of {', '.join(FORMATS)}, got {chosen!r}")
        wanted = SUFFIXES.get(chosen)
        if wanted and suffix != wanted:
            raise UsageError(f"--format {chosen}: OUT must end in {wanted}, got {out!r}")
        if chosen == "torch" and suffix in (".onnx", ".zip", ".py", ".safetensors"):
            raise UsageError(f"--format torch: OUT names the new folder that will hold n2n_model.py and "
                             f"n2n_model.safetensors, got {out!r}")
        return chosen


@dataclass(frozen=True)
class ExportResult:
    format: str
    output: Path
    files: tuple[str, ...]  # what OUT holds (the zip's members for bioimageio)
    size_multiple: int
    in_channels: int

    def format_line(self) -> str:
        size = sum(f.stat().st_size for f in ([self.output] if self.output.is_file() else self.output.iterdir()))
        what = {"onnx": "ONNX model, opset 18", "torch": "torch.nn module + safetensors weights",
                "bioimageio": "BioImage Model Zoo package"}[self.format]
        amount = f"{size / 1e6:.1f} MB" if size >= 1e6 else f"{size / 1e3:.0f} kB"
        return (f"wrote {printable(str(self.output))} ({what}, {amount}): input (batch, {self.in_channels}, height, width) "
                f"float32 in [0, 1], height and width multiples of {self.size_multiple} (docs/export.md)")


def run_export(config: ExportConfig, loaded=None) -> ExportResult:
    """Write the export `config` asks for; UsageError (nothing written) when it cannot.

    `loaded`: a ModelSource already in memory (the API's `Denoiser.export`); None reads
    `config.model`."""
    from pipeline.export.destination import check_destination, place_file, place_folder, staging_beside
    from pipeline.model_files.source import read_model

    chosen = config.resolved_format()
    out = check_destination(config.output)
    loaded = loaded or read_model(config.model, option="MODEL")
    model = loaded.checkpoint.model.eval()
    label = loaded.label
    if chosen in ("onnx", "bioimageio"):
        from pipeline.export.onnx_format import require_onnx

        require_onnx()
    with staging_beside(out) as staging:
        if chosen == "torch":
            from pipeline.export.torch_format import write_torch_files

            built = staging / "export"
            built.mkdir()
            files = tuple(p.name for p in write_torch_files(model, built, label))
            place_folder(built, out)
        else:
            if chosen == "onnx":
                from pipeline.export.onnx_format import onnx_bytes

                data, files = onnx_bytes(model, label), (out.name,)
            else:
                import zipfile

                from pipeline.export.bioimageio_format import package_bytes

                data = package_bytes(model, label, config.package)
                files = ()
            built = staging / out.name
            built.write_bytes(data)
            if chosen == "bioimageio":
                with zipfile.ZipFile(built) as archive:
                    files = tuple(archive.namelist())
            place_file(built, out)
    return ExportResult(chosen, out, files, int(model.size_multiple), int(model.config.kwargs["in_channels"]))
