"""The bulk denoising job: a folder tree or Parquet table in, the same layout out.

    read (folder listing | Parquet row groups)
      -> Ray Data `map_batches` on a pool of `DenoiseWorker` actors (checkpoint loaded
         once per actor; one actor per GPU, else CPU actors with the cores split):
         decode, denoise (tiled), encode, write each output atomically
      -> the driver streams back one manifest entry per input and appends it.

Decision: Ray Data rather than hand-made actors. Its streaming executor already gives
what the job needs: inputs are pulled lazily (folder keys in blocks of one batch;
Parquet row groups by read tasks), an actor pool that grows with the cluster
(`ActorPoolStrategy(min_size, max_size, initial_size)`, see `_pool_size`) holds one model
each (its bytes put once into the object store by the driver), backpressure bounds the
blocks in flight so memory stays flat however many images there are, and lost actors
are restarted. What Ray Data cannot do for us - per-image error handling, resumable
writes with a manifest, mirrored paths - lives in the actor (every error becomes a
"failed" entry instead of failing the dataset) and in the driver (skips, refusals and
the manifest). Ray Data's own writers are not used:
they write whole blocks under generated names, while we mirror input paths and need
each output atomically renamed into place.

OUT is a local folder (`LocalOutput`: outputs.py, manifest.py) or a prefix on an object
store (`RemoteOutput`: remote.py), with the same layout and rules, behind one interface
(job_output.py). A local OUT that an actor's node may not see is refused (shared_storage.py).

This module is the entry: `run_denoise` checks, opens and runs the steps of steps.py (plan,
execute, merge at the end) over the stream of stream.py; config.py holds `DenoiseConfig`
and `DenoiseSummary`, inputs.py what the run reads (model, dataset) and records of them.

Safety and resume, in short (docs/safety.md and docs/denoise.md have every case): nothing
is created before the checks of `preflight.py` pass; every input gets one outcome
(`planning.py`); the job deletes only what its own manifest or staging folders name; an
output's manifest line is written before the output is renamed into place, so a rerun
after any kill skips every output that landed.
"""
from __future__ import annotations

import time
import uuid

from pipeline.inference.config import DenoiseConfig, DenoiseSummary
from pipeline.inference.inputs import input_identity, model_path_of, open_input, pixel_settings, read_model
from pipeline.inference.job_output import output_at
from pipeline.inference.manifest import DONE, FAILED, MANIFEST_NAME, SKIPPED, Entry
from pipeline.inference.preflight import check_input_exists, check_same_input, check_separate
from pipeline.inference.steps import Job, execute, merge_at_end, plan_run


def run_denoise(config: DenoiseConfig) -> DenoiseSummary:
    """Denoise every image of config.input into config.output; see the module docstring.

    Raises `UsageError` (nothing created or deleted) when the job cannot start as asked.
    """
    start = time.perf_counter()
    model_path, model_bytes, out = _preflight(config)
    output_kind = "parquet" if config.output.split("?", 1)[0].rstrip("/").endswith(".parquet") else "folder"
    dataset = open_input(config)
    keys = list(dataset.keys)
    null_rows = {i for i in range(len(keys)) if dataset.is_null_key(i)}
    run = time.strftime("%Y%m%dT%H%M%S") + "-" + uuid.uuid4().hex[:8]
    context = {"in": input_identity(config.input), "settings": pixel_settings(config, model_bytes)}
    job = Job(config=config, model_path=model_path, model_bytes=model_bytes, dataset=dataset,
              output_kind=output_kind, run=run, row_bytes=dataset.mean_row_bytes() or 0.0,
              out=out.open(run, context), context=context, table_source=dataset.table_stamp())
    totals = _Counts()
    with out:
        plan, state, stopped = plan_run(job, keys, null_rows)
        stopped = execute(job, plan, state, totals, stopped)
        stopped = merge_at_end(job, stopped)
    c = totals.counts
    return DenoiseSummary(
        total=len(keys), done=c[DONE], skipped=c[SKIPPED], failed=c[FAILED], megapixels=totals.megapixels,
        seconds=time.perf_counter() - start, output=out.where(), manifest=out.where(MANIFEST_NAME),
        failures=tuple(totals.failures), stopped=stopped, redone=plan.stale if plan is not None else 0,
    )


def _preflight(config: DenoiseConfig):
    """Every check that can refuse the job before anything is created: the model loads, IN
    exists, IN and OUT are apart, OUT is new, empty or n2n's. Returns (model path, its bytes,
    OUT checked and not yet opened: job_output.py)."""
    model_path = model_path_of(config)
    check_input_exists(config.input)
    model_bytes = read_model(model_path)
    check_separate(config.input, config.output)
    out = output_at(config.output)
    if not config.overwrite:
        check_same_input(config.input, config.output, input_identity(config.input), out.read_state().last_in)
    return model_path, model_bytes, out


class _Counts:
    """Running totals of a run's entries."""

    def __init__(self):
        self.counts = {DONE: 0, SKIPPED: 0, FAILED: 0}
        self.failures: list[tuple[str, str]] = []
        self.megapixels = 0.0

    def add(self, entries: list[Entry]) -> None:
        for e in entries:
            self.counts[e.status] += 1
            self.megapixels += e.megapixels
            if e.status == FAILED:
                self.failures.append((e.key, e.reason))
