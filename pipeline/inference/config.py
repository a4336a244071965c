"""The bulk denoising job's settings (`DenoiseConfig`, one field per `n2n denoise` option)
and what a run did (`DenoiseSummary`)."""
from __future__ import annotations

import os
from dataclasses import dataclass, field

from pipeline.data.images import DEFAULT_MAX_PIXELS as IMAGES_MAX_PIXELS
from pipeline.errors import UsageError
from pipeline.inference.tiling import PRECISIONS
from pipeline.storage.names import printable

# Pixel-bomb guard: larger images fail when decoded. The same default as pipeline.data.images
# (Pillow's MAX_IMAGE_PIXELS, 89.5 MP), since Pillow's own check also applies: a larger
# --max-pixels has no effect unless the application raises Image.MAX_IMAGE_PIXELS too.
DEFAULT_MAX_PIXELS = IMAGES_MAX_PIXELS


@dataclass(frozen=True)
class DenoiseConfig:
    """One denoising job; each field is one option of `n2n denoise`."""

    input: str  # a folder tree of images, a Parquet file or a folder of Parquet files
    output: str  # a folder (mirrored tree) or a path ending in .parquet (folder of parts)
    model: str | None = None  # checkpoint; None: the built-in default model
    tile: int | None = 512  # output tile side for large images; None or 0: whole images
    overlap: int = 32  # context pixels around each tile (rounded to the model's multiple)
    self_ensemble: bool = False  # average over the 8 flips and rotations (8 forward passes)
    strength: float = 1.0  # correction applied: noisy + strength (denoised - noisy); less keeps more texture
    precision: str = "float32"  # the model's dtype: float32, bfloat16 or float16
    workers: int | None = None  # actors; None: one per GPU, else one per core
    batch_size: int = 4  # images per actor call
    overwrite: bool = False  # redo inputs an earlier run finished
    compare: int = 0  # write before/after strips for this many sampled images
    address: str | None = None  # Ray cluster (pipeline.runtime.ray_session); None: RAY_ADDRESS, else a private Ray
    device: str = "auto"  # "auto" (GPU when the cluster has one), "cpu" or "cuda"
    max_pixels: int = DEFAULT_MAX_PIXELS  # larger images fail (decompression bombs)
    image_column: str = "image"  # Parquet input: the encoded image column
    key_column: str = "path"  # Parquet input: the key (relative path) column
    output_column: str = "denoised"  # Parquet output: the denoised image column
    progress: bool = True  # progress bar on stderr
    follow_symlinks: bool = False  # folder input: enter symlinked folders (each real folder once)

    def __post_init__(self):
        """Bad values are refused, never coerced (a negative overlap used to run, with seams)."""
        def positive(option, value, allow_none=False, minimum=1):
            if value is None and allow_none:
                return
            if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
                need = "a positive integer" if minimum == 1 else "an integer >= 0"
                raise UsageError(f"{option} must be {need}, got {value!r}")

        positive("--workers", self.workers, allow_none=True)
        positive("--batch-size", self.batch_size)
        positive("--tile", self.tile, allow_none=True, minimum=0)
        positive("--overlap", self.overlap, minimum=0)
        positive("--compare", self.compare, minimum=0)
        positive("--max-pixels", self.max_pixels)
        if isinstance(self.strength, bool) or not isinstance(self.strength, (int, float)) \
                or not 0.0 <= self.strength <= 1.0:
            raise UsageError(f"--strength must be a number from 0 to 1, got {self.strength!r}")
        if self.device not in ("auto", "cpu", "cuda"):
            raise UsageError(f"--device must be auto, cpu or cuda, got {self.device!r}")
        if self.precision not in PRECISIONS:
            raise UsageError(f"--precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        if self.model is not None and not os.fspath(self.model):
            raise UsageError(f"--model must name a checkpoint file, got {self.model!r} (leave it out for the "
                             f"built-in default model)")
        for option, value in (("IN", self.input), ("OUT", self.output), ("--image-column", self.image_column),
                              ("--key-column", self.key_column), ("--output-column", self.output_column)):
            if not isinstance(value, str) or not value:
                raise UsageError(f"{option} must be a non-empty string, got {value!r}")


@dataclass(frozen=True)
class DenoiseSummary:
    """What a run did. `failures` lists (key, reason) for every failed input; `stopped`
    says why the run ended early (then `total - done - skipped - failed` inputs were not
    processed), empty when it ran to the end."""

    total: int
    done: int
    skipped: int
    failed: int
    megapixels: float
    seconds: float
    output: str
    manifest: str
    failures: tuple = field(default_factory=tuple)
    stopped: str = ""
    redone: int = 0  # finished by an earlier run, redone because its input or the settings changed

    @property
    def not_processed(self) -> int:
        return self.total - self.done - self.skipped - self.failed

    @property
    def megapixels_per_s(self) -> float:
        return self.megapixels / self.seconds if self.seconds > 0 else 0.0

    @property
    def images_per_s(self) -> float:
        return self.done / self.seconds if self.seconds > 0 else 0.0

    def format(self, max_failures: int = 20) -> str:
        redone = f" ({self.redone} redone: their input or the settings changed)" if self.redone else ""
        lines = [
            f"{self.total} inputs: {self.done} done{redone}, {self.skipped} skipped, {self.failed} failed",
            f"{self.megapixels:.1f} MP in {self.seconds:.1f} s: {self.megapixels_per_s:.2f} MP/s, "
            f"{self.images_per_s:.2f} images/s",
            f"output: {self.output}  manifest: {self.manifest}",
        ]
        for key, reason in self.failures[:max_failures]:
            lines.append(f"  failed {printable(key)}: {printable(reason)}")
        if len(self.failures) > max_failures:
            lines.append(f"  ... and {len(self.failures) - max_failures} more (see the manifest)")
        if self.stopped:
            lines.append(f"stopped early: {self.stopped}")
            lines.append(f"{self.not_processed} inputs not processed; rerun the same command to resume")
        return "\n".join(lines)
