"""The stream of one run: the actor pool's size and resources, and Ray Data carrying the
inputs still to do through `DenoiseWorker` actors (worker.py) back to the driver as
manifest entries, under a progress bar."""
from __future__ import annotations

import contextlib
import math
import re
from typing import TYPE_CHECKING

from pipeline.inference.config import DenoiseConfig
from pipeline.inference.worker import DenoiseWorker, WorkerPlan, table_entries

if TYPE_CHECKING:
    from pipeline.inference.planning import Plan
    from pipeline.inference.steps import Job


def actor_resources(config: DenoiseConfig) -> tuple[str, int, int, dict]:
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


def actors_fitting_now(device: str, workers: int) -> int:
    """How many actors the cluster holds right now (before any autoscaling)."""
    import ray

    available = ray.cluster_resources()
    now = int(available.get("GPU", 0)) if device == "cuda" else max(1, int(available.get("CPU", 1)))
    return max(1, min(now, workers) if workers else now)


def run_actors(job: Job, plan: Plan, totals, resources, marker: str) -> str:
    """Run the actors over plan.todo, adding every entry to `totals` (`.add(entries)`); returns
    why the run stopped early ("" if it did not)."""
    compare = compare_sample([k for _, k in plan.todo], job.config.compare)
    try:
        with contextlib.closing(denoise_stream(job, plan, compare, resources, marker)) as stream:
            for entries in stream:
                totals.add(entries)
                full = [e for e in entries if e.stop]
                if full:  # every later write would fail too: stop the pool now
                    return f"{full[0].reason} (at {full[0].key})"
    except Exception as error:
        # An actor on a node that joined after the driver's check, and does not see the local
        # OUT, dies in its constructor (shared_storage.check_marker): stop with its one line.
        found = re.search(r"OUT .* is not on shared storage: [^\n]*", str(error)) if marker else None
        if found is None:
            raise
        return found.group(0)
    return ""


def compare_sample(keys: list[str], count: int) -> frozenset:
    """`count` keys spread evenly over `keys`: the inputs that get before/after strips."""
    if count <= 0 or not keys:
        return frozenset()
    count = min(count, len(keys))
    return frozenset(keys[i * len(keys) // count] for i in range(count))


def pool_size(config: DenoiseConfig, device: str, fits_now: int) -> dict:
    """The actor pool: `ActorPoolStrategy(min_size, max_size, initial_size)` arguments.

    Ray Data grows an autoscaling pool while inputs wait and the cluster has room (asking the
    cluster autoscaler for more), and shrinks it when idle. It starts with the actors that fit
    now (`initial_size`, at most the maximum) and never goes below one. The maximum is
    `--workers` when given; otherwise, on GPUs, unbounded: each actor claims a whole GPU, so
    the pool is as large as the GPUs the cluster has or the autoscaler adds. On CPUs without
    `--workers` the maximum is the actors that fit now: a CPU actor claims only part of its
    cores (see `actor_resources`), so an unbounded pool would oversubscribe them.
    """
    if config.workers:
        maximum = config.workers
    elif device == "cuda":
        maximum = None
    else:
        maximum = fits_now
    initial = max(1, fits_now if maximum is None else min(fits_now, maximum))
    return {"min_size": 1, "max_size": maximum, "initial_size": initial}


def denoise_stream(job: Job, plan: Plan, compare: frozenset, resources, marker: str):
    """Yield lists of manifest entries as the actor pool finishes batches."""
    import ray
    from tqdm import tqdm

    config, dataset, out, output_kind, run = job.config, job.dataset, job.out, job.output_kind, job.run

    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False
    device, workers, threads, remote_args = resources
    fits_now = actors_fitting_now(device, workers)
    batch_size = config.batch_size
    todo = plan.todo
    input_kind = dataset.kind
    model_ref = ray.put(job.model_bytes)  # once; every actor reads it from the object store
    worker_plan = WorkerPlan(
        model_path=job.model_path, device=device, threads=threads, tile=config.tile or None, overlap=config.overlap,
        self_ensemble=config.self_ensemble, strength=float(config.strength), precision=config.precision,
        max_pixels=config.max_pixels, input_kind=input_kind, output_kind=output_kind,
        output_root=out.actor_root(), run=run,
        image_column=config.image_column,
        key_column=config.key_column, output_column=config.output_column, compare_keys=compare,
        exclude_keys=frozenset(plan.settled) if input_kind == "parquet" else frozenset(),
        shared_marker=marker, line_context=job.context, table_source=job.table_source,
    )
    block_limit = context.target_max_block_size
    if input_kind == "folder":
        items = [{"index": index} for index, _ in todo]  # the actor takes each key from the dataset: names
        # that are not UTF-8 never pass through Arrow strings
        data = ray.data.from_items(items, override_num_blocks=math.ceil(len(items) / batch_size))
    else:
        # Ray Data cuts a Parquet file into blocks of at most target_max_block_size (128 MiB
        # by default: a small table would be one block, one actor's work, logged only when
        # done). Blocks of about one actor call's rows spread the rows over the actors and
        # let the manifest follow the work, so a killed run loses little.
        # Exactly the files listed on the driver (no symlinked folder Ray's own listing would
        # enter, however often a link loop repeats it).
        context.target_max_block_size = max(4096, int(job.row_bytes * batch_size))
        data = ray.data.read_parquet(dataset.files, filesystem=dataset.filesystem)
    try:
        data = data.map_batches(
            DenoiseWorker,
            fn_constructor_args=(worker_plan, dataset if input_kind == "folder" else None, [model_ref]),
            batch_size=batch_size, batch_format="pyarrow",
            compute=ray.data.ActorPoolStrategy(**pool_size(config, device, fits_now)), **remote_args,
        )
        with tqdm(total=len(todo), unit="img", disable=not config.progress, desc="denoise") as bar:
            for batch in data.iter_batches(batch_size=None, batch_format="pyarrow"):
                entries = table_entries(batch)
                bar.update(len(entries))
                yield entries
    finally:
        context.target_max_block_size = block_limit
