"""`n2n demo`: the first-run demo (noise, bulk denoise, short Ray training, report picture)."""
import click

from pipeline.commands.verbose import quiet_command
from pipeline.demo import SAMPLE_PHOTOS, DemoConfig, format_summary, run_demo


@click.command("demo")
@click.option("--out", default="n2n-demo", show_default=True, help="Folder for photos, outputs and report.png.")
@click.option("--noise", default="gaussian:25", show_default=True, help="Noise added to the sample photos.")
@click.option("--model", default=None, help="Checkpoint to denoise with (default: the built-in default model).")
@click.option("--max-side", default=320, show_default=True, type=int, help="Scale photos down to this side.")
@click.option("--train-steps", default=40, show_default=True, type=int, help="Steps of the short training (0: skip).")
@click.option("--train-workers", default=2, show_default=True, type=int, help="Ray workers of the short training.")
@click.option("--photo", "photos", multiple=True, help=f"scikit-image sample photos (default: {', '.join(SAMPLE_PHOTOS)}).")
@click.option("--seed", default=0, show_default=True, type=int)
@quiet_command("demo")
def demo(out, noise, model, max_side, train_steps, train_workers, photos, seed):
    """Add noise to sample photos, denoise them with the default model through the bulk job,
    run a short two-worker training on Ray, and write OUT/report.png."""
    config = DemoConfig(out=out, noise=noise, model=model, max_side=max_side, train_steps=train_steps,
                        train_workers=train_workers, photos=tuple(photos) or SAMPLE_PHOTOS, seed=seed)
    click.echo(format_summary(run_demo(config)))
