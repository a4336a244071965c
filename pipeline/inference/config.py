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
DEVICES = ("auto", "cpu", "cuda")


@dataclass(frozen=True)
class DenoiseConfig:
    """One denoising job; each field is one argument or option of `n2n denoise`."""

    # Each field is one argument or option of `n2n denoise` (pipeline.commands.options builds it
    # from the field, its default shown): `metadata` holds its help text and what click needs.
    input: str = field(metadata=dict(argument="IN"))  # a folder tree of images, a Parquet file or folder of them
    output: str = field(metadata=dict(argument="OUT"))  # a folder (mirrored tree) or a path ending in .parquet
    model: str | None = field(default=None, metadata=dict(  # None: the built-in default model
        help="Checkpoint to use, a path or a URI (default: the built-in default model)."))
    tile: int | None = field(default=512, metadata=dict(  # output tile side; None or 0: whole images
        min=0, help="Tile side for large images; 0 runs whole images."))
    overlap: int = field(default=32, metadata=dict(  # rounded to the model's multiple
        min=0, help="Context pixels around each tile."))
    self_ensemble: bool = field(default=False, metadata=dict(
        flag_only=True, help="Average the model over the 8 flips and rotations of each tile: 8 forward passes, "
                             "about +0.1 to +0.2 dB."))
    strength: float = field(default=1.0, metadata=dict(  # noisy + strength (denoised - noisy)
        min=0.0, max=1.0,
        help="How much of the model's correction to apply: noisy + strength x (denoised - noisy). "
             "Less keeps more texture (and more noise); `n2n assess --strength` shows the effect."))
    precision: str = field(default="float32", metadata=dict(  # the model's dtype
        choices=PRECISIONS,
        help="The model's arithmetic: bfloat16 and float16 halve its memory (more pixels per forward); "
             "bfloat16 costs about 0.02 dB on CBSD68 (docs/gpu.md)."))
    workers: int | None = field(default=None, metadata=dict(  # None: one per GPU, else one per core
        min=1, help="Most actors in the pool, which grows with the cluster (default: on GPUs one per GPU the "
                    "cluster has or adds, on CPUs one per core at the start)."))
    batch_size: int = field(default=4, metadata=dict(min=1, help="Images per actor call."))
    overwrite: bool = field(default=False, metadata=dict(
        flag_only=True, help="Redo inputs an earlier run finished (n2n's own outputs only)."))
    follow_symlinks: bool = field(default=False, metadata=dict(  # each real folder once
        flag_only=True, help="Folder IN: enter symlinked folders too (each real folder once; loops are cut)."))
    compare: int = field(default=0, metadata=dict(
        min=0, help="Write before/after strips for this many sampled images (OUT/_compare/)."))
    address: str | None = field(default=None, metadata=dict(  # pipeline.runtime.ray_session.connect
        help="Ray cluster: HOST:PORT, 'auto' (the cluster running on this node), 'discover' (that cluster "
             "if there is one, else a private Ray) or 'local' (a private Ray). Default: RAY_ADDRESS, else a "
             "private Ray; jobs/denoise.py: discover."))
    device: str = field(default="auto", metadata=dict(
        choices=DEVICES, help="auto: a GPU when the cluster has one."))
    max_pixels: int = field(default=DEFAULT_MAX_PIXELS, metadata=dict(  # decompression bombs
        min=1, help="Images with more pixels fail (decompression bombs); Pillow's own limit also applies."))
    image_column: str = field(default="image", metadata=dict(help="Parquet input: image bytes column."))
    key_column: str = field(default="path", metadata=dict(help="Parquet input: key / relative path column."))
    output_column: str = field(default="denoised", metadata=dict(help="Parquet output: denoised column."))
    progress: bool = field(default=True, metadata=dict(help="Progress bar on stderr."))

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
        if self.device not in DEVICES:
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
