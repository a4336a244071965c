"""The search space of a sweep: which TrainConfig fields and architecture arguments vary, and how.

A dimension is one of
- `grid`        every listed value, each in its own trial (`--grid width=16,32,48`);
- `choice`      one listed value drawn per trial (`--choice residual=false,true`);
- `uniform`     a float drawn uniformly in [lo, hi] (`--uniform momentum=0.5:0.99`);
- `loguniform`  a float drawn log-uniformly in [lo, hi] (`--loguniform lr=1e-4:3e-3`);
- `randint`     an integer drawn uniformly in lo..hi, both included (`--randint width=10:60`).
Grid dimensions multiply (a full factorial); `--samples N` repeats the grid N times, each
repeat drawing its own values of the random dimensions (Ray Tune's `num_samples`).

Keys are TrainConfig field names (`lr`, `batch_size`, `loss`, `optimizer`, `arch`, ...);
any other key is an argument of the architecture (`width`, `depth`, `residual` of the
U-Net), passed as `--arch-arg KEY=VALUE` would be. Fields that define what the trials are
compared on (`data`, `noise`, `holdout`, `validation_*`, `steps`, `max_seconds`,
`validate_every`, `seed` is allowed) or what a trial runs on (`workers`,
`cpus_per_worker`, `device`, `address`, ...) are the same for every trial and cannot vary:
PSNRs measured on different validation sets or budgets are not comparable.

A space file (`--space space.yaml`) maps keys to a dimension or to a fixed value:

    width: {grid: [16, 32, 48]}
    lr: {loguniform: [1.0e-4, 3.0e-3]}
    residual: {choice: [false, true]}
    loss: l1                      # fixed: the same for every trial

On the command line a value list is split at commas; a value that holds commas (a
noise spec, say) is written as a JSON list: `--choice 'loss=["l1","l2"]'`. Values are
read as JSON where they can be (`16` is an int, `1e-3` a float, `true` a bool), else
kept as text.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass

from pipeline.training.config import TrainConfig

KINDS = ("grid", "choice", "uniform", "loguniform", "randint")
LIST_KINDS = ("grid", "choice")
# TrainConfig fields every trial shares: what trials are compared on, and what they run on
FIXED_FIELDS = ("data", "out", "noise", "holdout", "validation_images", "validation_size", "steps", "max_seconds",
                "validate_every", "resume", "workers", "cpus_per_worker", "device", "ray", "address", "progress",
                "smoke_test", "arch_args", "max_failures", "start_timeout", "step_timeout", "gradient_dtype")
TRAIN_FIELDS = tuple(TrainConfig.__dataclass_fields__)


def parse_value(value):
    """A value as JSON when it reads as a number, bool or null ("16" -> 16, "1e-3" -> 0.001); else as given."""
    if isinstance(value, str):
        try:
            parsed = json.loads(value)
        except ValueError:
            return value
        return parsed if parsed is None or isinstance(parsed, (bool, int, float)) else value
    return value


@dataclass(frozen=True)
class Dimension:
    """One searched key: `kind` (one of KINDS) and its `values` (the list, or [lo, hi] for ranges)."""

    key: str
    kind: str
    values: tuple

    def __post_init__(self):
        where = f"search space: {self.key}"
        if self.kind not in KINDS:
            raise ValueError(f"{where}: unknown kind {self.kind!r} (known: {', '.join(KINDS)})")
        if self.kind in LIST_KINDS:
            if not self.values:
                raise ValueError(f"{where}: {self.kind} needs at least one value")
            return
        if len(self.values) != 2:
            raise ValueError(f"{where}: {self.kind} needs two bounds LO:HI, got {list(self.values)}")
        lo, hi = self.values
        if any(isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) for v in (lo, hi)):
            raise ValueError(f"{where}: {self.kind} bounds must be finite numbers, got {lo!r}:{hi!r}")
        if not lo < hi:
            raise ValueError(f"{where}: {self.kind} needs LO < HI, got {lo}:{hi}")
        if self.kind == "loguniform" and lo <= 0:
            raise ValueError(f"{where}: loguniform bounds must be positive, got {lo}:{hi}")
        if self.kind == "randint" and not (float(lo).is_integer() and float(hi).is_integer()):
            raise ValueError(f"{where}: randint bounds must be integers, got {lo}:{hi}")

    @property
    def random(self) -> bool:
        """Drawn per trial (not a grid)."""
        return self.kind != "grid"

    def corners(self) -> list:
        """Values that bound what a trial may get: every listed value, or both ends of a range."""
        if self.kind == "randint":
            return [int(self.values[0]), int(self.values[1])]
        return list(self.values)

    def to_tune(self):
        """The Ray Tune search-space object of this dimension."""
        from ray import tune

        lo_hi = self.values
        if self.kind == "grid":
            return tune.grid_search(list(self.values))
        if self.kind == "choice":
            return tune.choice(list(self.values))
        if self.kind == "uniform":
            return tune.uniform(float(lo_hi[0]), float(lo_hi[1]))
        if self.kind == "loguniform":
            return tune.loguniform(float(lo_hi[0]), float(lo_hi[1]))
        return tune.randint(int(lo_hi[0]), int(lo_hi[1]) + 1)  # Tune's upper bound is exclusive

    def to_dict(self) -> dict:
        return {self.kind: list(self.values)}


def parse_option(kind: str, text: str) -> Dimension:
    """`--grid width=16,32,48` -> Dimension("width", "grid", (16, 32, 48)); errors name the option."""
    option = f"--{kind}"
    key, sep, rest = text.partition("=")
    key = key.strip().replace("-", "_")
    if not sep or not key or not rest.strip():
        form = "KEY=V1,V2,..." if kind in LIST_KINDS else "KEY=LO:HI"
        raise ValueError(f"{option} {text!r}: expected {form}")
    rest = rest.strip()
    if kind in LIST_KINDS:
        if rest.startswith("["):
            try:
                values = json.loads(rest)
            except ValueError as e:
                raise ValueError(f"{option} {text!r}: not a JSON list ({e})") from None
            if not isinstance(values, list):
                raise ValueError(f"{option} {text!r}: expected a JSON list")
        else:
            values = [parse_value(v.strip()) for v in rest.split(",")]
    else:
        lo, colon, hi = rest.partition(":")
        if not colon:
            raise ValueError(f"{option} {text!r}: expected KEY=LO:HI")
        values = [parse_value(lo.strip()), parse_value(hi.strip())]
    try:
        return Dimension(key, kind, tuple(values))
    except ValueError as e:
        raise ValueError(f"{option} {text!r}: {e}") from None


def parse_space_mapping(mapping: dict, *, source: str) -> tuple[dict[str, Dimension], dict]:
    """A space file's mapping -> (dimensions, fixed values); errors name `source` and the key."""
    dims, fixed = {}, {}
    for raw_key, spec in mapping.items():
        key = str(raw_key).replace("-", "_")
        if isinstance(spec, dict):
            if len(spec) != 1:
                raise ValueError(f"{source}: {key}: expected one of {', '.join(KINDS)}, got {sorted(spec)}")
            (kind, values), = spec.items()
            if not isinstance(values, (list, tuple)):
                raise ValueError(f"{source}: {key}: {kind} needs a list, got {values!r}")
            try:
                dims[key] = Dimension(key, str(kind), tuple(parse_value(v) for v in values))
            except ValueError as e:
                raise ValueError(f"{source}: {e}") from None
        else:
            fixed[key] = parse_value(spec)
    return dims, fixed


@dataclass(frozen=True)
class SearchSpace:
    """The dimensions of a sweep, in the order given."""

    dimensions: tuple[Dimension, ...]

    def __post_init__(self):
        seen = set()
        for d in self.dimensions:
            if d.key in seen:
                raise ValueError(f"search space: {d.key} is given twice")
            seen.add(d.key)
            if d.key in FIXED_FIELDS:
                raise ValueError(f"search space: {d.key} cannot vary: it is the same for every trial "
                                 f"(what trials are compared on, or what they run on); set it as an option")

    @property
    def keys(self) -> list[str]:
        return [d.key for d in self.dimensions]

    @property
    def random(self) -> bool:
        return any(d.random for d in self.dimensions)

    @property
    def log_keys(self) -> list[str]:
        """Keys drawn on a log scale (plotted on one)."""
        return [d.key for d in self.dimensions if d.kind == "loguniform"]

    def to_tune(self) -> dict:
        """Ray Tune's `param_space`."""
        return {d.key: d.to_tune() for d in self.dimensions}

    def to_dict(self) -> dict:
        return {d.key: d.to_dict() for d in self.dimensions}

    @classmethod
    def from_dict(cls, values: dict, *, source: str = "search space") -> "SearchSpace":
        dims, fixed = parse_space_mapping(values, source=source)
        if fixed:
            raise ValueError(f"{source}: fixed values {sorted(fixed)} belong to the trial options")
        return cls(tuple(dims.values()))

    def check(self, base: TrainConfig) -> None:
        """Build the trial config of every corner of every dimension (the others at their first value) and
        its model's arguments, so a bad key or value fails before any trial starts; errors name the key."""
        from n2n_core.architectures import build_model
        from pipeline.training.preflight import check_crop

        first = {d.key: d.corners()[0] for d in self.dimensions}
        checked = set()
        for d in self.dimensions:
            for value in d.corners():
                params = {**first, d.key: value}
                try:
                    config = apply_params(base, params, base.out)
                except (TypeError, ValueError) as e:
                    raise ValueError(f"search space: {d.key}={value!r}: {e}") from None
                try:
                    check_crop(config)  # the architecture's size multiple
                except ValueError as e:
                    raise ValueError(f"search space: {d.key}={value!r}: {e}") from None
                model_key = (config.arch, json.dumps(config.arch_args, sort_keys=True))
                if model_key in checked:
                    continue
                checked.add(model_key)
                try:
                    build_model(config.arch, **config.arch_args)
                except (TypeError, ValueError) as e:
                    raise ValueError(f"search space: {d.key}={value!r}: {e}") from None


def apply_params(base: TrainConfig, params: dict, out: str) -> TrainConfig:
    """The TrainConfig of one trial: `base` with the trial's values; keys that are not TrainConfig
    fields go into `arch_args` (on top of the base's)."""
    fields = {k: v for k, v in params.items() if k in TRAIN_FIELDS}
    arch_args = {**base.arch_args, **{k: v for k, v in params.items() if k not in TRAIN_FIELDS}}
    return base.replace(**fields, arch_args=arch_args, out=str(out))
