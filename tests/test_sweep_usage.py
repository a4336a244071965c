"""`n2n sweep` tried as a careless user would (issue 34, row 8): values of the wrong type
are usage errors before any trial runs, and a sweep whose trials errored exits 1."""
from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

from pipeline.cli import main
from pipeline.sweep.results import TrialRow
from pipeline.training import TrainConfig
from train_support import make_images


def sweep(*args):
    result = CliRunner().invoke(main, ["sweep", *map(str, args)])
    assert "Traceback" not in result.output, result.output
    return result.exit_code, result.output


@pytest.mark.parametrize("grid, words", [("lr=true", "lr must be a number, got True"),
                                         ("lr=abc", "lr must be a number, got 'abc'"),
                                         ("batch_size=true", "batch_size must be an integer, got True"),
                                         ("momentum=abc", "momentum must be a number, got 'abc'")])
def test_values_of_the_wrong_type_are_usage_errors_before_any_trial(tmp_path, grid, words):
    """`--grid lr=true` made every trial error and the sweep exit 0; `--grid lr=abc` said
    "'>' not supported between instances of 'str' and 'int'"."""
    images = make_images(tmp_path / "images", count=3)
    out = tmp_path / "sweep"
    status, output = sweep("--data", images, "--out", out, "--grid", grid, "--steps", "4", "--holdout", "1",
                           "--address", "local")
    assert status == 2, output
    lines = [line for line in output.splitlines() if line.strip()]
    assert lines[-1].startswith("Error: ") and words in lines[-1], output
    assert "not supported between" not in output and not out.exists()


@pytest.mark.parametrize("values, words", [({"lr": True}, "lr must be a number, got True"),
                                           ({"steps": True}, "steps must be an integer"),
                                           ({"cpus_per_worker": "1"}, "cpus_per_worker must be a number"),
                                           ({"resume": "yes"}, "resume must be true or false"),
                                           ({"data": 3}, "data must be text")])
def test_train_config_refuses_booleans_and_text_where_numbers_go(values, words):
    with pytest.raises(ValueError, match=words):
        TrainConfig(**{"data": "d", "out": "o", **values})


def test_a_sweep_whose_trials_errored_exits_1(tmp_path, monkeypatch):
    """The table is printed, then exit status 1 names how many trials errored."""
    import pipeline.sweep as sweep_package
    from pipeline.sweep.runner import SweepResult

    images = make_images(tmp_path / "images", count=3)
    out = tmp_path / "sweep"
    out.mkdir()
    (out / "results.md").write_text("| trial | status |\n")
    rows = [TrialRow(trial="t1", status="error", params={"lr": 1e-3}), TrialRow(trial="t2", status="finished",
                                                                                   params={"lr": 2e-3}, psnr=20.0)]
    result = SweepResult(rows=rows, best=rows[1], table=out / "results.csv", markdown=out / "results.md", plot=None)
    monkeypatch.setattr(sweep_package, "run_sweep", lambda config: result)
    status, output = sweep("--data", images, "--out", out, "--grid", "lr=1e-3,2e-3", "--holdout", "1",
                           "--address", "local")
    assert status == 1, output
    assert "1 of 2 trials ended in an error (t1)" in output and "error.txt" in output


@pytest.mark.slow  # a real sweep on a private Ray: about 30 s on 2 cores
def test_a_trial_that_errors_is_one_line_and_the_sweep_exits_1(tmp_path):
    """Ray Tune logged each failed trial with its whole traceback; the sweep command shows
    its first line (--debug shows the rest) and exits 1."""
    import os
    import subprocess
    import sys

    bad = tmp_path / "bad"
    bad.mkdir()
    for i in range(3):  # listed as images, none decodes: the trial fails once it trains
        (bad / f"{i}.png").write_bytes(b"not a png")
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("RAY_ADDRESS", None)
    result = subprocess.run([sys.executable, "-m", "pipeline.cli", "sweep", "--data", str(bad), "--out",
                             str(tmp_path / "sweep"), "--grid", "lr=1e-3", "--holdout", "1", "--smoke-test",
                             "--cpus-per-trial", "1", "--trial-retries", "0", "--address", "local"],
                            capture_output=True, text=True, timeout=600, env=env, cwd=Path(__file__).parents[1])
    output = result.stdout + result.stderr
    assert result.returncode == 1, output[-3000:]
    assert "Traceback" not in output and "--debug or N2N_DEBUG=1 shows the traceback" in output, output[-3000:]
    assert "1 of 1 trials ended in an error" in output
