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

    # Each field is one `n2n train` option (pipeline.commands.options builds it from the field):
    # `metadata` holds its help text ("{default}" shows the field's default) and what click needs.
    data: str = field(metadata=dict(  # folder or Parquet of clean images (or a pairs table)
        help="Clean training images: a folder, a Parquet file or folder (or a pairs table)."))
    out: str = field(metadata=dict(help="Run directory: checkpoints/, metrics.jsonl, training.png, model.n2n."))
    arch: str = field(default="unet", metadata=dict(  # n2n_core.build_model name
        help="Architecture: unet (default), seed, seed-deep."))
    arch_args: dict = field(default_factory=dict, metadata=dict(  # build_model keyword arguments
        names=("--arch-arg",), multiple=True, metavar="KEY=VALUE",
        help="Architecture argument, repeatable, e.g. --arch-arg depth=3 --arch-arg width=32."))
    noise: str = field(default="gaussian:25", metadata=dict(  # pipeline.data.noise spec (ignored for a pairs table)
        help="Noise spec: gaussian:25, gaussian:0-50, poisson:30, impulse:0.1, camera, photo; "
             "none: the data is noisy already (--target neighbor)."))
    target: str = field(default="noisy", metadata=dict(choices=TARGETS,
        help="noisy (Noise2Noise, default), clean (supervised) or neighbor (Neighbor2Neighbor: single noisy "
             "images, no pairs; with --noise none, train on your noisy photos as they are)."))
    nb_gamma: float = field(default=2.0, metadata=dict(  # rising linearly from 0 over the run (nb_gamma_at)
        help="--target neighbor: the regulariser's final weight (default {default}; it rises linearly from 0 "
             "over the run)."))
    nb_mask_clipped: bool = field(default=True, metadata=dict(  # n2n_core.neighbor.unclipped_weight
        help="--target neighbor: leave out of the loss the targets within 2 pixels of white in the input "
             "sub-image, where a photo stores a clipped mean (default on; data with no pixel at white keeps "
             "every target)."))
    loss: str = field(default="l2", metadata=dict(  # l2 (zero-mean noise) | l1 (median-preserving noise)
        choices=LOSSES, help="l2 (default) or l1 (impulse noise)."))
    workers: int = field(default=0, metadata=dict(  # 0 = one per GPU, else one per CPU of the cluster
        help="Gradient actors (default: one per GPU, else one per CPU)."))
    steps: int = field(default=1000, metadata=dict(  # a resumed run continues up to this
        help="Optimizer steps in all."))
    max_seconds: float | None = field(default=None, metadata=dict(
        help="Wall-clock budget: stop after the step that crosses it."))
    batch_size: int = field(default=16, metadata=dict(help="Global batch size (split across workers)."))
    accumulate: int = field(default=1, metadata=dict(  # the step of a batch_size x accumulate batch
        help="Micro-batches of --batch-size added before each optimizer step: the step of a batch this "
             "many times larger, in the memory of one (default {default})."))
    crop_size: int = field(default=64, metadata=dict(help="Side of the square training crops."))
    lr: float = field(default=1e-3, metadata=dict(help="Learning rate."))
    lr_ramp_down: int = field(default=0, metadata=dict(  # along a half cosine (lr_at)
        help="Last N of --steps decay the learning rate to 0 (half cosine)."))
    optimizer: str = field(default="adam", metadata=dict(choices=OPTIMIZERS, help="adam (default) or sgd."))
    momentum: float = field(default=0.0, metadata=dict(help="SGD momentum."))
    seed: int = field(default=0, metadata=dict(help="Seed of the model init and every data/noise draw."))
    ray: bool = field(default=True, metadata=dict(
        help="--no-ray: one replica in this process (first GPU if any), same steps and checkpoints."))
    address: str | None = field(default=None, metadata=dict(  # pipeline.runtime.ray_session.connect
        help="Ray cluster: HOST:PORT, 'auto' (the cluster running on this node), 'discover' "
             "(that cluster if there is one, else a private Ray) or 'local' (a private Ray). "
             "Default: RAY_ADDRESS, else a private Ray; jobs/train.py: discover."))
    resume: bool = field(default=False, metadata=dict(help="Continue from the latest checkpoint in --out."))
    checkpoint_every: int = field(default=100, metadata=dict(  # and one at the end
        help="Steps between checkpoints."))
    keep_checkpoints: int = field(default=3, metadata=dict(help="Step checkpoints kept (newest)."))
    validate_every: int = field(default=50, metadata=dict(  # and one at the end
        help="Steps between validation PSNR measurements."))
    validation_images: int = field(default=4, metadata=dict(help="Images used for validation and the PNG strip."))
    holdout: int = field(default=0, metadata=dict(  # 0: validate on the first training images
        help="Images of --data held out of training and used for validation (spread over the sorted keys)."))
    init_from: str | None = field(default=None, metadata=dict(
        help="Start from this checkpoint's weights, 'default' for the built-in model "
             "(its architecture unless --arch/--arch-arg are given: then the same, or a "
             "unet's with a larger width, widened with the same output; new optimizer, step 0)."))
    validation_size: int = field(default=256, metadata=dict(
        help="Validation images are centre-cropped to this side at most."))
    dtype: str = field(default="float32", metadata=dict(choices=tuple(DTYPES), help="Weights and arithmetic."))
    device: str = field(default="auto", metadata=dict(
        choices=DEVICES, help="Worker device (auto: GPU if given one)."))
    cpus_per_worker: float = field(default=1.0, metadata=dict(  # Ray CPUs reserved by each actor
        help="CPUs (and torch threads) per actor."))
    max_failures: int = field(default=3, metadata=dict(
        help="Failures tolerated before giving up (a worker or reducer replaced; a lost node counts once)."))
    start_timeout: float = field(default=900.0, metadata=dict(  # GPUs the autoscaler adds, a node boot
        names=("--start-timeout", "--placement-timeout"),
        help="Seconds to wait for workers to start, new nodes included (default {default}: an autoscaled "
             "node's boot)."))
    step_timeout: float = field(default=600.0, metadata=dict(
        help="Seconds a worker may take for one step's gradients before it is killed and replaced "
             "(default {default})."))
    gradient_dtype: str = field(default="same", metadata=dict(choices=GRADIENT_DTYPES,
        help="Gradients on the wire: same (the run's dtype, default) or bfloat16 (half the bytes, summed in "
             "float32+)."))
    overlap: bool = field(default=True, metadata=dict(  # pipeline.training.overlap; False: one Ray call per node
        help="Overlapped step (default): the driver steps each bucket of gradients while the workers "
             "compute the rest; --no-overlap: the serial step, the driver waiting for all of them."))
    buckets: int = field(default=8, metadata=dict(
        help="About this many gradient buckets per step (overlapped step; default {default})."))
    progress: bool = field(default=True, metadata=dict(help="Show a progress bar."))
    smoke_test: bool = field(default=False, metadata=dict(
        flag_only=True, help="A few steps of a tiny model to check a setup."))

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
