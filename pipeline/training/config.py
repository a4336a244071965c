"""TrainConfig: every setting of a training run, one field per `n2n train` option.

The config is frozen, saved in the first line of the metrics file and in every
checkpoint, and can be read from a YAML or JSON file (`--config FILE`, keys are the
field names; command-line options given explicitly override the file).
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

OPTIMIZERS = ("adam", "sgd")
LOSSES = ("l2", "l1")
TARGETS = ("noisy", "clean", "neighbor")
DTYPES = {"float32": torch.float32, "float64": torch.float64}
DEVICES = ("auto", "cpu", "cuda")
GRADIENT_DTYPES = ("same", "bfloat16")
RENAMED_KEYS = {"placement_timeout": "start_timeout"}  # old config-file keys still accepted
MAX_PARAMETERS = 10**9  # a sanity bound: the paper's U-Net has 1M, n2n's default model 642k


@dataclass(frozen=True)
class TrainConfig:
    """A training run. Defaults follow the Noise2Noise paper where it has one."""

    data: str                          # folder or Parquet of clean images (or a pairs table)
    out: str                           # run directory: checkpoints/, metrics.jsonl, training.png, model.n2n
    arch: str = "unet"                 # n2n_core.build_model name: seed | seed-deep | unet
    arch_args: dict = field(default_factory=dict)  # build_model keyword arguments, e.g. {"depth": 2, "width": 8}
    noise: str = "gaussian:25"         # pipeline.data.noise spec (ignored for a pairs table)
    target: str = "noisy"              # noisy (Noise2Noise) | clean (supervised) | neighbor (Neighbor2Neighbor:
                                       # single noisy images; with noise "none" the data is noisy already)
    nb_gamma: float = 2.0              # neighbor: the regulariser's weight, rising linearly from 0 over the run
    loss: str = "l2"                   # l2 (zero-mean noise) | l1 (median-preserving noise)
    workers: int = 0                   # gradient actors; 0 = one per GPU, else one per CPU of the cluster
    steps: int = 1000                  # optimizer steps in all (a resumed run continues up to this)
    max_seconds: float | None = None   # wall-clock budget of the step loop: stop after the step that crosses it
    batch_size: int = 16               # global batch, split across the workers
    accumulate: int = 1                # micro-batches of batch_size rows added before each optimizer step: the
                                       # step of a batch_size x accumulate batch in the memory of batch_size
    crop_size: int = 64                # square training patches
    lr: float = 1e-3
    lr_ramp_down: int = 0              # the last this-many of `steps` decay lr to 0 along a half cosine
    optimizer: str = "adam"            # adam | sgd
    momentum: float = 0.0              # sgd only
    seed: int = 0                      # model init and every data/noise draw
    ray: bool = True                   # False: one replica in this process, no Ray (same steps and checkpoints)
    address: str | None = None         # Ray address; None: RAY_ADDRESS, else a local Ray started in-process
    resume: bool = False               # continue from the latest checkpoint in `out`
    checkpoint_every: int = 100        # steps between checkpoints (and one at the end)
    keep_checkpoints: int = 3          # newest step checkpoints kept
    validate_every: int = 50           # steps between validation PSNR measurements (and one at the end)
    validation_images: int = 4         # images used for validation PSNR and the strip
    holdout: int = 0                   # images of `data` held out of training: the validation set (0: validate
                                       # on the first training images); spread evenly over the sorted keys
    init_from: str | None = None       # start from this checkpoint's weights ("default": the built-in model;
                                       # same arch, or a unet widened to this run's width; fresh
                                       # optimizer, step 0)
    validation_size: int = 256         # validation images are centre-cropped to at most this side
    dtype: str = "float32"             # float32 | float64 (weights and arithmetic)
    device: str = "auto"               # worker device: auto (GPU when the actor has one) | cpu | cuda
    cpus_per_worker: float = 1.0       # Ray CPUs reserved by each actor (= its torch threads)
    max_failures: int = 3              # worker (or reducer) replacements tolerated in a run before giving up
    start_timeout: float = 900.0       # seconds to wait for workers to start: GPUs the autoscaler adds, a node boot
    step_timeout: float = 600.0        # seconds a worker may take for one step's gradients before it is replaced
    gradient_dtype: str = "same"       # gradients on the wire: same (the run's dtype) | bfloat16 (half the bytes)
    overlap: bool = True               # the driver steps each bucket of gradients while the workers compute the
                                       # rest (pipeline.training.overlap); False: the serial step (one Ray call
                                       # per node and step, the driver waiting for every gradient)
    buckets: int = 8                   # about this many gradient buckets per step (overlap only; 1: one)
    progress: bool = True              # tqdm progress bar
    smoke_test: bool = False           # tiny run (few steps, tiny model) to check a setup

    def __post_init__(self):
        check_field_types(self)  # first: a sweep's "--grid lr=abc" is named here, not a TypeError below

        def bad(key, why):
            raise ValueError(f"train config: {key} {why}")

        for key in ("steps", "batch_size", "crop_size", "checkpoint_every", "validate_every", "accumulate", "buckets"):
            if not isinstance(getattr(self, key), int) or getattr(self, key) < 1:
                bad(key, f"must be a positive integer, got {getattr(self, key)!r}")
        for key in ("workers", "validation_images", "max_failures", "seed", "keep_checkpoints", "lr_ramp_down",
                    "holdout"):
            if not isinstance(getattr(self, key), int) or getattr(self, key) < 0:
                bad(key, f"must be a non-negative integer, got {getattr(self, key)!r}")
        if not self.ray and self.workers > 1:
            bad("workers", f"must be 0 or 1 without Ray (one replica in this process), got {self.workers}")
        if not self.ray and self.address:
            bad("address", f"{self.address!r} needs Ray: drop it or train with Ray")
        if self.workers > self.batch_size:
            bad("workers", f"({self.workers}) must not exceed batch_size ({self.batch_size})")
        if self.optimizer not in OPTIMIZERS:
            bad("optimizer", f"must be one of {OPTIMIZERS}, got {self.optimizer!r}")
        if self.loss not in LOSSES:
            bad("loss", f"must be one of {LOSSES}, got {self.loss!r}")
        if self.target not in TARGETS:
            bad("target", f"must be one of {TARGETS}, got {self.target!r}")
        if self.target == "neighbor" and self.loss != "l2":
            bad("loss", f"must be 'l2' with target 'neighbor' (its loss is a mean square), got {self.loss!r}")
        if not (isinstance(self.nb_gamma, (int, float)) and not isinstance(self.nb_gamma, bool)
                and math.isfinite(self.nb_gamma) and self.nb_gamma >= 0):
            bad("nb_gamma", f"must be a finite number >= 0, got {self.nb_gamma!r}")
        if self.dtype not in DTYPES:
            bad("dtype", f"must be one of {tuple(DTYPES)}, got {self.dtype!r}")
        if self.device not in DEVICES:
            bad("device", f"must be one of {DEVICES}, got {self.device!r}")
        if not self.lr > 0:
            bad("lr", f"must be positive, got {self.lr!r}")
        if self.max_seconds is not None and (isinstance(self.max_seconds, bool)
                                             or not isinstance(self.max_seconds, (int, float))
                                             or not self.max_seconds > 0):
            bad("max_seconds", f"must be a positive number of seconds (or None), got {self.max_seconds!r}")
        if self.gradient_dtype not in GRADIENT_DTYPES:
            bad("gradient_dtype", f"must be one of {GRADIENT_DTYPES}, got {self.gradient_dtype!r}")
        for key in ("start_timeout", "step_timeout"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                bad(key, f"must be a positive number of seconds, got {value!r}")
        from pipeline.data.noise import NoNoise, parse_noise
        try:  # a bad spec fails here, before a run folder or a Ray cluster exists
            noise = parse_noise(self.noise)
        except ValueError as e:
            raise ValueError(f"train config: noise: {e}") from None
        if isinstance(noise, NoNoise) and self.target != "neighbor":
            bad("noise", f"'none' (the data is noisy already) needs target 'neighbor': target {self.target!r} "
                         f"needs clean images to add noise to")
        if not self.cpus_per_worker > 0:
            bad("cpus_per_worker", f"must be positive, got {self.cpus_per_worker!r}")
        if not isinstance(self.arch_args, dict):
            bad("arch_args", f"must be a mapping, got {type(self.arch_args).__name__}")
        from n2n_core.architectures import count_parameters

        try:  # measured without building anything: a typo'd width fails here, not in an OOM
            count_parameters(self.arch, limit=MAX_PARAMETERS, **self.arch_args)
        except (TypeError, ValueError) as e:
            bad("arch/arch_args", f"(--arch {self.arch} with --arch-arg {self.arch_args}): {e}")

    def lr_at(self, step: int) -> float:
        """Learning rate of the optimizer step taken at `step` (0-based): `lr`, then the ramp-down.

        Over the last `lr_ramp_down` steps of `steps` it falls along a half cosine,
        lr * (1 + cos(pi * k / n)) / 2 at the k-th of those n steps (k = 0..n-1), as the
        Noise2Noise paper ramps its rate down at the end of training.
        """
        n = min(self.lr_ramp_down, self.steps)
        k = step - (self.steps - n)
        if n == 0 or k < 0:
            return self.lr
        return self.lr * 0.5 * (1.0 + math.cos(math.pi * min(k, n) / n))

    def nb_gamma_at(self, step: int) -> float:
        """Neighbor2Neighbor's regulariser weight at `step`: 0 at the first step, rising linearly to
        `nb_gamma` at the last (the authors' schedule, by step instead of epoch)."""
        return self.nb_gamma * step / self.steps

    @property
    def rows_per_step(self) -> int:
        """Rows of the global batch of one optimizer step: `batch_size` x `accumulate`."""
        return self.batch_size * self.accumulate

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def replace(self, **changes) -> "TrainConfig":
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_dict(cls, values: dict, *, source: str = "config") -> "TrainConfig":
        values = {RENAMED_KEYS.get(k, k): v for k, v in values.items()}
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"{source}: unknown keys {unknown} (known: {sorted(known)})")
        missing = [k for k in ("data", "out") if k not in values]
        if missing:
            raise ValueError(f"{source}: missing required keys {missing}")
        return cls(**values)


def check_field_types(config) -> None:
    """Every field of a config dataclass holds its annotated type: an `int` field an int (True
    and False are ints to Python, not to a user: a sweep's "--grid lr=true"), a `float` one
    a number, a `bool` one a bool, a `str` one text (a path-like `data` or `out` becomes its
    string). ValueError naming the first field that does not."""
    for f in dataclasses.fields(config):
        value, kind = getattr(config, f.name), str(f.type)
        if kind == "str" and isinstance(value, os.PathLike):
            object.__setattr__(config, f.name, os.fspath(value))
            continue
        if value is None and "None" in kind:
            continue
        if kind == "bool":
            ok, want = isinstance(value, bool), "true or false"
        elif kind.startswith("int"):
            ok, want = isinstance(value, int) and not isinstance(value, bool), "an integer"
        elif kind.startswith("float"):
            ok, want = isinstance(value, (int, float)) and not isinstance(value, bool), "a number"
        elif kind.startswith("str"):
            ok, want = isinstance(value, str), "text"
        else:
            continue
        if not ok:
            raise ValueError(f"train config: {f.name} must be {want}, got {value!r}")


def smoke_overrides() -> dict:
    """What `--smoke-test` changes: a few steps of a tiny U-Net on small crops."""
    return {"steps": 4, "batch_size": 4, "crop_size": 16, "arch": "unet", "arch_args": {"depth": 2, "width": 8},
            "checkpoint_every": 2, "validate_every": 2, "validation_images": 2, "validation_size": 32}


def read_config_file(path) -> dict:
    """Keys and values of a YAML (.yaml/.yml) or JSON file; errors name the file."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as e:
        raise ValueError(f"{path}: cannot read the config file ({e.strerror})") from None
    try:
        if path.suffix.lower() in (".yaml", ".yml"):
            import yaml

            values = yaml.safe_load(text)
        else:
            values = json.loads(text)
    except Exception as e:  # yaml.YAMLError / json.JSONDecodeError
        raise ValueError(f"{path}: not valid {'YAML' if path.suffix.lower() in ('.yaml', '.yml') else 'JSON'}: {e}") from None
    if values is None:
        return {}
    if not isinstance(values, dict):
        raise ValueError(f"{path}: expected a mapping of option names to values, got {type(values).__name__}")
    return {str(k).replace("-", "_"): v for k, v in values.items()}
