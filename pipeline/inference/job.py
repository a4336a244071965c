"""The bulk denoising job: a folder tree or Parquet table in, the same layout out.

    read (folder listing | Parquet row groups)
      -> Ray Data `map_batches` on a pool of `DenoiseWorker` actors (checkpoint loaded
         once per actor; one actor per GPU, else CPU actors with the cores split):
         decode, denoise (tiled), encode, write each output atomically
      -> the driver streams back one manifest entry per input and appends it.

Decision: Ray Data rather than hand-made actors. Its streaming executor already gives
what the job needs: inputs are pulled lazily (folder keys in blocks of one batch;
Parquet row groups by read tasks), a fixed-size actor pool (`concurrency=`) holds one
model each, backpressure bounds the blocks in flight so memory stays flat however many
images there are, and lost actors are restarted. What Ray Data cannot do for us -
per-image error handling, resumable writes with a manifest, mirrored paths - lives in
the actor (every error becomes a "failed" entry instead of failing the dataset) and in
the driver (skips, refusals and the manifest). Ray Data's own writers are not used:
they write whole blocks under generated names, while we mirror input paths and need
each output atomically renamed into place.

Resuming: a key whose latest manifest line is done/skipped, and whose output still
exists, is skipped (logged "skipped"); `overwrite=True` redoes everything. Parquet
output is a folder of part files; parts no manifest line refers to (left by a kill
between rename and manifest line) are deleted when the next run starts.
"""
from __future__ import annotations

import math
import os
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow.dataset as pads

from pipeline.images import DEFAULT_MAX_PIXELS as IMAGES_MAX_PIXELS
from pipeline.inference.manifest import (
    DONE, FAILED, FINISHED, MANIFEST_NAME, SKIPPED, Entry, ManifestWriter, read_manifest,
)
from pipeline.inference.outputs import (
    PART_PREFIX, PathEscapeError, clear_staging, remove_orphan_parts, safe_relative_path,
)
from pipeline.inference.worker import DenoiseWorker, WorkerPlan, table_entries

# Pixel-bomb guard: larger images fail when decoded. The same default as pipeline.images
# (Pillow's MAX_IMAGE_PIXELS, 89.5 MP), since Pillow's own check also applies: a larger
# --max-pixels has no effect unless the application raises Image.MAX_IMAGE_PIXELS too.
DEFAULT_MAX_PIXELS = IMAGES_MAX_PIXELS


@dataclass(frozen=True)
class DenoiseConfig:
    """One denoising job; each field is one option of `n2n denoise`."""

    input: str  # a folder tree of images, a Parquet file or a folder of Parquet files
    output: str  # a folder (mirrored tree) or a path ending in .parquet (folder of parts)
    model: str | None = None  # checkpoint; None: the built-in default model
    tile: int | None = 512  # output tile side for large images; None or 0: whole images
    overlap: int = 32  # context pixels around each tile (rounded to the model's multiple)
    self_ensemble: bool = False  # average over the 8 flips and rotations (8 forward passes)
    workers: int | None = None  # actors; None: one per GPU, else one per core
    batch_size: int = 4  # images per actor call
    overwrite: bool = False  # redo inputs an earlier run finished
    compare: int = 0  # write before/after strips for this many sampled images
    address: str | None = None  # Ray cluster (pipeline.ray_session); None: RAY_ADDRESS, else a private Ray
    device: str = "auto"  # "auto" (GPU when the cluster has one), "cpu" or "cuda"
    max_pixels: int = DEFAULT_MAX_PIXELS  # larger images fail (decompression bombs)
    image_column: str = "image"  # Parquet input: the encoded image column
    key_column: str = "path"  # Parquet input: the key (relative path) column
    output_column: str = "denoised"  # Parquet output: the denoised image column
    progress: bool = True  # progress bar on stderr


@dataclass(frozen=True)
class DenoiseSummary:
    """What a run did. `failures` lists (key, reason) for every failed input."""

    total: int
    done: int
    skipped: int
    failed: int
    megapixels: float
    seconds: float
    output: str
    manifest: str
    failures: tuple = field(default_factory=tuple)

    @property
    def megapixels_per_s(self) -> float:
        return self.megapixels / self.seconds if self.seconds > 0 else 0.0

    @property
    def images_per_s(self) -> float:
        return self.done / self.seconds if self.seconds > 0 else 0.0

    def format(self, max_failures: int = 20) -> str:
        lines = [
            f"{self.total} inputs: {self.done} done, {self.skipped} skipped, {self.failed} failed",
            f"{self.megapixels:.1f} MP in {self.seconds:.1f} s: {self.megapixels_per_s:.2f} MP/s, "
            f"{self.images_per_s:.2f} images/s",
            f"output: {self.output}  manifest: {self.manifest}",
        ]
        for key, reason in self.failures[:max_failures]:
            lines.append(f"  failed {key}: {reason}")
        if len(self.failures) > max_failures:
            lines.append(f"  ... and {len(self.failures) - max_failures} more (see the manifest)")
        return "\n".join(lines)


def _model_path(config: DenoiseConfig) -> str:
    if config.model:
        return str(config.model)
    from pipeline.assets import default_model_path

    return str(default_model_path())


def _check_parquet(config: DenoiseConfig, keys: list[str]) -> None:
    """The Parquet input has the columns asked for and unique keys."""
    names = pads.dataset(config.input, format="parquet").schema.names
    for column in (config.key_column, config.image_column):
        if column not in names:
            raise ValueError(f"{config.input}: no column {column!r} (columns: {names})")
    if config.output_column in names:
        raise ValueError(f"{config.input}: already has a column {config.output_column!r}; choose another output column")
    seen = set()
    for key in keys:
        if key in seen:
            raise ValueError(f"{config.input}: key {key!r} appears more than once in column {config.key_column!r}")
        seen.add(key)


def _output_exists(root: Path, record: dict) -> bool:
    return bool(record.get("output")) and (root / record["output"]).is_file()


def _init_ray(config: DenoiseConfig) -> bool:
    """Connect to Ray as --address asks (`pipeline.ray_session.connect`, shared with training).

    Returns True when this call connected (and the job must shut Ray down).
    """
    from pipeline.ray_session import connect

    return connect(config.address)


def _resources(config: DenoiseConfig) -> tuple[str, int, int, dict]:
    """(device, workers, threads per actor, ray remote args) from the cluster's resources."""
    import ray

    available = ray.cluster_resources()
    cpus = max(1, int(available.get("CPU", 1)))
    gpus = int(available.get("GPU", 0))
    device = config.device
    if device == "auto":
        device = "cuda" if gpus > 0 else "cpu"
    if device == "cuda":
        if gpus == 0:
            raise RuntimeError("--device cuda: the Ray cluster has no GPU")
        workers = config.workers or gpus
        threads = max(1, min(4, cpus // workers))
        return device, workers, threads, {"num_gpus": 1, "num_cpus": 0.5}
    if device != "cpu":
        raise ValueError(f"device must be auto, cpu or cuda, not {config.device!r}")
    workers = config.workers or cpus
    threads = max(1, cpus // workers)
    # Half the cores as the actors' logical claim: Ray Data's file listing and Parquet read
    # tasks need a free CPU slot to be scheduled at all (they deadlock behind a full pool).
    # Torch threads are set explicitly, so the claim does not limit the actors' real use.
    return device, workers, threads, {"num_cpus": 0.5 * min(threads, cpus / workers)}


def run_denoise(config: DenoiseConfig) -> DenoiseSummary:
    """Denoise every image of config.input into config.output; see the module docstring."""
    start = time.perf_counter()
    model_path = _model_path(config)
    from n2n_core import load_checkpoint

    load_checkpoint(model_path)  # fail early, on the driver, with the checkpoint's own error
    root = Path(config.output)
    root.mkdir(parents=True, exist_ok=True)
    output_kind = "parquet" if config.output.rstrip("/").endswith(".parquet") else "folder"
    manifest_path = root / MANIFEST_NAME
    previous = read_manifest(manifest_path)
    run = time.strftime("%Y%m%dT%H%M%S") + "-" + uuid.uuid4().hex[:8]
    clear_staging(root)  # temporary files of killed runs
    if output_kind == "parquet":
        if config.overwrite:
            remove_orphan_parts(root, keep=set())
        else:
            remove_orphan_parts(root, keep=_finished_outputs(previous))

    from pipeline.datasets import open_dataset

    dataset = open_dataset(config.input, image_column=config.image_column, key_column=config.key_column)
    input_kind = dataset.kind  # "folder" or "parquet"
    keys = [str(k) for k in dataset.keys]
    row_bytes = 0.0  # Parquet input: mean row size, for Ray Data's block size
    if input_kind == "parquet":
        if dataset.problems:  # Ray Data's reader would stop on them mid-run: refuse up front
            raise ValueError("unreadable Parquet input: " + "; ".join(f"{n}: {r}" for n, r in dataset.problems))
        _check_parquet(config, keys)
        row_bytes = dataset.mean_row_bytes() or 0.0
        dataset = None  # rows (all columns) come from Ray Data's Parquet reader

    early: list[Entry] = []
    todo: list[tuple[int, str]] = []
    for index, key in enumerate(keys):
        if output_kind == "folder":
            try:
                safe_relative_path(key)
            except PathEscapeError as error:
                early.append(Entry(key, FAILED, str(error)))
                continue
        record = previous.get(key)
        if not config.overwrite and record and record["status"] in FINISHED and _output_exists(root, record):
            early.append(Entry(key, SKIPPED, "done by an earlier run", record["output"]))
            continue
        todo.append((index, key))

    counts = {DONE: 0, SKIPPED: 0, FAILED: 0}
    failures: list[tuple[str, str]] = []
    megapixels = 0.0

    def account(entries: list[Entry]) -> None:
        nonlocal megapixels
        for e in entries:
            counts[e.status] += 1
            megapixels += e.megapixels
            if e.status == FAILED:
                failures.append((e.key, e.reason))

    with ManifestWriter(manifest_path, run) as manifest:
        manifest.append(early)
        account(early)
        if todo:
            compare = _compare_sample([k for _, k in todo], config.compare)
            started_ray = _init_ray(config)
            try:
                for entries in _stream(config, model_path, input_kind, output_kind, dataset, todo, keys,
                                       compare, run, row_bytes):
                    manifest.append(entries)
                    account(entries)
                if output_kind == "parquet":  # a part a killed run's straggling actor renamed in meanwhile
                    remove_orphan_parts(root, keep=_finished_outputs(read_manifest(manifest_path)))
            finally:
                clear_staging(root)  # ours and any stale one (one run per output at a time)
                if started_ray:
                    import ray

                    ray.shutdown()
    return DenoiseSummary(
        total=len(keys), done=counts[DONE], skipped=counts[SKIPPED], failed=counts[FAILED],
        megapixels=megapixels, seconds=time.perf_counter() - start, output=str(root),
        manifest=str(manifest_path), failures=tuple(failures),
    )


def _compare_sample(keys: list[str], count: int) -> frozenset:
    if count <= 0 or not keys:
        return frozenset()
    count = min(count, len(keys))
    return frozenset(keys[i * len(keys) // count] for i in range(count))


def _finished_outputs(records: dict[str, dict]) -> set[str]:
    """The outputs (files, Parquet parts) that finished manifest records refer to."""
    return {r["output"] for r in records.values() if r["status"] in FINISHED}


def _stream(config, model_path, input_kind, output_kind, dataset, todo, keys, compare, run, row_bytes):
    """Yield lists of manifest entries as the actor pool finishes batches."""
    import ray
    from tqdm import tqdm

    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False
    device, workers, threads, remote_args = _resources(config)
    batch_size = max(1, config.batch_size)
    todo_keys = {k for _, k in todo}
    plan = WorkerPlan(
        model_path=os.path.abspath(model_path) if "://" not in model_path else model_path,
        device=device, threads=threads, tile=config.tile or None, overlap=config.overlap,
        self_ensemble=config.self_ensemble,
        max_pixels=config.max_pixels, input_kind=input_kind, output_kind=output_kind,
        output_root=os.path.abspath(config.output), run=run, image_column=config.image_column,
        key_column=config.key_column, output_column=config.output_column, compare_keys=compare,
        exclude_keys=frozenset(k for k in keys if k not in todo_keys) if input_kind == "parquet" else frozenset(),
    )
    block_limit = context.target_max_block_size
    if input_kind == "folder":
        items = [{"index": index, "key": key} for index, key in todo]
        data = ray.data.from_items(items, override_num_blocks=math.ceil(len(items) / batch_size))
    else:
        # Ray Data cuts a Parquet file into blocks of at most target_max_block_size (128 MiB
        # by default: a small table would be one block, one actor's work, logged only when
        # done). Blocks of about one actor call's rows spread the rows over the actors and
        # let the manifest follow the work, so a killed run loses little.
        context.target_max_block_size = max(4096, int(row_bytes * batch_size))
        data = ray.data.read_parquet(config.input)
    try:
        data = data.map_batches(
            DenoiseWorker, fn_constructor_args=(plan, dataset), batch_size=batch_size,
            batch_format="pyarrow", compute=ray.data.ActorPoolStrategy(size=workers), **remote_args,
        )
        with tqdm(total=len(todo), unit="img", disable=not config.progress, desc="denoise") as bar:
            for batch in data.iter_batches(batch_size=None, batch_format="pyarrow"):
                entries = table_entries(batch)
                bar.update(len(entries))
                yield entries
    finally:
        context.target_max_block_size = block_limit
