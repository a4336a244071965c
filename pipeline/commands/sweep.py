"""`n2n sweep`: a hyperparameter search on Ray Tune whose trials are `n2n train` runs.

The search space comes from `--grid/--choice/--uniform/--loguniform/--randint` and/or
`--space FILE` (YAML or JSON; see `pipeline.sweep.space`). Every `n2n train` option
(but `--out`, `--workers`, `--cpus-per-worker`, `--resume`, `--no-ray`, `--progress`)
is passed to every trial, from `--config FILE` and the command line as in `n2n train`.
`--resume` continues the sweep in `--out`; given alone it reuses the saved settings.
"""
from __future__ import annotations

import dataclasses
import logging

import click

from pipeline.commands.friendly_errors import debug_requested
from pipeline.commands.options import options_from
from pipeline.commands.train import _arch_args
from pipeline.errors import JobError, UsageError
from pipeline.commands.train import train as train_command
from pipeline.commands.verbose import quiet_command
from pipeline.sweep.config import SweepConfig
from pipeline.training.config import TrainConfig, read_config_file

# train options the sweep sets itself (per trial or for the whole sweep)
_NOT_PASSED = ("config_file", "out", "workers", "cpus_per_worker", "resume", "ray", "progress", "address", "smoke_test",
               "verbose")
_KINDS = ("grid", "choice", "uniform", "loguniform", "randint")
# SweepConfig's own settings (its options), but for the folder, the Ray address and --resume
_SWEEP_KEYS = tuple(f.name for f in dataclasses.fields(SweepConfig)
                    if f.name not in ("out", "train", "space", "address", "resume"))


TUNE_CONTROLLER = "ray.tune.execution.tune_controller"  # logs each failed trial with its whole traceback


def _first_line_only(record: logging.LogRecord) -> bool:
    """A logging filter: a record with a traceback keeps its first line and says how to see the rest."""
    text = record.getMessage()
    if record.exc_info or "\n" in text:
        record.msg = f"{text.splitlines()[0] if text else ''} (--debug or N2N_DEBUG=1 shows the traceback)"
        record.args, record.exc_info, record.exc_text, record.stack_info = (), None, None, None
    return True


def _with_train_options(command: click.Command) -> click.Command:
    """Append `n2n train`'s options (those passed to every trial) to `command`."""
    for param in train_command.params:
        if param.name not in _NOT_PASSED:
            command.params.append(param)
    return command


def _space(options: dict, space_file: str | None):
    """The search space and the fixed values of --space FILE, then the --grid/... options."""
    from pipeline.sweep.space import SearchSpace, parse_option, parse_space_mapping

    dims, fixed = {}, {}
    if space_file:
        try:
            mapping = read_config_file(space_file)
            dims, fixed = parse_space_mapping(mapping, source=space_file)
        except ValueError as e:
            raise UsageError(str(e)) from None
    for kind in _KINDS:
        for text in options.pop(kind):
            try:
                dim = parse_option(kind, text)
            except ValueError as e:
                raise UsageError(str(e)) from None
            if dim.key in dims:
                raise UsageError(f"--{kind} {text!r}: {dim.key} is already in the search space")
            dims[dim.key] = dim
    try:
        return SearchSpace(tuple(dims.values())), fixed
    except ValueError as e:
        raise UsageError(str(e)) from None


@_with_train_options
@click.command("sweep")
@options_from(SweepConfig, only=("out",), left_out_is_none=True,
              overrides={"out": {"required": True, "type": click.Path(file_okay=False)}})
@click.option("--grid", multiple=True, metavar="KEY=V1,V2,..",
              help="Try every value (each grid key multiplies the trials), e.g. --grid width=16,32,48.")
@click.option("--choice", multiple=True, metavar="KEY=V1,V2,..", help="Draw one value per trial.")
@click.option("--uniform", multiple=True, metavar="KEY=LO:HI", help="Draw a float uniformly in [LO, HI].")
@click.option("--loguniform", multiple=True, metavar="KEY=LO:HI",
              help="Draw a float log-uniformly in [LO, HI], e.g. --loguniform lr=1e-4:3e-3.")
@click.option("--randint", multiple=True, metavar="KEY=LO:HI", help="Draw an integer in LO..HI (both included).")
@click.option("--space", "space_file", type=click.Path(exists=True, dir_okay=False),
              help="YAML/JSON search space: KEY: {grid|choice|uniform|loguniform|randint: [...]} or KEY: value.")
@options_from(SweepConfig, exclude=("out", "train", "space"), overrides={"resume": {"default": False}},
              left_out_is_none=True)
@options_from(TrainConfig, only=("smoke_test",), left_out_is_none=True,
              overrides={"smoke_test": {"help": "Trials of a few steps of a tiny model."}})
@click.option("--config", "config_file", type=click.Path(exists=True, dir_okay=False),
              help="YAML or JSON file of trial options (n2n train's keys); explicit options override it.")
@click.pass_context
@quiet_command("sweep")
def sweep(ctx, out, space_file, address, resume, config_file, **options) -> None:
    """Search hyperparameters with Ray Tune: every trial is an n2n train run on its own Ray actors,
    compared on the validation PSNR of the --holdout images; ASHA stops the weaker ones.

    \b
    n2n sweep --data photos/ --holdout 40 --out sweeps/a --steps 2000 \\
        --grid width=16,32,48 --loguniform lr=1e-4:3e-3 --samples 2
    n2n sweep --out sweeps/a --resume            # continue after an interruption
    """
    from pipeline.sweep import run_sweep
    from pipeline.sweep.config import read_saved

    if address is None:  # a job script's default (jobs/sweep.py attaches to its node's cluster)
        address = (ctx.obj or {}).get("address")

    space, fixed = _space(options, space_file)
    sweep_values = {k: options.pop(k) for k in _SWEEP_KEYS}
    options["arch_args"] = _arch_args(options["arch_args"])
    try:
        saved = read_saved(out)
        train_values = read_config_file(config_file) if config_file else {}
    except ValueError as e:
        raise UsageError(str(e)) from None
    if saved is not None and not resume:
        raise UsageError(f"{out} already holds a sweep: pass --resume to continue it, or another --out")
    if saved is not None:  # the saved sweep, under what is given now (resuming checks nothing defining changed)
        train_values = {**saved["train"], **train_values}
        sweep_values = {**{k: saved.get(k) for k in _SWEEP_KEYS},
                        **{k: v for k, v in sweep_values.items() if v is not None}}
        if not space.dimensions:
            try:
                space = type(space).from_dict(saved["space"], source=f"{out}/sweep.json")
            except ValueError as e:
                raise UsageError(str(e)) from None
    for key, value in fixed.items():  # fixed values of the space file: a TrainConfig field, else an arch argument
        if key in TrainConfig.__dataclass_fields__:
            train_values[key] = value
        else:
            train_values["arch_args"] = {**train_values.get("arch_args", {}), key: value}
    train_values.update({k: v for k, v in options.items() if v is not None})
    if "arch_args" in train_values and not isinstance(train_values["arch_args"], dict):
        raise UsageError("arch_args must be a mapping")
    train_values.update(out=out, progress=False)
    if train_values.get("smoke_test"):  # a setup check: two short trials of a tiny model
        train_values.setdefault("holdout", 1)
        if not space.dimensions:
            space = type(space).from_dict({"lr": {"grid": [1e-3, 3e-3]}})
    if "holdout" in train_values and "validation_images" not in train_values:
        train_values["validation_images"] = train_values["holdout"]  # every held-out image
    if "data" not in train_values:
        raise UsageError("missing --data (on the command line or in --config)")
    if not space.dimensions:
        raise UsageError("the search space is empty: give --grid/--choice/--uniform/--loguniform/--randint "
                               "or --space FILE")
    try:
        train_config = TrainConfig.from_dict(train_values, source=config_file or "options")
        config = SweepConfig(out=out, train=train_config, space=space, address=address, resume=resume,
                             **{k: v for k, v in sweep_values.items() if v is not None})
    except (TypeError, ValueError) as e:
        raise UsageError(str(e)) from None
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if not debug_requested(ctx):  # a failed trial is one line (its error file and results.csv have the rest)
        logging.getLogger(TUNE_CONTROLLER).addFilter(_first_line_only)
    try:
        result = run_sweep(config)
    except (FileExistsError, ValueError) as e:
        raise UsageError(str(e)) from None
    click.echo(result.markdown.read_text())
    if result.best is not None:
        values = ", ".join(f"{k}={v}" for k, v in result.best.params.items())
        click.echo(f"best: trial {result.best.trial} ({values}): validation PSNR {result.best.psnr:.2f} dB at step "
                   f"{result.best.step}; model {config.out}/trials/{result.best.trial}/model.n2n")
    click.echo(f"table {result.table}, plot {result.plot}")
    errored = [row for row in result.rows if row.status == "error"]
    if errored:  # the trials that ran are in the table; the sweep as a whole did not do what was asked
        raise JobError(f"{len(errored)} of {len(result.rows)} trials ended in an error "
                       f"({', '.join(row.trial for row in errored[:5])}{', ...' if len(errored) > 5 else ''}); "
                       f"each one's error is in {config.out}/tune/TRIAL/error.txt; --resume reruns them")
