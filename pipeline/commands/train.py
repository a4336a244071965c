"""`n2n train`: data-parallel Noise2Noise training on Ray (one option per TrainConfig field).

Values come from, in increasing priority: TrainConfig's defaults, `--config FILE`
(YAML or JSON, keys are the field names), the options given on the command line.
"""
from __future__ import annotations

import json
import logging

import click

from pipeline.commands.friendly_errors import FriendlyCommand, debug_option
from pipeline.commands.verbose import quiet_command
from pipeline.errors import UsageError
from pipeline.training.config import TrainConfig, read_config_file


def architecture_of(source: str) -> dict:
    """{"arch", "arch_args"} of the checkpoint `source` (a path, a URI or "default"), read from its
    header; a checkpoint that does not load is left to the run's own check (a one-line error)."""
    from n2n_core.tensorfile import CheckpointError
    from pipeline.training.run_dir import read_checkpoint

    path = source
    if source == "default":
        from pipeline.assets import default_model_path

        path = str(default_model_path())
    try:
        saved = read_checkpoint(path).model_config
    except (CheckpointError, OSError, ValueError):
        return {}
    return {"arch": saved.name, "arch_args": dict(saved.kwargs)}


def _arch_args(values: tuple[str, ...]) -> dict | None:
    """("depth=2", "width=8") -> {"depth": 2, "width": 8} (values parsed as JSON when they can be)."""
    if not values:
        return None
    out = {}
    for item in values:
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise click.BadParameter(f"expected KEY=VALUE, got {item!r}", param_hint="--arch-arg")
        try:
            out[key.strip()] = json.loads(text)
        except ValueError:
            out[key.strip()] = text
    return out


@click.command("train", cls=FriendlyCommand)
@click.option("--data", help="Clean training images: a folder, a Parquet file or folder (or a pairs table).")
@click.option("--out", help="Run directory: checkpoints/, metrics.jsonl, training.png, model.n2n.")
@click.option("--config", "config_file", type=click.Path(exists=True, dir_okay=False),
              help="YAML or JSON file of options (keys = option names); explicit options override it.")
@click.option("--arch", help="Architecture: unet (default), seed, seed-deep.")
@click.option("--arch-arg", "arch_args", multiple=True, metavar="KEY=VALUE",
              help="Architecture argument, repeatable, e.g. --arch-arg depth=3 --arch-arg width=32.")
@click.option("--noise", help="Noise spec: gaussian:25, gaussian:0-50, poisson:30, impulse:0.1, camera, photo; "
                               "none: the data is noisy already (--target neighbor).")
@click.option("--target", type=click.Choice(["noisy", "clean", "neighbor"]),
              help="noisy (Noise2Noise, default), clean (supervised) or neighbor (Neighbor2Neighbor: single noisy "
                   "images, no pairs; with --noise none, train on your noisy photos as they are).")
@click.option("--nb-gamma", type=float, help="--target neighbor: the regulariser's final weight (default 2; it "
                                               "rises linearly from 0 over the run).")
@click.option("--loss", type=click.Choice(["l2", "l1"]), help="l2 (default) or l1 (impulse noise).")
@click.option("--workers", type=int, help="Gradient actors (default: one per GPU, else one per CPU).")
@click.option("--steps", type=int, help="Optimizer steps in all.")
@click.option("--max-seconds", type=float, help="Wall-clock budget: stop after the step that crosses it.")
@click.option("--batch-size", type=int, help="Global batch size (split across workers).")
@click.option("--accumulate", type=int,
              help="Micro-batches of --batch-size added before each optimizer step: the step of a batch this "
                   "many times larger, in the memory of one (default 1).")
@click.option("--crop-size", type=int, help="Side of the square training crops.")
@click.option("--lr", type=float, help="Learning rate.")
@click.option("--lr-ramp-down", type=int, help="Last N of --steps decay the learning rate to 0 (half cosine).")
@click.option("--optimizer", type=click.Choice(["adam", "sgd"]), help="adam (default) or sgd.")
@click.option("--momentum", type=float, help="SGD momentum.")
@click.option("--seed", type=int, help="Seed of the model init and every data/noise draw.")
@click.option("--ray/--no-ray", default=None,
              help="--no-ray: one replica in this process (first GPU if any), same steps and checkpoints.")
@click.option("--address", help="Ray cluster: HOST:PORT, 'auto' (the cluster running on this node), 'discover' "
                                 "(that cluster if there is one, else a private Ray) or 'local' (a private Ray). "
                                 "Default: RAY_ADDRESS, else a private Ray; jobs/train.py: discover.")
@click.option("--resume/--no-resume", default=None, help="Continue from the latest checkpoint in --out.")
@click.option("--checkpoint-every", type=int, help="Steps between checkpoints.")
@click.option("--keep-checkpoints", type=int, help="Step checkpoints kept (newest).")
@click.option("--validate-every", type=int, help="Steps between validation PSNR measurements.")
@click.option("--validation-images", type=int, help="Images used for validation and the PNG strip.")
@click.option("--holdout", type=int,
              help="Images of --data held out of training and used for validation (spread over the sorted keys).")
@click.option("--init-from", help="Start from this checkpoint's weights, 'default' for the built-in model "
                                 "(its architecture unless --arch/--arch-arg are given: then the same, or a "
                                 "unet's with a larger width, widened with the same output; new optimizer, step 0).")
@click.option("--validation-size", type=int, help="Validation images are centre-cropped to this side at most.")
@click.option("--dtype", type=click.Choice(["float32", "float64"]), help="Weights and arithmetic.")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), help="Worker device (auto: GPU if given one).")
@click.option("--cpus-per-worker", type=float, help="CPUs (and torch threads) per actor.")
@click.option("--max-failures", type=int,
              help="Failures tolerated before giving up (a worker or reducer replaced; a lost node counts once).")
@click.option("--start-timeout", "--placement-timeout", "start_timeout", type=float,
              help="Seconds to wait for workers to start, new nodes included (default 900: an autoscaled node's boot).")
@click.option("--step-timeout", type=float,
              help="Seconds a worker may take for one step's gradients before it is killed and replaced (default 600).")
@click.option("--gradient-dtype", type=click.Choice(["same", "bfloat16"]),
              help="Gradients on the wire: same (the run's dtype, default) or bfloat16 (half the bytes, summed in float32+).")
@click.option("--overlap/--no-overlap", default=None,
              help="Overlapped step (default): the driver steps each bucket of gradients while the workers "
                   "compute the rest; --no-overlap: the serial step, the driver waiting for all of them.")
@click.option("--buckets", type=int, help="About this many gradient buckets per step (overlapped step; default 8).")
@click.option("--progress/--no-progress", default=None, help="Show a progress bar.")
@click.option("--smoke-test", is_flag=True, default=None, help="A few steps of a tiny model to check a setup.")
@debug_option
@click.pass_context
@quiet_command("train")
def train(ctx, config_file, **options) -> None:
    """Train a Noise2Noise denoiser data-parallel on Ray."""
    from pipeline.training import train as run_training  # imports ray: only when training

    try:
        values = read_config_file(config_file) if config_file else {}
    except ValueError as e:
        raise UsageError(str(e)) from None
    options["arch_args"] = _arch_args(options["arch_args"])
    values.update({k: v for k, v in options.items() if v is not None})
    if values.get("ray", True) and "address" not in values:  # a job script's default (jobs/train.py)
        values["address"] = (ctx.obj or {}).get("address")
    missing = [f"--{k}" for k in ("data", "out") if k not in values]
    if missing:
        raise UsageError(f"missing {' and '.join(missing)} (on the command line or in --config)")
    if values.get("init_from") and "arch" not in values and "arch_args" not in values:
        values.update(architecture_of(values["init_from"]))  # fine-tune the model as it is
    try:
        config = TrainConfig.from_dict(values, source=config_file or "options")
    except (TypeError, ValueError) as e:
        raise UsageError(str(e)) from None
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    result = run_training(config)  # RayConnectionError: one line, exit status 2
    if result.sigma is not None:  # no clean reference: the no-reference noise estimate
        figure = f"validation noise estimate {result.sigma:.2f} (sigma, 0..255)"
    else:
        figure = "validation PSNR " + ("-" if result.psnr is None else f"{result.psnr:.2f} dB")
    loss = "-" if result.loss is None else f"{result.loss:.5g}"
    click.echo(f"trained {result.steps} steps on {result.workers} workers: loss {loss}, "
               f"{figure}; model {result.checkpoint}, metrics {result.metrics}, plot {result.plot}")
