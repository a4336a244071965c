"""Evaluate a denoiser on clean images: add known noise, denoise, report PSNR and SSIM.

For every clean image of a dataset (folder or Parquet) this draws noise from a seeded
generator (so two runs, or two models, see exactly the same noisy inputs), denoises it
with `pipeline.inference.tiling.denoise_image`, and measures the result against the
clean image.

Conventions (decided here, documented in the README):
- PSNR and SSIM are computed on 8-bit output: clipped to [0, 1] and rounded to 1/255,
  against the clean image, which is 8-bit already for 8-bit files.
- The model input is the clean image plus the noise *unclipped and unquantized*, the
  convention of the published CBSD68 figures (noisy PSNR about 20.2 dB at sigma 25).
  `clip_input=True` instead feeds what a camera would store (clipped, 8-bit).
- The noisy input's PSNR beside it is measured the same way as the output's (8-bit).
- Grey images are denoised as grey (the RGB model sees them replicated, see tiling).
"""
from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field

import torch

from n2n_core import psnr, quantize_8bit, ssim
from pipeline.datasets import open_dataset
from pipeline.images import BadImageError, decode_image
from pipeline.noise import parse_noise


@dataclass(frozen=True)
class EvaluateConfig:
    data: str  # folder or Parquet of clean images
    model: str | None = None  # checkpoint path; None = the built-in default model
    noise: str = "gaussian:25"  # noise spec added to the clean images
    seed: int = 0  # noise seed: image i gets generator seed (seed, i)
    limit: int | None = None  # evaluate only the first N images
    tile: int | None = None  # tile size for large images (None = whole image)
    clip_input: bool = False  # feed clipped 8-bit noisy input instead of float
    self_ensemble: bool = False  # average over the 8 flips and rotations (8 forward passes)
    device: str = "cpu"
    strip: str | None = None  # write a noisy / denoised / clean PNG strip here
    strip_count: int = 4  # images in the strip


@dataclass
class ImageScore:
    key: str
    noisy_psnr: float
    denoised_psnr: float
    noisy_ssim: float
    denoised_ssim: float

    @property
    def gain(self) -> float:
        return self.denoised_psnr - self.noisy_psnr


@dataclass
class EvaluateReport:
    config: EvaluateConfig
    scores: list[ImageScore] = field(default_factory=list)
    failed: list[tuple[str, str]] = field(default_factory=list)  # (key, reason)
    seconds: float = 0.0

    def mean(self, attribute: str) -> float:
        values = [getattr(s, attribute) for s in self.scores]
        return sum(values) / len(values) if values else float("nan")

    def to_dict(self) -> dict:
        return {
            "config": asdict(self.config),
            "images": [dict(asdict(s), gain=s.gain) for s in self.scores],
            "mean": {
                "noisy_psnr": self.mean("noisy_psnr"),
                "denoised_psnr": self.mean("denoised_psnr"),
                "gain": self.mean("gain"),
                "noisy_ssim": self.mean("noisy_ssim"),
                "denoised_ssim": self.mean("denoised_ssim"),
            },
            "failed": [{"key": k, "reason": r} for k, r in self.failed],
            "seconds": self.seconds,
        }

    def table(self) -> str:
        width = max([len(s.key) for s in self.scores] + [5])
        head = f"{'image':<{width}}  {'noisy dB':>9}  {'denoised dB':>11}  {'gain dB':>8}  {'SSIM':>6}"
        lines = [head, "-" * len(head)]
        for s in self.scores:
            lines.append(
                f"{s.key:<{width}}  {s.noisy_psnr:9.2f}  {s.denoised_psnr:11.2f}  {s.gain:8.2f}  {s.denoised_ssim:6.4f}"
            )
        lines.append("-" * len(head))
        lines.append(
            f"{'mean':<{width}}  {self.mean('noisy_psnr'):9.2f}  {self.mean('denoised_psnr'):11.2f}  "
            f"{self.mean('gain'):8.2f}  {self.mean('denoised_ssim'):6.4f}"
        )
        for key, reason in self.failed:
            lines.append(f"failed: {key}: {reason}")
        return "\n".join(lines)


def noise_generator(seed: int, index: int) -> torch.Generator:
    """The generator of image `index`: independent of how many images are evaluated."""
    return torch.Generator().manual_seed(seed * 1_000_003 + index)


def add_evaluation_noise(clean: torch.Tensor, noise_spec: str, seed: int, index: int, clip: bool = False) -> torch.Tensor:
    """(C, H, W) clean in [0, 1] -> noisy (C, H, W); clipped to 8 bits when `clip`."""
    noisy = parse_noise(noise_spec).apply(clean, noise_generator(seed, index))
    return quantize_8bit(noisy) if clip else noisy


def load_model(path: str | None, device: str = "cpu"):
    """The checkpoint's model in eval mode; None loads the built-in default model."""
    from n2n_core import load_checkpoint
    from pipeline.assets import default_model_path

    checkpoint = load_checkpoint(path if path else default_model_path(), map_location=device)
    return checkpoint.model.to(device=torch.device(device)).eval()


def evaluate(config: EvaluateConfig, *, model=None, progress: bool = True) -> EvaluateReport:
    """Denoise noisy copies of every clean image of `config.data` and score them."""
    from tqdm import tqdm

    from pipeline.inference.tiling import denoise_image

    model = model if model is not None else load_model(config.model, config.device)
    dataset = open_dataset(config.data)
    count = len(dataset) if config.limit is None else min(config.limit, len(dataset))
    report = EvaluateReport(config=config)
    strip_rows = []
    start = time.perf_counter()
    for index in tqdm(range(count), desc="evaluate", unit="img", disable=not progress):
        key = dataset.keys[index]
        try:
            image = decode_image(dataset.read(index), key)
        except (BadImageError, OSError, ValueError) as error:
            report.failed.append((key, str(error)))
            continue
        clean = image.pixels  # (C, H, W) in [0, 1]
        noisy = add_evaluation_noise(clean, config.noise, config.seed, index, config.clip_input)
        denoised = denoise_image(model, noisy.to(config.device), tile=config.tile,
                                 self_ensemble=config.self_ensemble).cpu()
        clean_8, noisy_8, denoised_8 = (quantize_8bit(t).double() for t in (clean, noisy, denoised))
        report.scores.append(
            ImageScore(
                key=key,
                noisy_psnr=float(psnr(noisy_8, clean_8)),
                denoised_psnr=float(psnr(denoised_8, clean_8)),
                noisy_ssim=float(ssim(noisy_8, clean_8)),
                denoised_ssim=float(ssim(denoised_8, clean_8)),
            )
        )
        if config.strip and len(strip_rows) < config.strip_count:
            strip_rows.append((key, noisy_8, denoised_8, clean_8, report.scores[-1]))
    report.seconds = time.perf_counter() - start
    if config.strip and strip_rows:
        from pipeline.report import comparison_strip

        comparison_strip(
            [(n, d, c) for _, n, d, c, _ in strip_rows],
            [f"{k}: noisy {s.noisy_psnr:.2f} dB | denoised {s.denoised_psnr:.2f} dB | clean" for k, _, _, _, s in strip_rows],
            config.strip,
        )
    return report


def report_json(report: EvaluateReport) -> str:
    return json.dumps(report.to_dict(), indent=2)
