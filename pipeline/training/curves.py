"""The run's record: metrics.jsonl (the config on its first line) and the final PNG.

metrics.jsonl lines:
    {"config": {...}}                                              first line
    {"step": s, "loss": l, "images_per_s": r, "time": t}           every step
    {"step": s, "psnr": p, "psnr_noisy": q}                        every validation
    {"step": s, "sigma": e, "sigma_noisy": f}                      every validation without a clean
                                                                   reference (--noise none): the
                                                                   estimated noise, 0..255
The PNG has the loss and validation curves over steps and, below, a strip of validation
images: noisy input, denoised, reference (when there is one).
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch


class MetricsLog:
    """Append-only JSON-lines metrics of a run; a resumed run drops lines after its step."""

    def __init__(self, path, config: dict, *, resume_step: int | None = None):
        self.path = Path(path)
        if resume_step is not None and self.path.exists():
            kept = [line for line in self._lines() if "step" not in line or line["step"] <= resume_step]
            tmp = self.path.with_name(self.path.name + ".tmp")
            tmp.write_text("".join(json.dumps(line) + "\n" for line in kept))
            os.replace(tmp, self.path)
        else:
            tmp = self.path.with_name(self.path.name + ".tmp")
            tmp.write_text(json.dumps({"config": config}) + "\n")
            os.replace(tmp, self.path)
        self._file = open(self.path, "a")

    def _lines(self) -> list[dict]:
        out = []
        for text in self.path.read_text().splitlines():
            try:
                out.append(json.loads(text))
            except ValueError:  # a line cut short by a crash: dropped
                continue
        return out

    def write(self, **values) -> None:
        self._file.write(json.dumps(values) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()


def read_metrics(path) -> tuple[dict, list[dict]]:
    """(config, records) of a metrics file; unreadable lines are skipped."""
    config, records = {}, []
    for text in Path(path).read_text().splitlines():
        try:
            line = json.loads(text)
        except ValueError:
            continue
        if "config" in line:
            config = line["config"]
        else:
            records.append(line)
    return config, records


def _to_image(x: torch.Tensor):
    """(3, H, W) in [0, 1] -> (H, W, 3) numpy for imshow."""
    return x.detach().to("cpu", torch.float32).clamp(0, 1).permute(1, 2, 0).numpy()


MAX_STRIP_ROWS = 4  # validation images drawn: a picture to look at, not one row per validation image


def plot_run(metrics_path, png_path, strip: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]) -> None:
    """Write the curves and the (noisy, denoised, reference) strip to `png_path` atomically.

    Only the first MAX_STRIP_ROWS triples are drawn (validation may use 40 images).

    Shape:
        strip: (noisy, denoised, reference) triples, each (3, H, W) in [0, 1]; reference may be None.
    """
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    _, records = read_metrics(metrics_path)
    losses = [(r["step"], r["loss"]) for r in records if "loss" in r]
    psnrs = [(r["step"], r["psnr"], r.get("psnr_noisy")) for r in records if "psnr" in r]
    label, unit = "validation PSNR", "PSNR (dB)"
    if not psnrs:  # no clean reference: the noise estimate (lower is cleaner)
        psnrs = [(r["step"], r["sigma"], r.get("sigma_noisy")) for r in records if "sigma" in r]
        label, unit = "validation: estimated noise", "noise sigma (0..255, no reference)"
    strip = list(strip)[:MAX_STRIP_ROWS]
    rows = 1 + len(strip)
    fig = Figure(figsize=(10, 3.2 * rows))
    grid = fig.add_gridspec(rows, 3)
    ax = fig.add_subplot(grid[0, 0:2] if psnrs else grid[0, :])
    if losses:
        ax.plot(*zip(*losses), lw=1)
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    ax.set_yscale("log" if losses and min(v for _, v in losses) > 0 else "linear")
    ax.set_title("training loss")
    if psnrs:
        ax2 = fig.add_subplot(grid[0, 2])
        steps = [s for s, _, _ in psnrs]
        ax2.plot(steps, [p for _, p, _ in psnrs], marker="o", label="denoised")
        if all(q is not None for _, _, q in psnrs):
            ax2.plot(steps, [q for _, _, q in psnrs], ls="--", marker="x", label="noisy input")
        ax2.set_xlabel("step")
        ax2.set_ylabel(unit)
        ax2.set_title(label)
        ax2.legend()
    for r, (noisy, denoised, reference) in enumerate(strip, 1):
        shown = ((noisy, "noisy"), (denoised, "denoised")) + (((reference, "reference"),) if reference is not None else ())
        for c, (image, title) in enumerate(shown):
            a = fig.add_subplot(grid[r, c])
            a.imshow(_to_image(image), interpolation="nearest")
            a.set_title(title)
            a.axis("off")
    fig.tight_layout()
    png_path = Path(png_path)
    tmp = png_path.with_name(png_path.name + ".tmp.png")
    fig.savefig(tmp, dpi=80)
    os.replace(tmp, png_path)
