"""One trial of a sweep: an `n2n train` run inside a Ray Tune trial, reporting its validation PSNR.

`run_trial(params, spec=...)` is the Tune function trainable. It trains
`pipeline.training.train` with the trial's TrainConfig into `trials/<trial id>/`. Its
gradient actors go into the trial's placement group (`WorkerPool` places them there,
see `pipeline.training.placement.enclosing_placement_group`): bundle 0 holds this
driver, one bundle per gradient worker.

Reports: each validation of the run (every `validate_every` steps and at the end) goes
to Tune as {"step", "psnr", "psnr_noisy", "loss"}; ASHA stops trials on it. A
validation is reported once the run has taken the next step (or has ended), so the
final one is reported only after `model.n2n` and `trial.json` are written: a stop at
that report can no longer cut the run short.

Restarts (a Tune retry, or a restored sweep): the trial resumes from the newest
checkpoint of its own run (`train --resume`) and reports only what comes after it; a
trial whose `trial.json` holds a result reports that result again and trains nothing.
"""
from __future__ import annotations

import json
from pathlib import Path

from pipeline.sweep.config import write_json
from pipeline.sweep.space import apply_params
from pipeline.training.config import TrainConfig
from pipeline.training.driver import METRICS, list_checkpoints
from pipeline.training.run_dir import RunDir

TRIAL_FILE = "trial.json"


def read_trial(folder) -> dict | None:
    """A trial folder's trial.json ({"trial_id", "params", "result"?}); None when missing or unreadable."""
    try:
        return json.loads((Path(folder) / TRIAL_FILE).read_text())
    except (OSError, ValueError):
        return None


class ValidationReporter:
    """Follows a run's metrics.jsonl and hands its validations after step `after` to `report`.

    `on_step` is train's hook: it reads the lines appended since its last call; a validation
    is passed on once a later step exists (`flush()` passes the last one on).
    """

    def __init__(self, metrics_path: Path, report, *, after: int):
        self.path, self.report, self.after = metrics_path, report, after
        self.offset = 0
        self.loss = None
        self.pending: dict | None = None
        self.reported_step = after

    def _new_lines(self) -> list[dict]:
        with open(self.path, "rb") as f:
            f.seek(self.offset)
            data = f.read()
        end = data.rfind(b"\n") + 1  # a line still being written waits for the next call
        self.offset += end
        lines = []
        for text in data[:end].splitlines():
            try:
                lines.append(json.loads(text))
            except ValueError:
                continue
        return lines

    def on_step(self, step: int, model=None, placement=None) -> None:
        if self.pending is not None and step > self.pending["step"]:
            self.flush()
        for line in self._new_lines():
            if "loss" in line:
                self.loss = line["loss"]
            if "psnr" in line and line.get("step", 0) > self.after:
                self.pending = {"step": line["step"], "psnr": line["psnr"], "psnr_noisy": line.get("psnr_noisy"),
                                "loss": self.loss}

    def flush(self) -> None:
        if self.pending is not None:
            self.report(self.pending)
            self.reported_step = self.pending["step"]
            self.pending = None


def trial_config(spec: dict, params: dict, trial_id: str) -> TrainConfig:
    """The TrainConfig of trial `trial_id` from the sweep's `spec` (see `trial_spec`) and its values."""
    base = TrainConfig.from_dict(spec["train"], source="sweep")
    return apply_params(base, params, str(Path(spec["trials"]) / trial_id))


def run_trial(params: dict, *, spec: dict) -> None:
    """Ray Tune function trainable: train one trial and report its validation PSNR (see the module docstring).

    Args:
        params: the trial's values of the searched keys (Tune's trial config).
        spec: {"train": the shared TrainConfig as a dict, "trials": the folder of trial runs}.
    """
    from ray import tune

    from pipeline.training import train

    trial_id = tune.get_context().get_trial_id()
    config = trial_config(spec, params, trial_id)
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    run = RunDir(out)  # the trial's folder is n2n's (inside the sweep's): marked before trial.json lands
    run.mark()
    run.close()
    record = read_trial(out)
    if record is not None and "result" in record:  # finished before the sweep was interrupted
        tune.report(dict(record["result"]))
        return
    write_json(out / TRIAL_FILE, {"trial_id": trial_id, "params": params})
    found = list_checkpoints(out)
    start = found[-1][0] if found else 0
    reporter = ValidationReporter(out / METRICS, tune.report, after=start)
    result = train(config.replace(resume=bool(found), progress=False), on_step=reporter.on_step)
    final = {"step": result.steps, "psnr": result.psnr, "loss": result.loss,
             "psnr_noisy": reporter.pending["psnr_noisy"] if reporter.pending else None}
    reporter.pending = None
    write_json(out / TRIAL_FILE, {"trial_id": trial_id, "params": params,
                                  "result": final})
    tune.report(final)
