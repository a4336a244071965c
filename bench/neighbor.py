"""Neighbor2Neighbor against Noise2Noise and clean targets, and a fine-tune of the default on noisy photos.

    PYTHONPATH=. python bench/neighbor.py methods --train ../shared/data/bsds400 --test ../shared/data/cbsd68
    PYTHONPATH=. python bench/neighbor.py finetune --train ../shared/data/bsds400 --test ../shared/data/cbsd68

`methods`: the same U-Net (the default model's architecture: depth 4, width 44, residual),
the same initial weights, batches and seed, trained from scratch on `--train` with
`gaussian:25` by three targets: noisy (Noise2Noise: two independent draws), neighbor
(Neighbor2Neighbor: one draw, sub-sampled), clean (supervised). The three train in this
process side by side, one step of each in turn (each a `GradientWorker`, the code every
training worker runs, with its own Adam), so they see the same machine load; the step
times are per method. Every `--every` steps each keeps a copy of its weights. Then every
image of `--test` (pipeline.quality.evaluate's seeded noise, float and 8-bit inputs, whole images,
PSNR of the 8-bit output) is scored at equal steps (the last) and at equal wall time (each
method's copy nearest to the fastest one's total time).

`finetune`: noise the default model handles badly (`--noise`, by default strong shot noise,
5 photons at white, beyond its training mixture; independent from pixel to pixel, which
Neighbor2Neighbor needs: grain and demosaiced camera noise are correlated between
neighbours): noisy 8-bit copies of `--train` are
written to a temporary folder, and `n2n train --target neighbor --noise none --init-from
default` (the real training path, in process) sees only those. Then the default and the
fine-tuned model on `--test` with that noise (the gain) and with `gaussian:25` (where the
default was good), and with the same noise at a milder strength (`--mild`: the same camera
in brighter scenes); also the even weight mean of the two (`n2n average`).
"""
from __future__ import annotations

import json
import statistics
import tempfile
import time
from pathlib import Path

import click
import numpy as np
import torch
from PIL import Image

from n2n_core import average_models, psnr, quantize_8bit
from pipeline.data.datasets import open_dataset
from pipeline.data.images import decode_image
from pipeline.data.noise import parse_noise
from pipeline.data.patches import row_generator
from pipeline.quality.evaluate import add_evaluation_noise, load_model
from pipeline.inference.tiling import denoise_image
from pipeline.training import TrainConfig, train
from pipeline.training.flat import FlatParameters
from pipeline.training.replica import make_model, make_optimizer
from pipeline.training.worker import GradientWorker
from bench.machine import describe_machine

DEFAULT_ARCH = {"depth": 4, "width": 44, "residual": True}
SHOT = "poisson:5"  # strong shot noise (5 photons at white), beyond the default's training mixture


class TestSet:
    """The clean images of a folder, scored against noisy copies made by pipeline.quality.evaluate's seeded noise."""

    def __init__(self, folder: str, count: int | None):
        dataset = open_dataset(folder)
        n = len(dataset) if count is None else min(count, len(dataset))
        self.clean = [decode_image(dataset.read(i), dataset.keys[i]).pixels for i in range(n)]  # (3, H, W) each

    def score(self, model, noise: str, inputs: str) -> float:
        """Mean PSNR (dB) of the model's 8-bit output (None: of the noisy input); inputs "float"
        (unclipped) or "8bit"."""
        if model is not None:
            model.eval()
        total = 0.0
        with torch.no_grad():
            for index, clean in enumerate(self.clean):
                noisy = add_evaluation_noise(clean, noise, 0, index, clip=inputs == "8bit")
                out = quantize_8bit(denoise_image(model, noisy)).double() if model is not None else quantize_8bit(noisy).double()
                total += float(psnr(out, quantize_8bit(clean).double()))
        return total / len(self.clean)


@click.group()
def main() -> None:
    """Neighbor2Neighbor benchmarks (see the module docstring)."""


@main.command()
@click.option("--train", "train_data", required=True, help="Clean training images (BSDS400).")
@click.option("--test", "test_data", required=True, help="Clean test images (CBSD68).")
@click.option("--steps", default=1500, show_default=True, help="Optimizer steps of each method.")
@click.option("--every", default=100, show_default=True, help="Steps between kept weights (the equal-time figure).")
@click.option("--batch-size", default=16, show_default=True)
@click.option("--crop-size", default=64, show_default=True)
@click.option("--lr", default=1e-3, show_default=True)
@click.option("--test-images", type=int, default=None, help="Score only the first N test images.")
@click.option("--json", "json_path", type=click.Path(dir_okay=False), help="Also write the results here.")
def methods(train_data, test_data, steps, every, batch_size, crop_size, lr, test_images, json_path) -> None:
    """Noise2Noise, Neighbor2Neighbor and clean targets, side by side, equal steps and equal time."""
    with tempfile.TemporaryDirectory() as tmp:
        base = TrainConfig(data=train_data, out=tmp, arch="unet", arch_args=dict(DEFAULT_ARCH), noise="gaussian:25",
                           steps=steps, batch_size=batch_size, crop_size=crop_size, lr=lr, seed=0, ray=False,
                           device="cpu", progress=False)
        runs = {}
        for target in ("noisy", "neighbor", "clean"):
            config = base.replace(target=target)
            worker = GradientWorker(config, threads=None, device=torch.device("cpu"))
            model = make_model(config)  # the same initial weights for the three (the seed's)
            flat = FlatParameters(model)
            runs[target] = {"config": config, "worker": worker, "flat": flat,
                            "optimizer": make_optimizer(config, model), "model": model, "times": [], "kept": []}
        positions = range(base.rows_per_step)
        for step in range(steps):
            for target in (list(runs) if step % 2 == 0 else list(runs)[::-1]):
                run = runs[target]
                t0 = time.perf_counter()
                run["worker"].flat.load(run["flat"].weights)
                run["worker"].compute(step, positions)
                run["flat"].grads.copy_(run["worker"].flat.grads)
                run["optimizer"].lr = run["config"].lr_at(step)
                run["optimizer"].step()
                run["times"].append(time.perf_counter() - t0)
                if (step + 1) % every == 0 or step + 1 == steps:
                    run["kept"].append((step + 1, sum(run["times"]), run["flat"].weights.clone()))
            if (step + 1) % every == 0:
                click.echo(f"step {step + 1}: " + ", ".join(
                    f"{t} {1e3 * statistics.median(r['times'][-every:]):.0f} ms/step" for t, r in runs.items()))
        for run in runs.values():
            run["worker"].prefetch.close()
        testset = TestSet(test_data, test_images)
        fastest = min(sum(run["times"]) for run in runs.values())
        results = {"machine": describe_machine(), "steps": steps, "batch": f"{batch_size} crops of {crop_size}x{crop_size}",
                   "arch": DEFAULT_ARCH, "test_images": len(testset.clean), "methods": {}}
        for inputs in ("float", "8bit"):
            results[f"noisy_input_{inputs}"] = testset.score(None, "gaussian:25", inputs)
        for target, run in runs.items():
            row = {"ms_per_step": 1e3 * statistics.median(run["times"]), "seconds": sum(run["times"])}
            model = run["model"]
            for label, (step, seconds, weights) in (("equal_steps", run["kept"][-1]),
                                                    ("equal_time", min(run["kept"], key=lambda k: abs(k[1] - fastest)))):
                run["flat"].weights.copy_(weights)
                row[label] = {"step": step, "seconds": seconds,
                              **{inputs: testset.score(model, "gaussian:25", inputs) for inputs in ("float", "8bit")}}
            results["methods"][target] = row
            click.echo(f"{target:>9}: {row['ms_per_step']:.0f} ms/step; {steps} steps: float "
                       f"{row['equal_steps']['float']:.3f} dB, 8-bit {row['equal_steps']['8bit']:.3f} dB; at "
                       f"{fastest:.0f} s ({row['equal_time']['step']} steps): float {row['equal_time']['float']:.3f}, "
                       f"8-bit {row['equal_time']['8bit']:.3f}")
        gap = {inputs: results["methods"]["noisy"]["equal_steps"][inputs] - results["methods"]["neighbor"]["equal_steps"][inputs]
               for inputs in ("float", "8bit")}
        results["noise2noise_minus_neighbor_db"] = gap
        click.echo(f"Noise2Noise - Neighbor2Neighbor at equal steps: float {gap['float']:.3f} dB, 8-bit "
                   f"{gap['8bit']:.3f} dB (the paper's gap: 0.33 dB on Kodak at sigma 25); noisy input: float "
                   f"{results['noisy_input_float']:.2f}, 8-bit {results['noisy_input_8bit']:.2f} dB; {describe_machine()}")
    if json_path:
        Path(json_path).write_text(json.dumps(results, indent=2))


def write_noisy_copies(source: str, folder: Path, noise: str) -> Path:
    """8-bit PNG noisy copies of every image of `source`: what a user with only noisy photos has."""
    folder.mkdir(parents=True, exist_ok=True)
    dataset, model = open_dataset(source), parse_noise(noise).clipped()
    for index in range(len(dataset)):
        clean = decode_image(dataset.read(index), dataset.keys[index]).pixels
        noisy = quantize_8bit(model.apply(clean, row_generator(7, -2, index)))  # (3, H, W) on k / 255
        array = (noisy.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
        Image.fromarray(array).save(folder / f"{index:04d}.png")
    return folder


@main.command()
@click.option("--train", "train_data", required=True, help="Clean images made into noisy photos (BSDS400).")
@click.option("--test", "test_data", required=True, help="Clean test images (CBSD68).")
@click.option("--noise", default=SHOT, show_default=True,
              help="The photos' noise: independent from pixel to pixel, as Neighbor2Neighbor assumes.")
@click.option("--steps", default=1000, show_default=True)
@click.option("--lr", default=1e-4, show_default=True)
@click.option("--batch-size", default=16, show_default=True)
@click.option("--crop-size", default=96, show_default=True, help="A multiple of 32 (the default's 16, halved).")
@click.option("--mild", default="poisson:30", show_default=True,
              help="The same kind of noise where the default is good already (brighter scenes).")
@click.option("--photos-noise", default=None,
              help="The noise of the photos fine-tuned on, when not --noise alone: e.g. "
                   "'poisson:5 | poisson:30', one camera in dim and bright scenes (one component per photo).")
@click.option("--nb-mask-clipped/--no-nb-mask-clipped", "mask_clipped", default=True, show_default=True,
              help="As n2n train's: leave out the targets next to white-clipped pixels.")
@click.option("--test-images", type=int, default=None, help="Score only the first N test images.")
@click.option("--save-model", type=click.Path(dir_okay=False), help="Keep the fine-tuned model here.")
@click.option("--json", "json_path", type=click.Path(dir_okay=False), help="Also write the results here.")
def finetune(train_data, test_data, noise, steps, lr, batch_size, crop_size, mild, photos_noise, mask_clipped,
             test_images, save_model, json_path) -> None:
    """The default fine-tuned on noisy photos alone (Neighbor2Neighbor), before and after."""
    with tempfile.TemporaryDirectory() as tmp:
        photos = write_noisy_copies(train_data, Path(tmp) / "photos", photos_noise or noise)
        config = TrainConfig(data=str(photos), out=str(Path(tmp) / "run"), arch="unet",
                             arch_args=dict(DEFAULT_ARCH), target="neighbor",
                             noise="none", init_from="default", steps=steps, lr=lr, batch_size=batch_size,
                             crop_size=crop_size, ray=False, device="cpu", progress=False, validation_images=4,
                             validate_every=max(1, steps // 4), checkpoint_every=steps, nb_mask_clipped=mask_clipped)
        t0 = time.perf_counter()
        result = train(config)
        seconds = time.perf_counter() - t0
        if save_model:
            import shutil

            shutil.copyfile(result.checkpoint, save_model)
    tuned = result.model
    default = load_model(None)
    mean = average_models([default, tuned])  # what `n2n average` makes of the two: both kinds of photo
    testset = TestSet(test_data, test_images)
    results = {"machine": describe_machine(), "noise": noise, "photos_noise": photos_noise or noise, "steps": steps, "lr": lr, "seconds": seconds, "mask_clipped": mask_clipped,
               "batch": f"{batch_size} crops of {crop_size}x{crop_size}", "test_images": len(testset.clean), "rows": []}
    for spec in (noise, mild, "gaussian:25"):
        for inputs in ("float", "8bit"):
            row = {"noise": spec, "inputs": inputs, "noisy": testset.score(None, spec, inputs),
                   "default": testset.score(default, spec, inputs), "fine_tuned": testset.score(tuned, spec, inputs),
                   "mean": testset.score(mean, spec, inputs)}
            results["rows"].append(row)
            click.echo(f"{spec:>22} {inputs:>5}: noisy {row['noisy']:.2f} dB, default {row['default']:.3f} dB, "
                       f"fine-tuned {row['fine_tuned']:.3f} dB ({row['fine_tuned'] - row['default']:+.3f}), "
                       f"their mean {row['mean']:.3f} dB ({row['mean'] - row['default']:+.3f})")
    click.echo(f"{steps} steps in {seconds:.0f} s on {describe_machine()}")
    if json_path:
        Path(json_path).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
