"""`n2n bench <name>` runs bench/<name>.py with the arguments that follow."""
import pytest
from click.testing import CliRunner

from pipeline.cli import main


@pytest.mark.parametrize("name,usage", [("data", "--image-size"), ("train", "--batch-size"),
                                        ("denoise", "--images"), ("core", "--repeats"), ("batching", "--rounds"),
                                        ("quality", "--minutes")])
def test_bench_subcommands_forward_help(name, usage):
    result = CliRunner().invoke(main, ["bench", name, "--help"])
    assert result.exit_code == 0, result.output
    assert usage in result.output


def test_bench_forwards_bad_options_to_the_script():
    result = CliRunner().invoke(main, ["bench", "data", "--no-such-option"])
    assert result.exit_code == 2  # argparse's usage error, from bench/data.py itself
