"""`n2n evaluate`: PSNR and SSIM of a denoiser on clean images with added noise, beside a peer."""
import sys

import click

from pipeline.commands.verbose import quiet_command
from pipeline.errors import UsageError
from pipeline.quality.evaluate import INPUTS, PEERS, EvaluateConfig, evaluate, report_json


@click.command("evaluate")
@click.option("--data", required=True, help="Folder or Parquet of CLEAN images (noise is added here).")
@click.option("--model", default=None, help="Checkpoint to evaluate (default: the built-in default model).")
@click.option("--noise", default="gaussian:25", show_default=True,
              help="Noise spec, e.g. gaussian:25, poisson:30, camera, 'gaussian:25,jpeg=80'.")
@click.option("--seed", default=0, show_default=True, type=int, help="Noise seed (same seed, same noisy inputs).")
@click.option("--limit", default=None, type=click.IntRange(min=1), help="Evaluate only the first N images.")
@click.option("--tile", default=None, type=click.IntRange(min=1), help="Tile size for very large images.")
@click.option("--inputs", type=click.Choice(list(INPUTS)), default="both", show_default=True,
              help="Input conventions: float (unclipped noise, as published) and/or 8bit (clipped, rounded: "
                   "what files hold).")
@click.option("--clip-input", is_flag=True, help="Same as --inputs 8bit.")
@click.option("--self-ensemble", is_flag=True,
              help="Average the model over the 8 flips and rotations of each image (8 forward passes).")
@click.option("--peer", type=click.Choice(list(PEERS)), default=None,
              help="Also run this classical denoiser on the same inputs (cbm3d: pip install 'n2n[peers]'; "
                   "about 40-60 s per 500x500 image on 2 cores).")
@click.option("--peer-cache", type=click.Path(file_okay=False), default=None,
              help="Folder keeping the peer's outputs, so a second model is compared without rerunning it.")
@click.option("--device", default="cpu", show_default=True, help="cpu, cuda or cuda:N.")
@click.option("--precision", type=click.Choice(["float32", "bfloat16", "float16"]), default="float32",
              show_default=True, help="The model's arithmetic (the scores are always computed in float64).")
@click.option("--strip", default=None, help="Write a noisy/denoised/clean PNG here.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON instead of a table.")
@quiet_command("evaluate")
def evaluate_command(data, model, noise, seed, limit, tile, inputs, clip_input, self_ensemble, peer, peer_cache,
                     device, precision, strip, as_json):
    """Add NOISE to the clean images of DATA, denoise them, report PSNR/SSIM per image and the mean.

    PSNR is measured on 8-bit output (clipped, rounded) against the clean image, for
    float and 8-bit inputs side by side; the noisy input's PSNR is printed beside it.
    Exits 1 if any image failed.
    """
    if clip_input:
        if inputs not in ("both", "8bit"):
            raise UsageError("--clip-input means --inputs 8bit; drop one of them")
        inputs = "8bit"
    try:
        config = EvaluateConfig(data=data, model=model, noise=noise, seed=seed, limit=limit, tile=tile,
                                inputs=inputs, self_ensemble=self_ensemble, peer=peer, peer_cache=peer_cache,
                                device=device, precision=precision, strip=strip)
    except ValueError as e:
        raise UsageError(str(e)) from None
    from n2n_core.tensorfile import CheckpointError

    try:
        report = evaluate(config, progress=not as_json)
    except (FileNotFoundError, CheckpointError) as e:  # --data or --model: bad usage, named
        raise UsageError(str(e)) from None
    except RuntimeError as e:  # a missing optional package, named
        raise click.ClickException(str(e)) from None
    click.echo(report_json(report) if as_json else report.table())
    if report.failed:
        sys.exit(1)
