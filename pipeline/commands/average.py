"""`n2n average`: average the weights of checkpoints of one architecture into a new file."""
import click

from pipeline.model_files.weight_mean import AverageConfig, average_checkpoints
from pipeline.errors import UsageError


def _weights(_ctx, _param, value):
    if value is None:
        return None
    try:
        return tuple(float(w) for w in value.split(","))
    except ValueError:
        raise click.BadParameter(f"{value!r} is not a comma-separated list of numbers") from None


@click.command("average")
@click.argument("checkpoints", nargs=-1, required=True, type=click.Path(dir_okay=False))
@click.option("--out", required=True, type=click.Path(dir_okay=False),
              help="The new checkpoint (must not exist; never replaced).")
@click.option("--weights", default=None, callback=_weights,
              help="One weight per checkpoint, comma-separated (scaled to sum to 1), e.g. 0.75,0.25. "
                   "Default: the plain mean.")
def average_command(checkpoints, out, weights):
    """Write OUT: a model whose weights are the weighted mean of CHECKPOINTS' (a "model soup").

    A checkpoint named `default` is the built-in model (e.g. a fine-tune of it and itself).

    The checkpoints must share one architecture and should be fine-tunes of one model or
    points along one run: two networks trained apart average into a poor one. OUT holds
    the model alone; train on from it with `n2n train --init-from OUT`.
    """
    from n2n_core.tensorfile import CheckpointError

    try:  # the destination first: nothing is read for a command that cannot write its result
        config = AverageConfig(sources=tuple(checkpoints), destination=out, weights=weights)
        path = average_checkpoints(config)
    except (CheckpointError, ValueError) as e:  # a bad --out or --weights, or sources that do not fit together
        raise UsageError(str(e)) from None
    click.echo(f"wrote {path}")
