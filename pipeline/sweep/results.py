"""The sweep's results: a table of trials (results.csv, results.md) and sweep.png.

Each row is one trial, read from its own run (`trials/<id>/trial.json` and
metrics.jsonl) and Ray Tune's status of it:
    trial, status, <searched keys>, psnr, best_psnr, step, psnr_noisy, parameters, train_s
- status: finished (ran all its steps), stopped (ASHA cut it at `step`), error, or
  pending/running (an interrupted sweep);
- psnr: the validation PSNR (dB, 8-bit output vs the clean held-out images) at `step`,
  the trial's last validation; best_psnr the highest of its validations; psnr_noisy the noisy
  inputs' PSNR, the same for every trial (they share the validation set);
- train_s: seconds spent in optimizer steps (metrics.jsonl), without start-up and validation.
Rows are sorted finished first, by psnr; the first finished row is the sweep's choice.
A stopped trial's PSNR is from fewer steps than a finished one's: compare like with like.

sweep.png: one panel per searched key (validation PSNR against its values; finished
trials filled, stopped ones hollow at the PSNR where they stopped; coloured by the
other numeric key when there are two) and the validation curves of all trials.
"""
from __future__ import annotations

import csv
import io
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.sweep.config import TRIALS_DIR
from pipeline.sweep.trial import read_trial
from pipeline.training.driver import METRICS
from pipeline.training.curves import read_metrics

CSV_FILE = "results.csv"
MARKDOWN_FILE = "results.md"
PLOT_FILE = "sweep.png"
STATUS_ORDER = {"finished": 0, "stopped": 1, "running": 2, "pending": 3, "error": 4}


@dataclass
class TrialRow:
    trial: str
    status: str
    params: dict
    psnr: float | None = None
    best_psnr: float | None = None
    step: int = 0
    psnr_noisy: float | None = None
    parameters: int | None = None
    train_s: float | None = None
    curve: list[tuple[int, float]] = field(default_factory=list)  # (step, validation PSNR)

    def sort_key(self):
        return (STATUS_ORDER.get(self.status, 9), -(self.psnr if self.psnr is not None else -math.inf),
                -self.step, self.trial)


def _parameter_count(config: dict) -> int | None:
    from n2n_core.architectures import build_model

    try:
        model = build_model(config["arch"], **config.get("arch_args", {}))
    except Exception:  # an unbuildable trial (its error is its row's status)
        return None
    return sum(p.data.numel() for p in model.parameters())


def trial_row(folder: Path, trial_id: str, params: dict, tune_status: str) -> TrialRow:
    """One trial's row from its run folder; `tune_status` is Ray Tune's (TERMINATED, ERROR, RUNNING, PENDING, ...)."""
    record = read_trial(folder) or {}
    finished = "result" in record
    status = {"ERROR": "error", "RUNNING": "running", "PENDING": "pending", "PAUSED": "pending"}.get(tune_status)
    if finished:
        status = "finished"
    elif status is None:  # TERMINATED without a result: ASHA stopped it
        status = "stopped"
    row = TrialRow(trial=trial_id, status=status, params=dict(params))
    metrics = folder / METRICS
    if not metrics.exists():
        return row
    config, records = read_metrics(metrics)
    row.curve = [(r["step"], r["psnr"]) for r in records if r.get("psnr") is not None]
    steps = [r for r in records if "loss" in r]
    if row.curve:
        row.step, row.psnr = row.curve[-1]
        row.best_psnr = max(p for _, p in row.curve)
        row.psnr_noisy = next(r.get("psnr_noisy") for r in reversed(records) if r.get("psnr") is not None)
    if steps:
        batch = config.get("batch_size", 0)
        row.train_s = round(sum(batch / r["images_per_s"] for r in steps if r.get("images_per_s")), 1)
    if finished and record["result"].get("psnr") is not None:
        row.psnr, row.step = record["result"]["psnr"], record["result"]["step"]
    if config:
        row.parameters = _parameter_count(config)
    return row


def _fmt(value) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) < 1e-2 or abs(value) >= 1e5 else f"{value:.4f}".rstrip("0").rstrip(".")
    return str(value)


def table_columns(keys: list[str]) -> list[str]:
    return ["trial", "status", *keys, "psnr", "best_psnr", "step", "psnr_noisy", "parameters", "train_s"]


def _markdown_cells(row: TrialRow, keys: list[str]) -> list[str]:
    db = [None if v is None else f"{v:.2f}" for v in (row.psnr, row.best_psnr, row.psnr_noisy)]
    return [row.trial, row.status, *[_fmt(row.params.get(k)) for k in keys], db[0] or "", db[1] or "", str(row.step),
            db[2] or "", _fmt(row.parameters), _fmt(row.train_s)]


def _cells(row: TrialRow, keys: list[str]) -> list:
    return [row.trial, row.status, *[row.params.get(k) for k in keys], row.psnr, row.best_psnr, row.step,
            row.psnr_noisy, row.parameters, row.train_s]


def to_csv(rows: list[TrialRow], keys: list[str]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(table_columns(keys))
    for row in rows:
        writer.writerow(["" if v is None else v for v in _cells(row, keys)])
    return buffer.getvalue()


def to_markdown(rows: list[TrialRow], keys: list[str]) -> str:
    columns = table_columns(keys)
    best = best_row(rows)
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" if c in ("trial", "status") else "---:"
                                                                for c in columns) + "|"]
    for row in rows:
        cells = _markdown_cells(row, keys)
        if row is best:
            cells[2 + len(keys)] = f"**{cells[2 + len(keys)]}**"
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def best_row(rows: list[TrialRow]) -> TrialRow | None:
    """The finished trial with the highest validation PSNR (None when none finished)."""
    finished = [r for r in rows if r.status == "finished" and r.psnr is not None]
    return max(finished, key=lambda r: r.psnr) if finished else None


def _write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _numeric(values) -> bool:
    return all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)


def plot_sweep(rows: list[TrialRow], keys: list[str], path: Path, *, log_keys=(), title: str = "") -> None:
    """Write sweep.png atomically: PSNR against each searched key, then the validation curves.

    `log_keys` are plotted on a log axis (log-uniform keys; any key whose values span over 20x is too).
    """
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import colors, ticker
    from matplotlib.figure import Figure

    scored = [r for r in rows if r.psnr is not None]
    numeric = [k for k in keys if _numeric([r.params.get(k) for r in scored]) and scored]
    panels = len(keys) + 1
    fig = Figure(figsize=(4.6 * panels, 4.0))
    noisy = next((r.psnr_noisy for r in rows if r.psnr_noisy is not None), None)

    def log_scale(key, values) -> bool:
        positive = [v for v in values if v > 0]
        return len(positive) == len(values) > 0 and (key in log_keys or max(positive) / min(positive) > 20)

    def noisy_line(ax):
        if noisy is not None:
            ax.axhline(noisy, color="grey", ls="--", lw=1, label="noisy input")

    for i, key in enumerate(keys):
        ax = fig.add_subplot(1, panels, i + 1)
        others = [k for k in numeric if k != key]
        hue = others[0] if len(numeric) == 2 and others else None
        values = [r.params.get(key) for r in scored]
        if key in numeric:
            xs = values
            if log_scale(key, values):
                ax.set_xscale("log")
                ax.xaxis.set_major_locator(ticker.LogLocator(subs=(1.0, 2.0, 5.0)))
                ax.xaxis.set_major_formatter(ticker.FormatStrFormatter("%g"))
                ax.xaxis.set_minor_formatter(ticker.NullFormatter())
        else:  # categories in order of appearance
            labels = list(dict.fromkeys(str(v) for v in values))
            xs = [labels.index(str(v)) for v in values]
            ax.set_xticks(range(len(labels)), labels)
        norm = None
        if hue:
            hv = [r.params.get(hue) for r in scored]
            norm = (colors.LogNorm if log_scale(hue, hv) else colors.Normalize)(min(hv), max(hv) if max(hv) > min(hv) else min(hv) + 1)
        for x, r in zip(xs, scored):
            color = matplotlib.colormaps["viridis"](norm(r.params.get(hue))) if hue else "C0"
            filled = r.status == "finished"
            ax.scatter([x], [r.psnr], s=48, facecolors=color if filled else "none", edgecolors=color, linewidths=1.5)
        if hue:
            mappable = matplotlib.cm.ScalarMappable(norm=norm, cmap="viridis")
            fig.colorbar(mappable, ax=ax, label=hue)
        noisy_line(ax)
        ax.set_xlabel(key)
        ax.set_ylabel("validation PSNR (dB)")
        ax.set_title(f"PSNR vs {key} (hollow: stopped early)", fontsize=9)
        ax.grid(alpha=0.3)
    ax = fig.add_subplot(1, panels, panels)
    for r in sorted(rows, key=lambda r: r.sort_key()):
        if r.curve:
            label = ", ".join(f"{k}={_fmt(r.params.get(k))}" for k in keys)
            ax.plot(*zip(*r.curve), marker=".", lw=1, ls="-" if r.status == "finished" else ":", label=label)
    noisy_line(ax)
    ax.set_xlabel("step")
    ax.set_ylabel("validation PSNR (dB)")
    ax.set_title("validation curves (dotted: stopped early)", fontsize=9)
    ax.grid(alpha=0.3)
    if len(rows) <= 12 and ax.get_legend_handles_labels()[1]:  # none without a curve (every trial failed)
        ax.legend(fontsize=6)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    tmp = path.with_name(path.name + ".tmp.png")
    fig.savefig(tmp, dpi=72)
    os.replace(tmp, path)


def write_results(out, trials: list[tuple[str, dict, str]], keys: list[str], *, log_keys=(),
                  title: str = "") -> list[TrialRow]:
    """Write results.csv, results.md and sweep.png into `out` for `trials` [(trial id, params, Tune status)].

    Returns the rows, best first.
    """
    out = Path(out)
    rows = sorted((trial_row(out / TRIALS_DIR / trial_id, trial_id, params, status) for trial_id, params, status in trials),
                  key=TrialRow.sort_key)
    _write_text(out / CSV_FILE, to_csv(rows, keys))
    _write_text(out / MARKDOWN_FILE, to_markdown(rows, keys))
    if rows:
        plot_sweep(rows, keys, out / PLOT_FILE, log_keys=log_keys, title=title)
    return rows
