"""The parts of `n2n sweep` that need no Ray cluster: search space, config, reporting, ASHA's rungs, the table, the CLI."""
from __future__ import annotations

import csv
import json
from pathlib import Path
from types import SimpleNamespace

import pytest
from click.testing import CliRunner
from PIL import Image

from train_support import make_images

from pipeline.sweep import SearchSpace, SweepConfig, parse_option
from pipeline.sweep.config import changed_settings, read_saved, write_json
from pipeline.sweep.results import best_row, write_results
from pipeline.sweep.runner import resolve
from pipeline.sweep.space import apply_params, parse_space_mapping
from pipeline.sweep.trial import ValidationReporter
from pipeline.training import TrainConfig
from pipeline.training.config import read_config_file


def base(**changes) -> TrainConfig:
    values = dict(data="images", out="", arch="unet", arch_args={"depth": 2}, steps=90, validate_every=10, holdout=4)
    return TrainConfig(**{**values, **changes})


# -- search space ------------------------------------------------------------------------
def test_options_parse_into_dimensions():
    assert parse_option("grid", "width=16,32, 48").values == (16, 32, 48)
    assert parse_option("choice", "residual=false,true").values == (False, True)
    assert parse_option("choice", "loss=l1,l2").values == ("l1", "l2")
    assert parse_option("grid", 'noise=["gaussian:25,8bit", "gaussian:0-50,8bit"]').values == \
        ("gaussian:25,8bit", "gaussian:0-50,8bit")
    lr = parse_option("loguniform", "lr=1e-4:3e-3")
    assert (lr.kind, lr.values, lr.random) == ("loguniform", (1e-4, 3e-3), True)
    assert parse_option("grid", "batch-size=8,16").key == "batch_size"
    assert not parse_option("grid", "width=8").random


def test_randint_includes_both_ends_and_loguniform_stays_in_range():
    import numpy as np

    draws = parse_option("randint", "width=10:12").to_tune().sample(size=300)
    assert set(draws) == {10, 11, 12}
    lr = np.array(parse_option("loguniform", "lr=1e-4:3e-3").to_tune().sample(size=300))
    assert lr.min() >= 1e-4 and lr.max() <= 3e-3 and (lr < 5.5e-4).mean() > 0.35  # log-uniform: half below the geometric mean


@pytest.mark.parametrize("kind, text, message", [
    ("grid", "width", "expected KEY=V1,V2"),
    ("grid", "width=", "expected KEY=V1,V2"),
    ("loguniform", "lr=0:1e-3", "must be positive"),
    ("uniform", "momentum=0.9:0.5", "LO < HI"),
    ("uniform", "momentum=0.5", "KEY=LO:HI"),
    ("randint", "width=10.5:20", "integers"),
    ("uniform", "lr=a:b", "finite numbers"),
    ("choice", "loss=[oops", "not a JSON list"),
])
def test_bad_options_are_named(kind, text, message):
    with pytest.raises(ValueError) as e:
        parse_option(kind, text)
    assert f"--{kind} {text!r}" in str(e.value) and message in str(e.value)


@pytest.mark.parametrize("key", ["noise", "holdout", "steps", "validation_images", "data", "workers", "arch_args"])
def test_what_trials_are_compared_on_cannot_vary(key):
    with pytest.raises(ValueError, match=f"{key} cannot vary"):
        SearchSpace((parse_option("grid", f"{key}=1,2"),))


def test_space_file_with_fixed_values_and_yaml_numbers(tmp_path):
    path = tmp_path / "space.yaml"
    path.write_text("width: {grid: [16, 32]}\nlr: {loguniform: [1e-4, 3.0e-3]}\nloss: l1\nresidual: {choice: [false, true]}\n")
    dims, fixed = parse_space_mapping(read_config_file(path), source=str(path))
    assert dims["lr"].values == (1e-4, 3e-3)  # YAML reads 1e-4 as text; the space reads it as a number
    assert dims["width"].kind == "grid" and dims["residual"].values == (False, True)
    assert fixed == {"loss": "l1"}
    with pytest.raises(ValueError, match=f"{path}: width: expected one of"):
        parse_space_mapping({"width": {"grid": [1], "choice": [2]}}, source=str(path))
    with pytest.raises(ValueError, match="unknown kind 'normal'"):
        parse_space_mapping({"lr": {"normal": [0, 1]}}, source=str(path))


def test_trial_values_go_to_fields_or_architecture():
    config = apply_params(base(), {"width": 24, "lr": 3e-4, "loss": "l1"}, "runs/t1")
    assert config.arch_args == {"depth": 2, "width": 24} and config.lr == 3e-4 and config.loss == "l1"
    assert config.out == "runs/t1" and base().arch_args == {"depth": 2}


def test_check_names_the_bad_key_before_any_trial():
    with pytest.raises(ValueError, match=r"search space: widht=8: .*unknown arguments \['widht'\]"):
        SearchSpace((parse_option("grid", "widht=8,16"),)).check(base())
    with pytest.raises(ValueError, match=r"search space: lr=-1: .*lr must be positive"):
        SearchSpace((parse_option("grid", "lr=1e-3,-1"),)).check(base())
    with pytest.raises(ValueError, match=r"width=0"):
        SearchSpace((parse_option("randint", "width=0:8"),)).check(base())
    SearchSpace((parse_option("grid", "width=8,16"), parse_option("loguniform", "lr=1e-4:1e-2"))).check(base())


# -- sweep config ---------------------------------------------------------------------------
def space(*specs) -> SearchSpace:
    return SearchSpace(tuple(parse_option(kind, text) for kind, text in specs))


def test_model_selection_needs_held_out_images():
    with pytest.raises(ValueError, match="holdout must be at least 1"):
        SweepConfig(out="s", train=base(holdout=0), space=space(("grid", "width=8,16")))


def test_repeats_of_a_grid_without_random_keys_are_refused():
    with pytest.raises(ValueError, match="repeat identical trials"):
        SweepConfig(out="s", train=base(), space=space(("grid", "width=8,16")), samples=3)
    SweepConfig(out="s", train=base(), space=space(("grid", "width=8,16"), ("grid", "seed=0,1")), samples=1)
    SweepConfig(out="s", train=base(), space=space(("loguniform", "lr=1e-4:1e-3")), samples=3)


@pytest.mark.parametrize("cpus, workers, gpu, bundles", [
    (None, 1, False, [{"CPU": 1.0}, {"CPU": 1.0}]),
    (1, 1, False, [{"CPU": 0.5}, {"CPU": 0.5}]),
    (5, 2, False, [{"CPU": 1.0}, {"CPU": 2.0}, {"CPU": 2.0}]),
    (None, 2, True, [{"CPU": 1.0}, {"CPU": 1.0, "GPU": 1}, {"CPU": 1.0, "GPU": 1}]),
])
def test_a_trial_reserves_a_driver_bundle_and_one_per_worker(cpus, workers, gpu, bundles):
    config = SweepConfig(out="s", train=base(), space=space(("grid", "width=8")), cpus_per_trial=cpus,
                         workers_per_trial=workers)
    assert config.bundles(gpu) == bundles
    assert sum(b["CPU"] for b in bundles) == config.trial_cpus


def test_asha_grace_defaults_to_a_ninth_of_the_steps():
    assert SweepConfig(out="s", train=base(steps=900), space=space(("grid", "width=8"))).grace == 100
    assert SweepConfig(out="s", train=base(steps=30), space=space(("grid", "width=8"))).grace == 10  # validate_every
    assert SweepConfig(out="s", train=base(), space=space(("grid", "width=8")), grace_steps=500).grace == 90


def test_config_round_trips_and_resume_refuses_defining_changes(tmp_path):
    config = resolve(SweepConfig(out=str(tmp_path / "s"), train=base(), space=space(("grid", "width=8,16"))))
    saved = json.loads(json.dumps(config.to_dict()))
    assert SweepConfig.from_dict(saved) == config
    assert config.train.out == str(tmp_path / "s" / "trials") and Path(config.train.data).is_absolute()
    assert config.train.workers == 1 and config.train.cpus_per_worker == 1.0
    assert changed_settings(saved, config.replace(address="auto", resume=True)) == []
    assert changed_settings(saved, config.replace(max_concurrent=1)) == ["max_concurrent: 0 -> 1"]  # Tune keeps its own
    ordered = config.replace(space=space(("grid", "width=8,16"), ("loguniform", "lr=1e-4:1e-3")))
    write_json(tmp_path / "sweep.json", ordered.to_dict())  # what --resume reads back: the keys in their order
    assert SweepConfig.from_dict(read_saved(tmp_path)).space.keys == ["width", "lr"]
    assert changed_settings(saved, config.replace(train=config.train.replace(steps=99))) == ["steps: 90 -> 99"]
    assert changed_settings(saved, config.replace(space=space(("grid", "width=8,32")))) == \
        ["space: {'width': {'grid': [8, 16]}} -> {'width': {'grid': [8, 32]}}"]


# -- reporting to Tune ------------------------------------------------------------------------
def test_validations_are_reported_once_the_run_went_past_them(tmp_path):
    path = tmp_path / "metrics.jsonl"
    reported = []
    reporter = ValidationReporter(path, reported.append, after=2)

    def write(*lines, partial=""):
        with open(path, "a") as f:
            f.write("".join(json.dumps(line) + "\n" for line in lines) + partial)

    write({"config": {}}, {"step": 1, "loss": 0.5}, {"step": 2, "loss": 0.4}, {"step": 2, "psnr": 20.0})
    reporter.on_step(2)
    assert reported == [] and reporter.pending is None  # step 2 was reported before the restart (after=2)
    write({"step": 3, "loss": 0.3}, {"step": 4, "loss": 0.2}, {"step": 4, "psnr": 21.0, "psnr_noisy": 18.0},
          partial='{"step": 5, "lo')
    reporter.on_step(4)
    assert reported == [] and reporter.pending == {"step": 4, "psnr": 21.0, "psnr_noisy": 18.0, "loss": 0.2}
    with open(path, "a") as f:
        f.write('ss": 0.1}\n')
    reporter.on_step(5)  # the run took another step: step 4 was not its last
    assert reported == [{"step": 4, "psnr": 21.0, "psnr_noisy": 18.0, "loss": 0.2}] and reporter.loss == 0.1


# -- ASHA after a restore -----------------------------------------------------------------------
def _write_metrics(folder: Path, curve: list[tuple[int, float]]) -> None:
    folder.mkdir(parents=True)
    lines = [{"config": {}}] + [{"step": s, "psnr": p} for s, p in curve]
    (folder / "metrics.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))


def test_restored_asha_cuts_as_the_uninterrupted_one(tmp_path):
    from ray.tune.schedulers import ASHAScheduler, TrialScheduler

    from pipeline.sweep.scheduler import ReplayedASHA

    def trial(name):
        return SimpleNamespace(trial_id=name)

    curves = {"a": [(10, 20.0), (30, 24.0), (90, 26.0)], "b": [(10, 22.0), (30, 25.0), (90, 27.0)],
              "c": [(10, 15.0)]}  # c was cut at the first rung
    newcomer = [(10, 18.0), (30, 22.0), (90, 25.0)]

    def actions(scheduler, restored):
        for name in restored:  # what Tune does with the trials of a restored experiment
            scheduler.on_trial_add(None, trial(name))
        scheduler.on_trial_add(None, trial("d"))
        return [scheduler.on_trial_result(None, trial("d"), {"step": s, "psnr": p}) for s, p in newcomer]

    def ready(scheduler):
        scheduler.set_search_properties(metric="psnr", mode="max")
        return scheduler

    uninterrupted = ready(ASHAScheduler(time_attr="step", max_t=90, grace_period=10, reduction_factor=3,
                                        stop_last_trials=False))
    for name, curve in curves.items():
        uninterrupted.on_trial_add(None, trial(name))
        for s, p in curve:
            uninterrupted.on_trial_result(None, trial(name), {"step": s, "psnr": p})
    expected = actions(uninterrupted, [])
    assert TrialScheduler.STOP in expected  # d is below the best third at the first rung

    for name, curve in curves.items():
        _write_metrics(tmp_path / name, curve)
    replayed = ReplayedASHA(str(tmp_path), max_t=90, grace_period=10, reduction_factor=3)
    assert actions(ready(replayed), curves) == expected
    # without the replay, a restored sweep's rungs start empty and the weak newcomer runs on
    plain = ASHAScheduler(time_attr="step", max_t=90, grace_period=10, reduction_factor=3, stop_last_trials=False)
    assert TrialScheduler.STOP not in actions(ready(plain), curves)


# -- the table -----------------------------------------------------------------------------------
def _fake_trial(root: Path, trial_id: str, params: dict, curve, finished: bool, steps: int = 30):
    folder = root / "trials" / trial_id
    folder.mkdir(parents=True)
    config = {"arch": "unet", "arch_args": {"depth": 2, "width": params.get("width", 8)}, "batch_size": 4}
    lines = [{"config": config}]
    for step in range(1, (curve[-1][0] if curve else 0) + 1):
        lines.append({"step": step, "loss": 0.1, "images_per_s": 8.0})
        lines += [{"step": s, "psnr": p, "psnr_noisy": 18.0} for s, p in curve if s == step]
    (folder / "metrics.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    record = {"trial_id": trial_id, "params": params}
    if finished:
        record["result"] = {"step": curve[-1][0], "psnr": curve[-1][1]}
    (folder / "trial.json").write_text(json.dumps(record))


def test_table_ranks_finished_trials_and_marks_stopped_ones(tmp_path):
    _fake_trial(tmp_path, "t0", {"width": 8, "lr": 1e-3}, [(10, 20.0), (30, 25.0)], True)
    _fake_trial(tmp_path, "t1", {"width": 16, "lr": 1e-3}, [(10, 21.0), (30, 26.0)], True)
    _fake_trial(tmp_path, "t2", {"width": 8, "lr": 1e-6}, [(10, 27.5)], False)  # stopped, yet a high early PSNR
    _fake_trial(tmp_path, "t3", {"width": 16, "lr": 1e-6}, [], False)
    trials = [("t0", {"width": 8, "lr": 1e-3}, "TERMINATED"), ("t1", {"width": 16, "lr": 1e-3}, "TERMINATED"),
              ("t2", {"width": 8, "lr": 1e-6}, "TERMINATED"), ("t3", {"width": 16, "lr": 1e-6}, "ERROR")]
    rows = write_results(tmp_path, trials, ["width", "lr"])
    assert [(r.trial, r.status) for r in rows] == [("t1", "finished"), ("t0", "finished"), ("t2", "stopped"),
                                                   ("t3", "error")]
    assert best_row(rows).trial == "t1"  # the stopped trial's PSNR is from fewer steps: never the choice
    with open(tmp_path / "results.csv", newline="") as f:
        table = list(csv.DictReader(f))
    assert table[0] == {"trial": "t1", "status": "finished", "width": "16", "lr": "0.001", "psnr": "26.0",
                        "best_psnr": "26.0", "step": "30", "psnr_noisy": "18.0", "parameters": str(rows[0].parameters),
                        "train_s": "15.0"}
    assert table[2]["step"] == "10" and table[3]["psnr"] == ""
    assert rows[0].parameters > rows[1].parameters > 0
    markdown = (tmp_path / "results.md").read_text().splitlines()
    assert markdown[0] == "| trial | status | width | lr | psnr | best_psnr | step | psnr_noisy | parameters | train_s |"
    assert "| **26.00** | 26.00 | 30 | 18.00 |" in markdown[2] and "**" not in "".join(markdown[3:])
    with Image.open(tmp_path / "sweep.png") as png:
        assert png.format == "PNG" and png.size[0] > 900


def test_categorical_keys_plot(tmp_path):
    _fake_trial(tmp_path, "t0", {"loss": "l1"}, [(10, 20.0)], True)
    _fake_trial(tmp_path, "t1", {"loss": "l2"}, [(10, 21.0)], True)
    write_results(tmp_path, [("t0", {"loss": "l1"}, "TERMINATED"), ("t1", {"loss": "l2"}, "TERMINATED")], ["loss"])
    assert (tmp_path / "sweep.png").stat().st_size > 0


# -- the command line -------------------------------------------------------------------------------
def _invoke(*args):
    from pipeline.cli import main

    return CliRunner().invoke(main, ["sweep", *args])


def test_cli_usage_errors_are_one_line(tmp_path):
    images = make_images(tmp_path / "images", count=3, size=16)
    common = ["--data", str(images), "--out", str(tmp_path / "s")]
    cases = [
        (common + ["--grid", "width=8,16"], "holdout must be at least 1"),
        (common + ["--holdout", "1"], "the search space is empty"),
        (common + ["--holdout", "1", "--grid", "width"], "--grid 'width': expected KEY=V1,V2"),
        (common + ["--holdout", "1", "--grid", "noise=gaussian:25,gaussian:50"], "noise cannot vary"),
        (common + ["--holdout", "1", "--grid", "lr=1e-3", "--choice", "lr=1e-2"], "lr is already in the search space"),
        (common + ["--holdout", "1", "--grid", "width=8", "--samples", "2"], "repeat identical trials"),
        (["--out", str(tmp_path / "s"), "--grid", "width=8"], "missing --data"),
    ]
    for args, message in cases:
        result = _invoke(*args)
        assert result.exit_code == 2 and message in result.output, (args, result.output)
        assert "Traceback" not in result.output
    assert not (tmp_path / "s").exists()


def test_cli_never_writes_into_a_foreign_folder_and_resume_keeps_the_settings(tmp_path):
    images = make_images(tmp_path / "images", count=3, size=16)
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    result = _invoke("--data", str(images), "--out", str(foreign), "--holdout", "1", "--grid", "width=8")
    assert result.exit_code == 2 and "holds no sweep.json" in result.output
    assert sorted(p.name for p in foreign.iterdir()) == ["notes.txt"]

    out = tmp_path / "s"
    out.mkdir()
    config = resolve(SweepConfig(out=str(out), train=base(data=str(images), steps=8, holdout=1, validation_images=1),
                                 space=space(("grid", "width=8,16"))))
    (out / "sweep.json").write_text(json.dumps(config.to_dict()))
    result = _invoke("--out", str(out), "--grid", "width=8,16")
    assert result.exit_code == 2 and "already holds a sweep: pass --resume" in result.output
    result = _invoke("--out", str(out), "--resume", "--steps", "99")
    assert result.exit_code == 2 and "cannot resume with changed settings: steps: 8 -> 99" in result.output
    result = _invoke("--out", str(out), "--resume", "--grid", "width=8,32")
    assert result.exit_code == 2 and "space:" in result.output


def test_cli_help_lists_the_trial_options():
    result = _invoke("--help")
    assert result.exit_code == 0
    for option in ("--grid", "--loguniform", "--space", "--samples", "--max-concurrent", "--cpus-per-trial",
                   "--workers-per-trial", "--resume", "--holdout", "--noise", "--steps", "--validate-every"):
        assert option in result.output
    assert "--workers " not in result.output and "--cpus-per-worker" not in result.output


def test_cli_space_file_fixes_fields_and_architecture_arguments(tmp_path):
    images = make_images(tmp_path / "images", count=3, size=16)
    path = tmp_path / "space.yaml"
    path.write_text("width: {grid: [8, 16]}\nresidual: true\nloss: l1\n")
    # everything is read (residual into arch_args, loss into the config) up to the missing holdout
    result = _invoke("--data", str(images), "--out", str(tmp_path / "s"), "--space", str(path))
    assert result.exit_code == 2 and "holdout must be at least 1" in result.output, result.output
    path.write_text("width: {grid: [8, 16]}\nlr: {normal: [0, 1]}\n")
    result = _invoke("--data", str(images), "--out", str(tmp_path / "s"), "--space", str(path), "--holdout", "1")
    assert result.exit_code == 2 and f"{path}: search space: lr: unknown kind 'normal'" in result.output


def test_job_script_runs_the_same_command():
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    result = subprocess.run([sys.executable, str(root / "jobs" / "sweep.py"), "--help"], capture_output=True,
                            text=True, timeout=120, env={"PYTHONPATH": str(root), "PATH": "/usr/bin:/bin"})
    assert result.returncode == 0 and "--loguniform" in result.stdout and "--holdout" in result.stdout
