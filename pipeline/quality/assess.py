"""Judge denoising on real noisy photos, with no clean reference: the residual-noise figure.

For each photo of a dataset (folder or Parquet) the model's output is compared with its
input by a no-reference noise estimate: scikit-image's `estimate_sigma`, the wavelet
median-absolute-deviation estimate of white-noise sigma (Donoho and Johnstone 1994) on
the finest diagonal subband, averaged over channels, on the 0..255 scale. The figure is
`kept` = sigma(output) / sigma(input): the share of the input's estimated noise left in
the output (0 % is perfectly clean, 100 % did nothing). Its limits, stated: it sees only
the finest scale, so coarse grain and JPEG blocks count less than they look, and fine
texture counts as noise in both images (a photo of grass keeps a high figure however
well it is denoised). Compare models on the same photos, and look at the strip.
"""
from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass, field

import numpy as np
import torch

from pipeline.data.images import BadImageError, decode_image
from pipeline.storage.names import printable


MEASURABLE_SIGMA = 1e-3  # on the 0..255 scale: a thousandth of an 8-bit code


@dataclass(frozen=True)
class AssessConfig:
    data: str  # folder or Parquet of noisy photos (no clean references needed)
    model: str | None = None  # checkpoint; None = the built-in default model
    strength: float = 1.0  # correction applied: noisy + strength (denoised - noisy)
    limit: int | None = None  # only the first N photos
    tile: int | None = 512  # tile side for large photos
    self_ensemble: bool = False
    device: str = "cpu"
    strip: str | None = None  # before/after PNG strip of the first `strip_count` photos
    strip_count: int = 4

    def __post_init__(self):
        if self.limit is not None and (isinstance(self.limit, bool) or self.limit < 1):
            raise ValueError(f"--limit must be at least 1, got {self.limit}")
        if not 0.0 <= self.strength <= 1.0:
            raise ValueError(f"--strength must be between 0 and 1, got {self.strength}")


@dataclass
class PhotoResidual:
    key: str
    sigma_in: float  # estimated noise sigma of the input, 0..255
    sigma_out: float  # of the output

    @property
    def kept(self) -> float:
        """sigma_out / sigma_in (nan for an input with no measurable noise: a sigma under
        MEASURABLE_SIGMA, where the estimate is rounding error)."""
        return self.sigma_out / self.sigma_in if self.sigma_in >= MEASURABLE_SIGMA else float("nan")


@dataclass
class AssessReport:
    config: AssessConfig
    photos: list[PhotoResidual] = field(default_factory=list)
    failed: list[tuple[str, str]] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def median_kept(self) -> float:
        values = [p.kept for p in self.photos if p.kept == p.kept]
        return statistics.median(values) if values else float("nan")

    def to_dict(self) -> dict:
        return {"config": asdict(self.config),
                "photos": [dict(asdict(p), kept=p.kept) for p in self.photos],
                "median_kept": self.median_kept,
                "failed": [{"key": k, "reason": r} for k, r in self.failed], "seconds": self.seconds}

    def table(self) -> str:
        width = max([len(printable(p.key)) for p in self.photos] + [5])
        head = f"{'photo':<{width}}  {'sigma in':>8}  {'sigma out':>9}  {'kept':>6}"
        lines = ["estimated noise sigma (wavelet MAD, 0..255) of input and output", head, "-" * len(head)]
        for p in self.photos:
            lines.append(f"{printable(p.key):<{width}}  {p.sigma_in:8.2f}  {p.sigma_out:9.2f}  {100 * p.kept:5.1f}%")
        lines.append("-" * len(head))
        if self.photos:
            lines.append(f"{'median':<{width}}  {'':8}  {'':9}  {100 * self.median_kept:5.1f}%")
        else:
            lines.append("no photo could be assessed")
        lines += [f"failed: {printable(k)}: {r}" for k, r in self.failed]
        return "\n".join(lines)


def estimated_sigma(image: torch.Tensor) -> float:
    """Wavelet estimate of the noise sigma of (C, H, W) in [0, 1], on the 0..255 scale."""
    from skimage.restoration import estimate_sigma

    array = image.detach().to("cpu", torch.float64).permute(1, 2, 0).numpy()
    return 255.0 * float(estimate_sigma(np.ascontiguousarray(array), channel_axis=-1, average_sigmas=True))


def assess(config: AssessConfig, *, model=None, progress: bool = True) -> AssessReport:
    """Denoise every photo of `config.data` and report the residual-noise figure per photo."""
    from tqdm import tqdm

    from pipeline.quality.evaluate import load_model, open_images_to_score
    from pipeline.inference.tiling import denoise_image

    dataset = open_images_to_score(config.data, config.strip, "PHOTOS", "assess")
    model = model if model is not None else load_model(config.model, config.device)
    count = len(dataset) if config.limit is None else min(config.limit, len(dataset))
    report = AssessReport(config)
    rows = []
    start = time.perf_counter()
    for index in tqdm(range(count), desc="assess", unit="photo", disable=not progress):
        key = dataset.keys[index]
        try:
            noisy = decode_image(dataset.read(index), key).pixels
        except (BadImageError, OSError, ValueError) as error:
            report.failed.append((key, getattr(error, "reason", None) or str(error)))
            continue
        out = denoise_image(model, noisy.to(config.device), tile=config.tile, self_ensemble=config.self_ensemble,
                            strength=config.strength).cpu()
        report.photos.append(PhotoResidual(key, estimated_sigma(noisy), estimated_sigma(out)))
        if config.strip and len(rows) < config.strip_count:
            rows.append((key, noisy, out, report.photos[-1]))
    report.seconds = time.perf_counter() - start
    if config.strip and rows:
        from pipeline.quality.comparison_strips import comparison_strip

        comparison_strip([(n.expand(3, -1, -1), o.expand(3, -1, -1)) for _, n, o, _ in rows],
                         [f"{k}: input (noise ~{p.sigma_in:.1f}) | output (~{p.sigma_out:.1f}, {100 * p.kept:.0f}% kept)"
                          for k, _, _, p in rows], config.strip)
    return report


def report_json(report: AssessReport) -> str:
    from pipeline.storage.json_reports import report_json as strict

    return strict(report.to_dict())
