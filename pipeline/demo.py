"""The first-run demo: sample photos -> noise -> bulk denoise -> short Ray training -> report.

Everything it needs ships with installed packages (scikit-image's sample photos and
n2n's default model), so it runs on a fresh machine with nothing downloaded:
1. the photos are written as clean PNGs, then as noisy 8-bit PNGs (what a camera stores);
2. the bulk job (`pipeline.inference`) denoises the noisy folder with the default model;
3. a short Noise2Noise training runs on Ray in local mode with two workers, on noisy
   pairs drawn from the same photos (to show the training path, not to beat the default);
4. `report.png` shows noisy / denoised / clean with PSNRs and the short run's loss curve.
Run again into the same folder, it redoes every step (the denoising with `overwrite`, the
short training from scratch), so a second `n2n demo` gives the same report. The folder
must be new, empty or a demo's (it holds `n2n-demo.json`): the demo deletes its own
`train/` run before training again, and writes `clean/`, `noisy/` and `report.png`, so
it never runs in a folder of someone else's files.
"""
from __future__ import annotations

import dataclasses
import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from n2n_core import psnr, quantize_8bit
from pipeline.data.samples import sample_photo

SAMPLE_PHOTOS = ("astronaut", "chelsea", "coffee", "rocket")
DEMO_MARKER = "n2n-demo.json"  # a folder holding it is a demo's (pipeline.storage.owned_folders)


@dataclass(frozen=True)
class DemoConfig:
    out: str = "n2n-demo"  # everything is written under this folder
    noise: str = "gaussian:25"  # noise added to the sample photos
    photos: tuple = SAMPLE_PHOTOS  # scikit-image sample photo names
    max_side: int = 320  # photos are scaled down to this side (keeps the demo at minutes)
    model: str | None = None  # checkpoint to denoise with; None = the built-in default model
    train_steps: int = 40  # steps of the short training run
    train_workers: int = 2  # Ray workers of the short training run
    seed: int = 0


def _unit(array: np.ndarray) -> torch.Tensor:
    """(H, W, 3) uint8 -> (3, H, W) float32 in [0, 1]."""
    return torch.from_numpy(np.array(array, copy=True)).permute(2, 0, 1).float() / 255


def _save_png(pixels: torch.Tensor, path: Path) -> None:
    array = (quantize_8bit(pixels) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    Image.fromarray(array).save(path)


def make_photos(config: DemoConfig, out: Path) -> list[str]:
    """Write clean/ and noisy/ PNGs; returns the file names."""
    from pipeline.quality.evaluate import add_evaluation_noise

    (out / "clean").mkdir(parents=True, exist_ok=True)
    (out / "noisy").mkdir(parents=True, exist_ok=True)
    names = []
    for index, name in enumerate(config.photos):
        clean = _unit(sample_photo(name, config.max_side))
        noisy = add_evaluation_noise(clean, config.noise, config.seed, index, clip=True)
        _save_png(clean, out / "clean" / f"{name}.png")
        _save_png(noisy, out / "noisy" / f"{name}.png")
        names.append(f"{name}.png")
    return names


def _load(path: Path) -> torch.Tensor:
    with Image.open(path) as image:
        return _unit(np.asarray(image.convert("RGB")))


def write_report(out: Path, names: list[str], train_metrics: Path | None, path: Path,
                 model_label: str = "the default model") -> dict:
    """The report picture: a row per photo (noisy, denoised, clean, with PSNRs) and the loss curve."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    from pipeline.training.curves import read_metrics

    rows, scores = [], {}
    for name in names:
        clean, noisy, denoised = (_load(out / folder / name) for folder in ("clean", "noisy", "denoised"))
        noisy_db, denoised_db = float(psnr(noisy.double(), clean.double())), float(psnr(denoised.double(), clean.double()))
        scores[name] = {"noisy_psnr": noisy_db, "denoised_psnr": denoised_db}
        rows.append((name, noisy, denoised, clean, noisy_db, denoised_db))
    records = read_metrics(train_metrics)[1] if train_metrics and train_metrics.exists() else []
    losses = [(r["step"], r["loss"]) for r in records if "loss" in r]

    figure = Figure(figsize=(12, 3.6 * len(rows) + (3.2 if losses else 0)))
    grid = figure.add_gridspec(len(rows) + (1 if losses else 0), 3)
    mean_gain = sum(d - n for *_, n, d in rows) / len(rows)
    figure.suptitle(f"n2n demo: mean PSNR gain {mean_gain:+.2f} dB with {model_label}", fontsize=14)
    for r, (name, noisy, denoised, clean, noisy_db, denoised_db) in enumerate(rows):
        for c, (image, title) in enumerate(((noisy, f"noisy {noisy_db:.2f} dB"),
                                            (denoised, f"denoised {denoised_db:.2f} dB"), (clean, "clean"))):
            axis = figure.add_subplot(grid[r, c])
            axis.imshow(image.permute(1, 2, 0).numpy(), interpolation="nearest")
            axis.set_title(f"{name}: {title}" if c == 0 else title, fontsize=10)
            axis.axis("off")
    if losses:
        axis = figure.add_subplot(grid[len(rows), :])
        axis.plot(*zip(*losses), lw=1.2)
        axis.set_xlabel("step")
        axis.set_ylabel("training loss (noisy targets)")
        axis.set_title("short two-worker Noise2Noise training on Ray (local mode)")
    figure.tight_layout(rect=(0, 0, 1, 1 - 0.5 / figure.get_figheight()))  # room for the title
    temporary = path.with_name(f".{path.name}.tmp")
    figure.savefig(temporary, format="png", dpi=80)
    temporary.replace(path)
    return {"images": scores, "mean_gain": mean_gain}


def run_demo(config: DemoConfig) -> dict:
    """Run the whole demo; returns a summary (also written to summary.json)."""
    from pipeline.inference.config import DenoiseConfig
    from pipeline.inference.job import run_denoise
    from pipeline.training import TrainConfig, train

    from pipeline.storage.owned_folders import claim_folder

    out = claim_folder(config.out, DEMO_MARKER, option="--out", what="the demo",
                       legacy=("clean", "noisy", "summary.json", "report.png"))
    names = make_photos(config, out)
    summary = run_denoise(DenoiseConfig(input=str(out / "noisy"), output=str(out / "denoised"), model=config.model,
                                        tile=None, overwrite=True))
    if summary.failed:
        raise RuntimeError(f"the demo's denoising failed:\n{summary.format()}")
    train_metrics = None
    if config.train_steps > 0:
        shutil.rmtree(out / "train", ignore_errors=True)  # the demo's own short run: a rerun starts it afresh
        result = train(TrainConfig(
            data=str(out / "clean"), out=str(out / "train"), arch="unet", arch_args={"depth": 3, "width": 16},
            noise=config.noise, workers=config.train_workers, steps=config.train_steps, batch_size=8, crop_size=64,
            checkpoint_every=config.train_steps, validate_every=max(1, config.train_steps // 4), validation_images=2,
            seed=config.seed,
        ))
        train_metrics = result.metrics
    label = f"model {Path(config.model).name}" if config.model else "the default model"
    report = write_report(out, names, train_metrics, out / "report.png", label)
    report.update(report=str(out / "report.png"), denoise_seconds=summary.seconds)
    (out / "summary.json").write_text(json.dumps(report, indent=2))
    return report


def format_summary(report: dict) -> str:
    lines = [f"{'photo':<16} {'noisy dB':>9} {'denoised dB':>12}"]
    for name, s in report["images"].items():
        lines.append(f"{name:<16} {s['noisy_psnr']:9.2f} {s['denoised_psnr']:12.2f}")
    lines.append(f"mean gain {report['mean_gain']:+.2f} dB; report picture: {report['report']}")
    return "\n".join(lines)


def config_fields() -> list[str]:
    return [f.name for f in dataclasses.fields(DemoConfig)]


__all__ = ["DemoConfig", "run_demo", "format_summary", "sample_photo", "SAMPLE_PHOTOS", "config_fields"]
