"""The `n2n` command: one click group whose subcommands are the project's jobs.

Each subcommand lives in `pipeline.commands.<job>`; the `jobs/*.py` entry scripts
run the very same click commands, so options never drift apart.
"""
import click

from pipeline.commands.data import data
from pipeline.commands.train import train
from pipeline.commands.sweep import sweep
from pipeline.commands.denoise import denoise
from pipeline.commands.evaluate import evaluate_command
from pipeline.commands.assess import assess_command
from pipeline.commands.demo import demo
from pipeline.commands.bench import bench
from pipeline.commands.average import average_command
from pipeline.commands.export import export_command
from pipeline.commands.friendly_errors import FriendlyGroup, debug_option


@click.group(cls=FriendlyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="n2n")
@debug_option
def main() -> None:
    """n2n: Noise2Noise image denoising, trained data-parallel on Ray.

    Errors are one line; exit status 2 when a command cannot run as given, 1 when inputs
    failed; --debug (or N2N_DEBUG=1) shows tracebacks."""


main.add_command(data)
main.add_command(train)
main.add_command(sweep)
main.add_command(denoise)
main.add_command(evaluate_command)
main.add_command(assess_command)
main.add_command(demo)
main.add_command(bench)
main.add_command(average_command)
main.add_command(export_command)

if __name__ == "__main__":
    main()
