"""`n2n evaluate`: PSNR and SSIM of a denoiser on clean images with added noise."""
import sys

import click

from pipeline.evaluate import EvaluateConfig, evaluate, report_json


@click.command("evaluate")
@click.option("--data", required=True, help="Folder or Parquet of CLEAN images (noise is added here).")
@click.option("--model", default=None, help="Checkpoint to evaluate (default: the built-in default model).")
@click.option("--noise", default="gaussian:25", show_default=True, help="Noise spec, e.g. gaussian:25, poisson:30.")
@click.option("--seed", default=0, show_default=True, type=int, help="Noise seed (same seed, same noisy inputs).")
@click.option("--limit", default=None, type=int, help="Evaluate only the first N images.")
@click.option("--tile", default=None, type=int, help="Tile size for very large images.")
@click.option("--clip-input", is_flag=True, help="Feed clipped 8-bit noisy images instead of float.")
@click.option("--self-ensemble", is_flag=True,
              help="Average the model over the 8 flips and rotations of each image (8 forward passes).")
@click.option("--device", default="cpu", show_default=True, help="cpu, cuda or cuda:N.")
@click.option("--strip", default=None, type=click.Path(dir_okay=False), help="Write a noisy/denoised/clean PNG here.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON instead of a table.")
def evaluate_command(data, model, noise, seed, limit, tile, clip_input, self_ensemble, device, strip, as_json):
    """Add NOISE to the clean images of DATA, denoise them, report PSNR/SSIM per image and the mean.

    PSNR is measured on 8-bit output (clipped, rounded) against the clean image; the
    noisy input's PSNR is printed beside it.
    """
    config = EvaluateConfig(
        data=data, model=model, noise=noise, seed=seed, limit=limit, tile=tile,
        clip_input=clip_input, self_ensemble=self_ensemble, device=device, strip=strip,
    )
    report = evaluate(config, progress=not as_json)
    click.echo(report_json(report) if as_json else report.table())
    if report.failed:
        sys.exit(1)
