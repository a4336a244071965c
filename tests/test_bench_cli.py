"""`n2n bench <name>` runs `python -m bench.<name>` with the arguments that follow.

The benchmark is a child process writing to this process's stdout and stderr, so its
output is read with `capfd` rather than from the CliRunner's result.
"""
import pytest
from click.testing import CliRunner

import pipeline.commands.bench as bench_command
from pipeline.cli import main


@pytest.mark.parametrize("name,usage", [("data", "--image-size"), ("train", "--batch-size"),
                                        ("denoise", "--images"), ("core", "--repeats"), ("batching", "--rounds"),
                                        ("quality", "--minutes")])
def test_bench_subcommands_forward_help(name, usage, capfd):
    result = CliRunner().invoke(main, ["bench", name, "--help"])
    output = capfd.readouterr().out
    assert result.exit_code == 0, result.output + output
    assert usage in output


def test_bench_forwards_bad_options_to_the_script(capfd):
    result = CliRunner().invoke(main, ["bench", "data", "--no-such-option"])
    assert result.exit_code == 2  # argparse's usage error, from bench/data.py itself
    assert "--no-such-option" in capfd.readouterr().err


def test_bench_without_the_source_checkout_says_so_in_one_line(tmp_path, monkeypatch):
    monkeypatch.setattr(bench_command, "SOURCE_ROOT", tmp_path)  # an install without bench/, as from a wheel
    result = CliRunner().invoke(main, ["bench", "core"])
    assert result.exit_code == 1
    assert result.output.strip().splitlines() == [
        "Error: the benchmarks (bench/) are not here: run them from a source checkout installed with "
        "`pip install -e .`"]


def test_a_benchmarks_error_is_one_line_and_debug_shows_the_traceback(tmp_path, capfd):
    missing = str(tmp_path / "no-such-photos")
    result = CliRunner().invoke(main, ["bench", "data", "--data", missing])
    err = capfd.readouterr().err
    assert result.exit_code == 1
    assert err.strip().splitlines() == [f"Error: FileNotFoundError: no such file or folder: {missing} "
                                        "(--debug or N2N_DEBUG=1 shows the traceback)"]
    result = CliRunner().invoke(main, ["--debug", "bench", "data", "--data", missing])
    err = capfd.readouterr().err
    assert result.exit_code == 1
    assert err.startswith("Traceback") and err.strip().endswith(f"FileNotFoundError: no such file or folder: {missing}")
