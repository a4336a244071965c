"""`n2n denoise IN OUT`: denoise a folder tree or Parquet table on Ray (see pipeline.inference.job)."""
from __future__ import annotations

import sys

import click

from pipeline.commands.friendly_errors import FriendlyCommand, debug_option
from pipeline.commands.verbose import quiet_command
from pipeline.inference.config import DEFAULT_MAX_PIXELS, DenoiseConfig
from pipeline.inference.job import run_denoise

POSITIVE = click.IntRange(min=1)
NON_NEGATIVE = click.IntRange(min=0)


@click.command("denoise", cls=FriendlyCommand)
@click.argument("input", metavar="IN")
@click.argument("output", metavar="OUT")
@click.option("--model", default=None, help="Checkpoint to use, a path or a URI (default: the built-in default model).")
@click.option("--tile", type=NON_NEGATIVE, default=512, show_default=True,
              help="Tile side for large images; 0 runs whole images.")
@click.option("--overlap", type=NON_NEGATIVE, default=32, show_default=True, help="Context pixels around each tile.")
@click.option("--self-ensemble", is_flag=True,
              help="Average the model over the 8 flips and rotations of each tile: 8 forward passes, "
                   "about +0.1 to +0.2 dB.")
@click.option("--strength", type=click.FloatRange(0.0, 1.0), default=1.0, show_default=True,
              help="How much of the model's correction to apply: noisy + strength x (denoised - noisy). "
                   "Less keeps more texture (and more noise); `n2n assess --strength` shows the effect.")
@click.option("--precision", type=click.Choice(["float32", "bfloat16", "float16"]), default="float32",
              show_default=True,
              help="The model's arithmetic: bfloat16 and float16 halve its memory (more pixels per forward); "
                   "bfloat16 costs about 0.02 dB on CBSD68 (docs/gpu.md).")
@click.option("--workers", type=POSITIVE, default=None,
              help="Most actors in the pool, which grows with the cluster (default: on GPUs one per GPU the "
                   "cluster has or adds, on CPUs one per core at the start).")
@click.option("--batch-size", type=POSITIVE, default=4, show_default=True, help="Images per actor call.")
@click.option("--overwrite", is_flag=True, help="Redo inputs an earlier run finished (n2n's own outputs only).")
@click.option("--follow-symlinks", is_flag=True,
              help="Folder IN: enter symlinked folders too (each real folder once; loops are cut).")
@click.option("--compare", type=NON_NEGATIVE, default=0, show_default=True,
              help="Write before/after strips for this many sampled images (OUT/_compare/).")
@click.option("--address", default=None,
              help="Ray cluster: HOST:PORT, 'auto' (the cluster running on this node), 'discover' (that cluster "
                   "if there is one, else a private Ray) or 'local' (a private Ray). Default: RAY_ADDRESS, else a "
                   "private Ray; jobs/denoise.py: discover.")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True)
@click.option("--max-pixels", type=POSITIVE, default=DEFAULT_MAX_PIXELS, show_default=True,
              help="Images with more pixels fail (decompression bombs); Pillow's own limit also applies.")
@click.option("--image-column", default="image", show_default=True, help="Parquet input: image bytes column.")
@click.option("--key-column", default="path", show_default=True, help="Parquet input: key / relative path column.")
@click.option("--output-column", default="denoised", show_default=True, help="Parquet output: denoised column.")
@click.option("--progress/--no-progress", default=True, show_default=True, help="Progress bar on stderr.")
@debug_option
@click.pass_context
@quiet_command("denoise")
def denoise(ctx, **options) -> None:
    """Denoise every image of IN (folder or Parquet) into OUT, keeping names and formats.

    OUT ending in .parquet gets Parquet part files (the input's columns plus the
    denoised image); otherwise a folder tree mirroring IN. OUT must be new, empty, or
    written by n2n before. OUT/_manifest.jsonl lists every input as done, skipped or
    failed; a rerun resumes. Exit status: 0 all done, 1 any input failed or the run
    stopped early (disk full), 2 the command cannot run as given (nothing was written).

    IN, OUT and --model are local paths or URIs (s3://, gs://, file://). On a cluster a
    local OUT must be a mount every node shares (checked; else use a URI).
    """
    options["tile"] = options["tile"] or None
    options["address"] = options["address"] or (ctx.obj or {}).get("address")  # a job script's default
    summary = run_denoise(DenoiseConfig(**options))  # RayConnectionError: one line, exit status 2
    click.echo(summary.format())
    if summary.failed or summary.stopped:
        sys.exit(1)
