"""`n2n bench ...`: benchmarks against the torch.nn peer (figures go into BENCHMARKS.md).

`n2n bench core` runs bench/core.py: n2n_core's training step and inference against the
torch.nn twin on the same weights and threads. `n2n bench data|train|denoise|batching|quality`
run bench/<name>.py with the remaining arguments (`n2n bench train --help` shows its own).
The benchmarks live in the source tree beside `pipeline` (an editable install or the
repository root as the working directory).
"""
from __future__ import annotations

import runpy
import sys
from pathlib import Path

import click


@click.group()
def bench() -> None:
    """Benchmarks: n2n against torch.nn and the pipeline's throughput."""


@bench.command("core")
@click.option("--cases", multiple=True,
              type=click.Choice(["seed-train", "seed-infer", "unet-train", "unet-infer", "default-train",
                                 "default-infer", "chain-train", "chain-infer"]),
              help="cases to run (repeatable; default: all)")
@click.option("--repeats", default=7, show_default=True, help="interleaved timed repetitions per case")
@click.option("--warmup", default=2, show_default=True, help="untimed runs of each contestant first")
@click.option("--threads", type=int, default=None, help="torch threads (default: torch's)")
@click.option("--clock", type=click.Choice(["wall", "cpu"]), default="wall", show_default=True,
              help="cpu: the process's CPU time, steadier on a machine other jobs keep busy (use with --threads 1)")
def core(cases, repeats, warmup, threads, clock) -> None:
    """n2n_core vs the torch.nn twin (default and channels_last): training step and 512x512 inference of the
    seed network, the paper's U-Net, the default model's U-Net and a 3x3 convolution chain."""
    _source_root()
    from bench.core import CASES, report  # the bench package lives beside pipeline in the source tree

    report(list(cases) or list(CASES), repeats, warmup, threads, clock=clock)


def _source_root() -> Path:
    """The repository root holding bench/ (benchmarks ship with the source, not the wheel)."""
    root = Path(__file__).resolve().parents[2]
    if not (root / "bench").is_dir():
        raise click.ClickException("the benchmarks (bench/) are not here: run them from a source "
                                   "checkout installed with `pip install -e .`")
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))  # the scripts import bench.core and the like
    return root


SCRIPTS = {
    "data": "image reading, decoding and training batches vs what a training step consumes",
    "train": "in-process vs 1 and 2 Ray actors vs Ray Train's TorchTrainer; the driver's cost",
    "denoise": "the bulk job vs the model alone and a plain loop; peak memory for N and 10N images",
    "batching": "the denoising actor, batched and with its decode/encode threads, vs one image at a time",
    "quality": "PSNR on CBSD68 after a wall-clock budget: n2n vs its torch.nn twin, noisy vs clean targets",
}


def _script_command(name: str, summary: str) -> click.Command:
    @click.command(name, help=f"{summary} (bench/{name}.py; its options follow, see --help).",
                   context_settings={"ignore_unknown_options": True, "allow_extra_args": True,
                                     "help_option_names": []})
    @click.argument("args", nargs=-1, type=click.UNPROCESSED)
    def command(args) -> None:
        script = _source_root() / "bench" / f"{name}.py"
        argv = sys.argv
        sys.argv = [str(script), *args]
        try:
            runpy.run_path(str(script), run_name="__main__")
        finally:
            sys.argv = argv

    return command


for _name, _summary in SCRIPTS.items():
    bench.add_command(_script_command(_name, _summary))
