"""SweepConfig: every setting of a hyperparameter sweep, and its record in the sweep folder.

A sweep folder (`out`) holds:
    sweep.json              this config (a resumed sweep must keep what defines it)
    tune/                   Ray Tune's experiment (trial states; `--resume` restores it)
    trials/<trial id>/      each trial's `n2n train` run: checkpoints/, metrics.jsonl,
                            model.n2n, training.png, and trial.json (its values and result)
    results.csv, results.md the table of trials, best first
    sweep.png               validation PSNR against each searched key, and every trial's curve
"""
from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.sweep.space import SearchSpace
from pipeline.training.config import TrainConfig

SWEEP_FILE = "sweep.json"
TUNE_DIR = "tune"
TRIALS_DIR = "trials"
# may differ when a sweep resumes (Ray Tune restores the rest of its settings as they were)
_RESUMABLE_CHANGES = ("resume", "address")


@dataclass(frozen=True)
class SweepConfig:
    """A sweep: a search space over `train`, the settings every trial shares."""

    # Each field but `train` and `space` is one `n2n sweep` option (pipeline.commands.options builds
    # it from the field); `train` comes from n2n train's options, `space` from --grid/.../--space.
    out: str = field(metadata=dict(  # the sweep folder (see the module docstring)
        help="Sweep folder: trials/ (one n2n train run each), tune/, results.csv, results.md, sweep.png."))
    train: TrainConfig                 # every trial's settings before its own values (its `out` is set per trial)
    space: SearchSpace                 # what varies
    samples: int = field(default=1, metadata=dict(  # Ray Tune's num_samples
        show_default=True, help="Repeats of the grid; random keys are drawn anew each time."))
    max_concurrent: int = field(default=0, metadata=dict(  # 0: as many as the cluster's CPUs/GPUs hold
        help="Trials at once at most (default: as many as the cluster holds)."))
    workers_per_trial: int = field(default=1, metadata=dict(
        show_default=True, help="Gradient actors per trial."))
    cpus_per_trial: float | None = field(default=None, metadata=dict(  # None: workers_per_trial + 1
        help="CPUs a trial reserves in all: 1 for its driver (less when scarce), the rest split over "
             "its workers. [default: workers + 1]"))
    early_stop: bool = field(default=True, metadata=dict(  # False: every trial runs all its steps
        show_default=True, help="ASHA on the validation PSNR."))
    grace_steps: int | None = field(default=None, metadata=dict(  # None: steps / reduction_factor^2, >= validate_every
        help="Steps before ASHA's first cut. [default: steps / 9]"))
    reduction_factor: int = field(default=3, metadata=dict(
        show_default=True, help="ASHA keeps the best 1/N at each rung."))
    search_seed: int = field(default=0, metadata=dict(  # draws of the random dimensions
        show_default=True, help="Seed of the random draws of the search."))
    trial_retries: int = field(default=1, metadata=dict(  # a trial resumes from its own checkpoints
        show_default=True, help="Restarts of a failed trial (from its checkpoints)."))
    address: str | None = field(default=None, metadata=dict(  # pipeline.runtime.ray_session.connect
        help="Ray cluster: HOST:PORT, 'auto', 'discover' or 'local' (as n2n train; default: "
             "RAY_ADDRESS, else a private Ray here; jobs/sweep.py: the cluster of its node)."))
    resume: bool = field(default=False, metadata=dict(
        flag_only=True, help="Continue the sweep in --out (after a kill or a crash)."))

    def __post_init__(self):
        def bad(key, why):
            raise ValueError(f"sweep config: {key} {why}")

        for key in ("samples", "workers_per_trial", "reduction_factor"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                bad(key, f"must be a positive integer, got {value!r}")
        if self.reduction_factor < 2:
            bad("reduction_factor", f"must be at least 2, got {self.reduction_factor}")
        for key in ("max_concurrent", "search_seed", "trial_retries"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                bad(key, f"must be a non-negative integer, got {value!r}")
        if self.grace_steps is not None and (not isinstance(self.grace_steps, int) or self.grace_steps < 1):
            bad("grace_steps", f"must be a positive integer, got {self.grace_steps!r}")
        if self.cpus_per_trial is not None and not self.cpus_per_trial > 0:
            bad("cpus_per_trial", f"must be positive, got {self.cpus_per_trial!r}")
        if not self.train.ray:
            bad("train.ray", "must be true: trials place their gradient actors with Ray")
        if self.train.holdout < 1:
            bad("holdout", "must be at least 1: trials are compared on images held out of their training "
                           "(pass --holdout N), never on a test set")
        if self.train.validation_images < 1:
            bad("validation_images", "must be at least 1: trials are compared on their validation PSNR")
        if self.train.workers > self.train.batch_size or self.workers_per_trial > self.train.batch_size:
            bad("workers_per_trial", f"({self.workers_per_trial}) must not exceed batch_size ({self.train.batch_size})")
        if self.samples > 1 and not self.space.random and "seed" not in self.space.keys:
            bad("samples", f"({self.samples}) would repeat identical trials: the space has no random key; "
                           "vary the seed instead (--grid seed=0,1,2)")

    # -- resources of one trial -------------------------------------------------------
    @property
    def trial_cpus(self) -> float:
        return self.cpus_per_trial if self.cpus_per_trial is not None else self.workers_per_trial + 1.0

    @property
    def driver_cpus(self) -> float:
        """The trial driver's bundle: 1 CPU, or an equal share when the trial has fewer than workers + 1."""
        return min(1.0, self.trial_cpus / (self.workers_per_trial + 1))

    @property
    def worker_cpus(self) -> float:
        """Each gradient actor's bundle (its torch threads: the integer part, at least 1)."""
        return (self.trial_cpus - self.driver_cpus) / self.workers_per_trial

    def bundles(self, use_gpu: bool) -> list[dict]:
        """The trial's placement group: the driver's bundle, then one per gradient worker."""
        worker = {"CPU": self.worker_cpus, **({"GPU": 1} if use_gpu else {})}
        return [{"CPU": self.driver_cpus}] + [dict(worker) for _ in range(self.workers_per_trial)]

    # -- ASHA ---------------------------------------------------------------------------
    @property
    def grace(self) -> int:
        """Steps before ASHA's first cut."""
        if self.grace_steps is not None:
            return min(self.grace_steps, self.train.steps)
        return min(self.train.steps, max(self.train.validate_every, self.train.steps // self.reduction_factor**2))

    # -- paths and records ---------------------------------------------------------------
    @property
    def trials_dir(self) -> Path:
        return Path(self.out) / TRIALS_DIR

    @property
    def tune_dir(self) -> Path:
        return Path(self.out) / TUNE_DIR

    def to_dict(self) -> dict:
        values = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        values["train"] = self.train.to_dict()
        values["space"] = self.space.to_dict()
        return values

    @classmethod
    def from_dict(cls, values: dict, *, source: str = "sweep config") -> "SweepConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"{source}: unknown keys {unknown} (known: {sorted(known)})")
        values = dict(values)
        values["train"] = TrainConfig.from_dict(values["train"], source=f"{source}: train")
        values["space"] = SearchSpace.from_dict(values["space"], source=f"{source}: space")
        return cls(**values)

    def replace(self, **changes) -> "SweepConfig":
        return dataclasses.replace(self, **changes)


def write_json(path: Path, values: dict) -> None:
    """Write `values` as JSON to `path` atomically (a temporary name, then a rename)."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(values, indent=1) + "\n")  # key order kept: the space's order is the table's
    os.replace(tmp, path)


def read_saved(out) -> dict | None:
    """The saved sweep config of folder `out` as a dict (None when it holds none)."""
    path = Path(out) / SWEEP_FILE
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text())
    except ValueError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None


def changed_settings(saved: dict, config: SweepConfig) -> list[str]:
    """'key: old -> new' for every setting a resumed sweep may not change."""
    now = json.loads(json.dumps(config.to_dict()))
    changes = []
    for key in sorted(set(saved) | set(now)):
        if key in _RESUMABLE_CHANGES:
            continue
        if key == "train":
            old_train, new_train = saved.get("train", {}), now["train"]
            changes += [f"{k}: {old_train.get(k)!r} -> {new_train.get(k)!r}"
                        for k in sorted(set(old_train) | set(new_train))
                        if k not in ("address", "progress") and old_train.get(k) != new_train.get(k)]
        elif saved.get(key) != now.get(key):
            changes.append(f"{key}: {saved.get(key)!r} -> {now.get(key)!r}")
    return changes
