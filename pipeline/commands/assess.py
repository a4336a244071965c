"""`n2n assess`: how much noise the model leaves in real photos, with no clean reference."""
import sys

import click

from pipeline.quality.assess import AssessConfig, assess, report_json
from pipeline.errors import UsageError


@click.command("assess")
@click.argument("data", metavar="PHOTOS")
@click.option("--model", default=None, help="Checkpoint (default: the built-in default model).")
@click.option("--strength", type=click.FloatRange(0.0, 1.0), default=1.0, show_default=True,
              help="Correction applied: noisy + strength x (denoised - noisy).")
@click.option("--limit", type=click.IntRange(min=1), default=None, help="Only the first N photos.")
@click.option("--tile", type=click.IntRange(min=0), default=512, show_default=True, help="Tile side; 0: whole photos.")
@click.option("--self-ensemble", is_flag=True, help="Average over the 8 flips and rotations (8 passes).")
@click.option("--device", default="cpu", show_default=True, help="cpu, cuda or cuda:N.")
@click.option("--strip", default=None, help="Before/after PNG of the first photos.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
def assess_command(data, model, strength, limit, tile, self_ensemble, device, strip, as_json):
    """Denoise the noisy PHOTOS (folder or Parquet) and report, per photo, the wavelet
    estimate of the noise sigma before and after and the share kept (no clean images needed).
    Exits 1 if any photo failed to load."""
    from n2n_core.tensorfile import CheckpointError

    try:
        config = AssessConfig(data=data, model=model, strength=strength, limit=limit, tile=tile or None,
                              self_ensemble=self_ensemble, device=device, strip=strip)
        report = assess(config, progress=not as_json)
    except (ValueError, FileNotFoundError, CheckpointError) as e:
        raise UsageError(str(e)) from None
    click.echo(report_json(report) if as_json else report.table())
    if report.failed:
        sys.exit(1)
