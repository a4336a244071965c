"""`n2n average`: average the weights of checkpoints of one architecture into a new file."""
import click

from pipeline.averaging import AverageConfig, average_checkpoints


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

    The checkpoints must share one architecture and should be fine-tunes of one model or
    points along one run: two networks trained apart average into a poor one. OUT holds
    the model alone; train on from it with `n2n train --init-from OUT`.
    """
    from n2n_core.tensorfile import CheckpointError

    try:
        config = AverageConfig(sources=tuple(checkpoints), destination=out, weights=weights)
    except ValueError as e:
        raise click.UsageError(str(e)) from None
    try:
        path = average_checkpoints(config)
    except CheckpointError as e:
        raise click.UsageError(str(e)) from None
    except ValueError as e:
        raise click.ClickException(str(e)) from None
    click.echo(f"wrote {path}")
