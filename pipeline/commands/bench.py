"""`n2n bench NAME ARGS...`: the benchmarks (figures go into BENCHMARKS.md), run from the CLI.

`n2n bench core|data|train|denoise|batching|quality ARGS...` runs `python -m bench NAME ARGS...`
(bench/__main__.py: the module bench.NAME as `python -m bench.NAME ARGS...` runs it, its errors
in one line) as a child process in the root of the source checkout, and exits with its
status; `n2n bench NAME --help` shows the benchmark's own options. The benchmarks ship with
the source, not the wheel (an editable install finds them beside `pipeline`).

Decision: a child process, not an import. `-m` puts the child's working directory (the
checkout's root) first on its path, so it finds `bench`; n2n's own process neither imports
the benchmarks nor edits its import path, Ray workers the benchmark starts find `bench` from
the same working directory, and the child writes straight to the terminal (its figures and
progress as they come).
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import click

from pipeline.commands.friendly_errors import DEBUG_ENV, debug_requested

BENCHMARKS = {
    "core": "n2n_core's training step and inference against the torch.nn twin, same weights and threads",
    "data": "image reading, decoding and training batches vs what a training step consumes",
    "train": "in-process vs 1 and 2 Ray actors vs Ray Train's TorchTrainer; the driver's cost",
    "denoise": "the bulk job vs the model alone and a plain loop; peak memory for N and 10N images",
    "batching": "the denoising actor, batched and with its decode/encode threads, vs one image at a time",
    "quality": "PSNR on CBSD68 after a wall-clock budget: n2n vs its torch.nn twin, noisy vs clean targets",
}


@click.group()
def bench() -> None:
    """Benchmarks: n2n against torch.nn and the pipeline's throughput."""


SOURCE_ROOT = Path(__file__).resolve().parents[2]  # the checkout's root, when n2n runs from one


def source_root(name: str) -> Path:
    """The checkout's root, which holds bench/NAME.py beside pipeline/ (never part of a wheel)."""
    root = SOURCE_ROOT
    if not (root / "bench" / f"{name}.py").is_file():
        raise click.ClickException("the benchmarks (bench/) are not here: run them from a source "
                                   "checkout installed with `pip install -e .`")
    return root


def run_benchmark(name: str, args: tuple[str, ...], debug: bool = False) -> int:
    """Run `python -m bench NAME ARGS` in the source root; its exit status (128 + N when signal N ended it).
    `debug`: the child shows an error's traceback (N2N_DEBUG=1)."""
    env = {**os.environ, DEBUG_ENV: "1"} if debug else None
    process = subprocess.Popen([sys.executable, "-m", "bench", name, *args], cwd=source_root(name), env=env)
    while True:
        try:
            status = process.wait()
            break
        except KeyboardInterrupt:  # Ctrl-C reached the child too: it ends on its own terms
            continue
    return 128 - status if status < 0 else status


def _benchmark_command(name: str, summary: str) -> click.Command:
    @click.command(name, help=f"{summary} (bench/{name}.py; its options follow, see --help).",
                   context_settings={"ignore_unknown_options": True, "allow_extra_args": True,
                                     "help_option_names": []})
    @click.argument("args", nargs=-1, type=click.UNPROCESSED)
    @click.pass_context
    def command(ctx: click.Context, args: tuple[str, ...]) -> None:
        ctx.exit(run_benchmark(name, args, debug=debug_requested(ctx)))

    return command


for _name, _summary in BENCHMARKS.items():
    bench.add_command(_benchmark_command(_name, _summary))
