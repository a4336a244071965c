"""`n2n bench ...`: benchmarks against the torch.nn peer (figures go into BENCHMARKS.md).

`n2n bench core` runs bench/core.py: n2n_core's training step and inference against the
torch.nn twin on the same weights and threads.
"""
from __future__ import annotations

import click


@click.group()
def bench() -> None:
    """Benchmarks: n2n against torch.nn and the pipeline's throughput."""


@bench.command("core")
@click.option("--cases", multiple=True, type=click.Choice(["seed-train", "unet-train", "unet-infer"]),
              help="cases to run (repeatable; default: all)")
@click.option("--repeats", default=7, show_default=True, help="interleaved timed repetitions per case")
@click.option("--warmup", default=2, show_default=True, help="untimed runs of each contestant first")
@click.option("--threads", type=int, default=None, help="torch threads (default: torch's)")
def core(cases, repeats, warmup, threads) -> None:
    """n2n_core vs the torch.nn twin: training step (seed, unet) and unet inference on 512x512."""
    from bench.core import CASES, report  # the bench package lives beside pipeline in the source tree

    report(list(cases) or list(CASES), repeats, warmup, threads)
