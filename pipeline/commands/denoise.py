"""`n2n denoise IN OUT`: denoise a folder tree or Parquet table on Ray (see pipeline.inference.job).

IN, OUT and every option are DenoiseConfig's fields, built from them (pipeline.commands.options).
"""
from __future__ import annotations

import sys

import click

from pipeline.commands.friendly_errors import FriendlyCommand, debug_option
from pipeline.commands.options import options_from
from pipeline.commands.verbose import quiet_command
from pipeline.inference.config import DenoiseConfig
from pipeline.inference.job import run_denoise


@click.command("denoise", cls=FriendlyCommand)
@options_from(DenoiseConfig)
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
