"""Evaluate a denoiser on clean images: add known noise, denoise, report PSNR and SSIM.

For every clean image of a dataset (folder or Parquet) this draws noise from a seeded
generator (so two runs, or two models, see exactly the same noisy inputs), denoises it
with `pipeline.inference.tiling.denoise_image`, and measures the result against the
clean image. A peer (`peer="cbm3d"`) denoises the very same inputs side by side.

Conventions (decided here, documented in docs/default-model.md, "Its figures"):
- Two input conventions, both reported by default (`inputs="both"`):
  `float`: the clean image plus the noise, unclipped and unquantized, the convention of
  the published CBSD68 figures (noisy PSNR about 20.2 dB at sigma 25);
  `8bit`: the same noisy image clipped to [0, 1] and rounded to k / 255, what a camera or
  an 8-bit file stores, so what users have. For noise specs that are measurements
  already (`,8bit`, `,jpeg=...`, `camera`) the two are the same image.
- PSNR and SSIM are computed on 8-bit output: clipped to [0, 1] and rounded to 1/255,
  against the clean image, which is 8-bit already for 8-bit files.
- The noisy input's PSNR beside it is that of the 8-bit input (the same for both conventions).
- Images smaller than SSIM's 11x11 window are scored by PSNR only (their SSIM is left
  out of the means, and the table says how many); unreadable images are listed failures.
- Grey images are denoised as grey (the RGB model sees them replicated, see tiling).
- A dataset with no image is refused (a usage error: a mean of nothing is no figure), and
  so is a `strip` that is not a new file or a picture n2n wrote, or lies inside `data`
  (`pipeline.quality.comparison_strips.check_picture_path`); both before the model is loaded.
- The JSON report writes PSNRs that are not finite (a noiseless input) as null.
- CBM3D (`pipeline.quality.classical_peers`) is given the noise's sigma when the spec fixes one
  (`gaussian:25`, the published protocol), else the true RMS of that input's noise
  against the clean image (an oracle: the peer at its best).
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field

import torch

from n2n_core import psnr, quantize_8bit, ssim
from pipeline.data.datasets import open_dataset
from pipeline.data.images import BadImageError, decode_image
from pipeline.data.noise import parse_noise
from pipeline.errors import UsageError
from pipeline.storage.names import printable

INPUTS = {"both": ("float", "8bit"), "float": ("float",), "8bit": ("8bit",)}
PEERS = ("cbm3d",)
SSIM_MIN_SIDE = 11  # n2n_core.ssim's window


@dataclass(frozen=True)
class EvaluateConfig:
    data: str  # folder or Parquet of clean images
    model: str | None = None  # checkpoint path; None = the built-in default model
    noise: str = "gaussian:25"  # noise spec added to the clean images
    seed: int = 0  # noise seed: image i gets generator seed (seed, i)
    limit: int | None = None  # evaluate only the first N images (N >= 1)
    tile: int | None = None  # tile size for large images (None = whole image)
    inputs: str = "both"  # input conventions: both | float | 8bit
    self_ensemble: bool = False  # average over the 8 flips and rotations (8 forward passes)
    peer: str | None = None  # None or "cbm3d": a classical denoiser on the same inputs
    peer_cache: str | None = None  # folder caching the peer's outputs (keyed by input content)
    device: str = "cpu"
    precision: str = "float32"  # the model's dtype: float32, bfloat16 or float16
    strip: str | None = None  # write a noisy / denoised / (peer) / clean PNG strip here
    strip_count: int = 4  # images in the strip

    def __post_init__(self):
        if self.limit is not None and (isinstance(self.limit, bool) or self.limit < 1):
            raise ValueError(f"--limit must be at least 1, got {self.limit}")
        if self.inputs not in INPUTS:
            raise ValueError(f"--inputs must be one of {tuple(INPUTS)}, got {self.inputs!r}")
        if self.peer is not None and self.peer not in PEERS:
            raise ValueError(f"--peer must be one of {PEERS}, got {self.peer!r}")
        if self.tile is not None and self.tile < 1:
            raise ValueError(f"--tile must be a positive number of pixels, got {self.tile}")
        parse_noise(self.noise)  # a bad spec fails here, naming itself
        from pipeline.inference.tiling import PRECISIONS

        if self.precision not in PRECISIONS:
            raise ValueError(f"--precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")

    @property
    def columns(self) -> list[str]:
        """Result columns, e.g. ["model/float", "model/8bit", "cbm3d/float", "cbm3d/8bit"]."""
        methods = ["model"] + ([self.peer] if self.peer else [])
        return [f"{m}/{c}" for m in methods for c in INPUTS[self.inputs]]


@dataclass
class ImageScore:
    """One image: the noisy input's scores and each column's (PSNR dB, SSIM or None)."""

    key: str
    noisy_psnr: float
    noisy_ssim: float | None
    psnr: dict[str, float] = field(default_factory=dict)
    ssim: dict[str, float | None] = field(default_factory=dict)

    def gain(self, column: str) -> float:
        return self.psnr[column] - self.noisy_psnr


@dataclass
class EvaluateReport:
    config: EvaluateConfig
    scores: list[ImageScore] = field(default_factory=list)
    failed: list[tuple[str, str]] = field(default_factory=list)  # (key, reason)
    seconds: float = 0.0

    @property
    def columns(self) -> list[str]:
        return self.config.columns

    def mean_psnr(self, column: str | None = None) -> float:
        """Mean PSNR of a column (None: the noisy input) over the scored images."""
        values = [s.noisy_psnr if column is None else s.psnr[column] for s in self.scores]
        return sum(values) / len(values) if values else float("nan")

    def mean_ssim(self, column: str | None = None) -> float:
        """Mean SSIM over the images large enough for it (nan if none)."""
        values = [s.noisy_ssim if column is None else s.ssim[column] for s in self.scores]
        values = [v for v in values if v is not None]
        return sum(values) / len(values) if values else float("nan")

    @property
    def psnr_only(self) -> list[str]:
        return [s.key for s in self.scores if s.noisy_ssim is None]

    def to_dict(self) -> dict:
        return {
            "config": asdict(self.config),
            "columns": self.columns,
            "images": [asdict(s) for s in self.scores],
            "mean": {
                "noisy": {"psnr": self.mean_psnr(), "ssim": self.mean_ssim()},
                **{c: {"psnr": self.mean_psnr(c), "ssim": self.mean_ssim(c),
                       "gain": self.mean_psnr(c) - self.mean_psnr()} for c in self.columns},
            },
            "psnr_only": self.psnr_only,
            "failed": [{"key": k, "reason": r} for k, r in self.failed],
            "seconds": self.seconds,
        }

    def table(self) -> str:
        cols = self.columns
        width = max([len(printable(s.key)) for s in self.scores] + [5])
        cw = max(11, max(len(c) for c in cols))
        head = f"{'image':<{width}}  {'noisy':>7}  " + "  ".join(f"{c:>{cw}}" for c in cols)
        precision = f", model in {self.config.precision}" if self.config.precision != "float32" else ""
        lines = [f"PSNR (dB) on 8-bit output, noise {self.config.noise}, seed {self.config.seed}{precision}", head,
                 "-" * len(head)]
        for s in self.scores:
            lines.append(f"{printable(s.key):<{width}}  {s.noisy_psnr:7.2f}  "
                         + "  ".join(f"{s.psnr[c]:>{cw}.2f}" for c in cols))
        lines.append("-" * len(head))
        if not self.scores:
            lines.append("no image could be scored")
        else:
            lines.append(f"{'mean':<{width}}  {self.mean_psnr():7.2f}  "
                         + "  ".join(f"{self.mean_psnr(c):>{cw}.3f}" for c in cols))
            lines.append(f"{'SSIM':<{width}}  {self.mean_ssim():7.4f}  "
                         + "  ".join(f"{self.mean_ssim(c):>{cw}.4f}" for c in cols))
        if self.psnr_only:
            lines.append(f"PSNR only (smaller than SSIM's {SSIM_MIN_SIDE}x{SSIM_MIN_SIDE} window): "
                         + ", ".join(map(printable, self.psnr_only)))
        for key, reason in self.failed:
            lines.append(f"failed: {printable(key)}: {reason}")
        return "\n".join(lines)


def noise_generator(seed: int, index: int) -> torch.Generator:
    """The generator of image `index`: independent of how many images are evaluated."""
    return torch.Generator().manual_seed(seed * 1_000_003 + index)


def add_evaluation_noise(clean: torch.Tensor, noise_spec: str, seed: int, index: int, clip: bool = False) -> torch.Tensor:
    """(C, H, W) clean in [0, 1] -> noisy (C, H, W); stored as 8 bits (clipped, rounded) when `clip`."""
    noisy = parse_noise(noise_spec).apply(clean, noise_generator(seed, index))
    return quantize_8bit(noisy) if clip else noisy


def load_model(path: str | None, device: str = "cpu"):
    """The checkpoint's model in eval mode; None loads the built-in default model."""
    from n2n_core import load_checkpoint
    from pipeline.assets import default_model_path

    checkpoint = load_checkpoint(path if path else default_model_path(), map_location=device)
    return checkpoint.model.to(device=torch.device(device)).eval()


def open_images_to_score(data: str, strip: str | None, label: str, verb: str):
    """Check the --strip picture's path (before any work), then open `data`; an empty one is a
    UsageError naming it by `label` ("--data", "PHOTOS")."""
    if strip is not None:
        from pipeline.quality.comparison_strips import check_picture_path

        check_picture_path(strip, "--strip", inputs=[data])
    dataset = open_dataset(data)
    if len(dataset) == 0:
        raise UsageError(f"{label} {data!r} holds no images: nothing to {verb}")
    return dataset


def _score(output: torch.Tensor, clean_8: torch.Tensor, small: bool) -> tuple[float, float | None]:
    out_8 = quantize_8bit(output).double()
    return float(psnr(out_8, clean_8)), None if small else float(ssim(out_8, clean_8))


def evaluate(config: EvaluateConfig, *, model=None, progress: bool = True) -> EvaluateReport:
    """Denoise noisy copies of every clean image of `config.data` and score them (see the module docstring)."""
    from tqdm import tqdm

    from pipeline.inference.tiling import PRECISIONS, denoise_image

    dataset = open_images_to_score(config.data, config.strip, "--data", "evaluate")
    if model is None:
        model = load_model(config.model, config.device).to(dtype=PRECISIONS[config.precision])
    elif config.precision != "float32":  # a model handed in keeps its dtype unless another is asked for
        model.to(dtype=PRECISIONS[config.precision])
    peer = None
    if config.peer:
        from pipeline.quality.classical_peers import make_peer, peer_sigma

        peer = make_peer(config.peer, cache=config.peer_cache)
    count = len(dataset) if config.limit is None else min(config.limit, len(dataset))
    report = EvaluateReport(config=config)
    strip_rows = []
    start = time.perf_counter()
    for index in tqdm(range(count), desc="evaluate", unit="img", disable=not progress):
        key = dataset.keys[index]
        try:
            image = decode_image(dataset.read(index), key)
        except (BadImageError, OSError, ValueError) as error:
            report.failed.append((key, getattr(error, "reason", None) or str(error)))
            continue
        clean = image.pixels  # (C, H, W) in [0, 1]
        noisy = add_evaluation_noise(clean, config.noise, config.seed, index)
        inputs = {"float": noisy, "8bit": quantize_8bit(noisy)}
        small = min(clean.shape[1:]) < SSIM_MIN_SIDE
        clean_8, noisy_8 = quantize_8bit(clean).double(), inputs["8bit"].double()
        score = ImageScore(key=key, noisy_psnr=float(psnr(noisy_8, clean_8)),
                           noisy_ssim=None if small else float(ssim(noisy_8, clean_8)))
        outputs = {}
        for column in config.columns:
            method, convention = column.split("/")
            x = inputs[convention]
            if method == "model":
                out = denoise_image(model, x.to(config.device), tile=config.tile,
                                    self_ensemble=config.self_ensemble).cpu()
            else:
                out = peer(x, peer_sigma(config.noise, x, clean))
            outputs[column] = out
            score.psnr[column], score.ssim[column] = _score(out, clean_8, small)
        report.scores.append(score)
        if config.strip and len(strip_rows) < config.strip_count:
            strip_rows.append((key, inputs[INPUTS[config.inputs][0]], outputs, clean_8, score))
    report.seconds = time.perf_counter() - start
    if config.strip and strip_rows:
        _write_strip(config, strip_rows)
    return report


def _write_strip(config: EvaluateConfig, rows) -> None:
    """noisy | model | (peer) | clean for the first convention, PSNRs in the captions."""
    from pipeline.quality.comparison_strips import comparison_strip

    convention = INPUTS[config.inputs][0]
    shown = [c for c in config.columns if c.endswith("/" + convention)]
    pictures, captions = [], []
    for key, noisy, outputs, clean_8, score in rows:
        pictures.append([quantize_8bit(noisy)] + [quantize_8bit(outputs[c]) for c in shown] + [clean_8])
        captions.append(f"{key} ({convention} input): noisy {score.noisy_psnr:.2f} dB | "
                        + " | ".join(f"{c.split('/')[0]} {score.psnr[c]:.2f} dB" for c in shown) + " | clean")
    comparison_strip(pictures, captions, config.strip)


def report_json(report: EvaluateReport) -> str:
    from pipeline.storage.json_reports import report_json as strict

    return strict(report.to_dict())
