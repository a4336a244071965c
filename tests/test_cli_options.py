"""One declaration per setting: the options of `n2n train`, `n2n denoise` and `n2n sweep` are
built from their config dataclasses' fields (pipeline.commands.options), so an option and its
field cannot drift apart: every field has its option and every option its field."""
import dataclasses
from dataclasses import dataclass, field

import click
import pytest
from click.testing import CliRunner

from pipeline.commands.denoise import denoise
from pipeline.commands.options import options_from, shown
from pipeline.commands.sweep import _NOT_PASSED, sweep
from pipeline.commands.train import train
from pipeline.inference.config import DenoiseConfig
from pipeline.sweep.config import SweepConfig
from pipeline.training.config import TrainConfig

# parameters that are not config fields: they say where values come from or how to run
NOT_FIELDS = {"config_file", "debug", "verbose"}
# sweep: the search space, and the trials' n2n train options (TrainConfig's, checked below)
SWEEP_ONLY = {"grid", "choice", "uniform", "loguniform", "randint", "space_file"}
# SweepConfig fields that are no option: `train` is n2n train's options, `space` --grid/.../--space
SWEEP_NOT_OPTIONS = {"train", "space"}


def names(fields) -> set[str]:
    return {f.name for f in fields}


def params(command: click.Command) -> dict[str, click.Parameter]:
    return {p.name: p for p in command.params if p.name not in NOT_FIELDS}


def test_every_train_field_is_an_option_and_every_option_a_field():
    assert set(params(train)) == names(dataclasses.fields(TrainConfig))


def test_every_denoise_field_is_an_argument_or_option_and_back():
    assert set(params(denoise)) == names(dataclasses.fields(DenoiseConfig))
    assert [p.name for p in denoise.params if isinstance(p, click.Argument)] == ["input", "output"]


def test_sweep_has_its_own_fields_and_passes_every_other_train_field():
    options = set(params(sweep))
    own = names(dataclasses.fields(SweepConfig)) - SWEEP_NOT_OPTIONS
    passed = names(dataclasses.fields(TrainConfig)) - set(_NOT_PASSED)
    assert options == own | passed | SWEEP_ONLY | {"smoke_test"}


@pytest.mark.parametrize("command, config", [(train, TrainConfig), (denoise, DenoiseConfig)])
def test_help_choices_and_types_come_from_the_field(command, config):
    fields = {f.name: f for f in dataclasses.fields(config)}
    for name, param in params(command).items():
        meta = fields[name].metadata
        if isinstance(param, click.Argument):
            assert param.metavar == meta["argument"]
            continue
        assert param.help.startswith(meta["help"].split("{default}")[0]), name
        if "choices" in meta:
            assert list(param.type.choices) == list(meta["choices"]), name
        if "min" in meta:
            assert param.type.min == meta["min"], name


def test_denoise_defaults_are_the_dataclass_defaults():
    for f in dataclasses.fields(DenoiseConfig):
        if f.default is not dataclasses.MISSING:
            assert params(denoise)[f.name].default == f.default, f.name


def test_train_options_left_out_are_none_so_a_config_file_can_give_them():
    given = train.make_context("train", ["--data", "d"]).params
    assert given.pop("data") == "d" and given.pop("arch_args") == ()
    assert {k: v for k, v in given.items() if k not in NOT_FIELDS} == {
        f.name: None for f in dataclasses.fields(TrainConfig) if f.name not in ("data", "arch_args")}


def test_a_default_written_in_help_follows_the_field():
    help_of = {p.name: p.help for p in train.params if isinstance(p, click.Option)}
    placed = [f for f in dataclasses.fields(TrainConfig) if "{default}" in f.metadata.get("help", "")]
    assert {f.name for f in placed} >= {"nb_gamma", "accumulate", "start_timeout", "step_timeout", "buckets"}
    for f in placed:
        before, after = f.metadata["help"].split("{default}")
        assert help_of[f.name] == before + shown(f.default) + after
    assert "(default 900: an autoscaled node's boot)" in help_of["start_timeout"]
    assert "(default 2;" in help_of["nb_gamma"]
    sweep_help = {p.name: p.help for p in sweep.params if isinstance(p, click.Option)}
    assert sweep_help["early_stop"] == "ASHA on the validation PSNR. [default: on]"
    assert sweep_help["reduction_factor"].endswith("[default: 3]")


@dataclass(frozen=True)
class Toy:
    path: str = field(metadata=dict(argument="PATH"))
    width: int = field(default=16, metadata=dict(min=1, help="Width, default {default}."))
    gain: float = field(default=0.5, metadata=dict(min=0.0, max=1.0, help="Gain."))
    mode: str = field(default="a", metadata=dict(choices=("a", "b"), help="Mode."))
    fast: bool = field(default=True, metadata=dict(help="Go fast."))
    dry_run: bool = field(default=False, metadata=dict(flag_only=True, help="Only say what it would do."))
    timeout: float = field(default=9.0, metadata=dict(names=("--timeout", "--old-timeout"), show_default=True))


def toy_command(**kwargs):
    @click.command()
    @options_from(Toy, **kwargs)
    def command(**values):
        click.echo(repr(sorted(values.items())))

    return command


def test_options_from_builds_each_kind_of_option():
    runner = CliRunner()
    result = runner.invoke(toy_command(), ["p"])
    assert result.exit_code == 0, result.output
    assert result.output.strip() == repr(sorted(dict(path="p", width=16, gain=0.5, mode="a", fast=True,
                                                     dry_run=False, timeout=9.0).items()))
    result = runner.invoke(toy_command(), ["p", "--width", "3", "--gain", "1", "--mode", "b", "--no-fast",
                                           "--dry-run", "--old-timeout", "2"])
    assert result.exit_code == 0, result.output
    assert "('dry_run', True), ('fast', False), ('gain', 1.0), ('mode', 'b'), ('path', 'p'), ('timeout', 2.0), " \
           "('width', 3)" in result.output
    for bad in (["--width", "0"], ["--gain", "1.5"], ["--mode", "c"], ["--no-dry-run"]):
        result = runner.invoke(toy_command(), ["p", *bad])
        assert result.exit_code == 2, (bad, result.output)
    text = runner.invoke(toy_command(), ["--help"], terminal_width=200).output
    assert "Width, default 16." in text and "[default: 16; x>=1]" in text
    assert "--fast / --no-fast" in text and "--dry-run " in text and "--no-dry-run" not in text


def test_left_out_is_none_leaves_the_default_to_the_dataclass():
    runner = CliRunner()
    result = runner.invoke(toy_command(left_out_is_none=True, exclude=("path",)), [])
    assert result.exit_code == 0, result.output
    assert result.output.strip() == repr(sorted(dict(width=None, gain=None, mode=None, fast=None, dry_run=None,
                                                     timeout=None).items()))
    text = runner.invoke(toy_command(left_out_is_none=True, exclude=("path",)), ["--help"],
                         terminal_width=200).output
    assert "[default: 9]" in text and "[default: 16" not in text


def test_only_exclude_and_overrides_name_fields_and_metadata_is_checked():
    with pytest.raises(ValueError, match=r"Toy has no fields \['widht'\]"):
        options_from(Toy, exclude=("widht",))
    with pytest.raises(ValueError, match=r"no fields \['nope'\]"):
        options_from(Toy, overrides={"nope": {}})

    @dataclass(frozen=True)
    class Typo:
        x: int = field(default=1, metadata=dict(hlep="typo"))

    with pytest.raises(ValueError, match=r"field x: unknown option metadata \['hlep'\]"):
        options_from(Typo)
