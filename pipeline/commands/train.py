"""`n2n train`: data-parallel Noise2Noise training on Ray (one option per TrainConfig field,
built from the field: pipeline.commands.options).

Values come from, in increasing priority: TrainConfig's defaults, `--config FILE`
(YAML or JSON, keys are the field names), the options given on the command line.
"""
from __future__ import annotations

import json
import logging

import click

from pipeline.commands.friendly_errors import FriendlyCommand, debug_option
from pipeline.commands.options import options_from
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
@options_from(TrainConfig, only=("data", "out"), left_out_is_none=True)
@click.option("--config", "config_file", type=click.Path(exists=True, dir_okay=False),
              help="YAML or JSON file of options (keys = option names); explicit options override it.")
@options_from(TrainConfig, exclude=("data", "out"), left_out_is_none=True)
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
