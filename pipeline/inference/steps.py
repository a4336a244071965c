"""The steps of one denoising run, in order: plan (merge earlier runs' shards, decide every
key's fate: planning.py), execute (the keys settled up front, then the actors: stream.py),
merge at the end. A rerun resumes through the same steps: its plan skips what landed."""
from __future__ import annotations

from dataclasses import dataclass, field

from pipeline.inference.config import DenoiseConfig
from pipeline.inference.job_output import LocalOutput, RemoteOutput
from pipeline.inference.manifest import FINISHED
from pipeline.inference.outputs import STAGING_NAME, is_disk_full
from pipeline.inference.planning import Plan, plan_inputs
from pipeline.inference.stream import actor_resources, run_actors


@dataclass
class Job:
    """One run's fixed parts, from the checks before the start to the actor pool."""

    config: DenoiseConfig
    model_path: str  # for messages; the actors get `model_bytes` through the object store
    model_bytes: bytes
    dataset: object  # ImageDataset (folder) or ParquetDataset
    output_kind: str  # "folder" or "parquet"
    run: str  # this run's id: its staging folder and manifest lines
    row_bytes: float  # Parquet input: mean row size, for Ray Data's block size
    out: LocalOutput | RemoteOutput  # OUT (job_output.py)
    context: dict = field(default_factory=dict)  # every manifest line's "in" and "settings" (manifest.py)
    table_source: dict | None = None  # Parquet input: every row's "source" (the table's fingerprint)


def _init_ray(config: DenoiseConfig) -> bool:
    """Connect to Ray as --address asks (`pipeline.runtime.ray_session.connect`, shared with training).

    Returns True when this call connected (and the job must shut Ray down).
    """
    from pipeline.runtime.ray_session import connect

    return connect(config.address)


def _disk_full_while(what: str, error: OSError) -> str:
    if not is_disk_full(error):
        raise error
    return f"disk full while {what} ({error.strerror or error})"


def plan_run(job: Job, keys: list[str], null_rows: set[int]) -> tuple[Plan | None, object, str]:
    """Merge earlier runs' shards and decide every key's fate. Returns (plan, manifest state,
    why the run stopped: "" or a full disk, then plan is None)."""
    out, dataset = job.out, job.dataset
    try:
        out.merge_staging()  # earlier runs' shards; their stragglers fenced off
        state = out.read_state()
        source_of = dataset.stamp if dataset.kind == "folder" else (lambda index: job.table_source)
        options = dict(null_rows=null_rows, problems=dataset.problems if dataset.kind == "folder" else [],
                       output_kind=job.output_kind, state=state, root=out.tree(), row_name=dataset.name,
                       source_of=source_of, settings=job.context["settings"])
        plan = plan_inputs(keys, overwrite=job.config.overwrite, **options)
        if job.output_kind == "parquet" and plan.stale and not job.config.overwrite:
            # a part file holds rows of many inputs: one stale row makes its part stale, so the
            # whole output is redone (n2n's own parts are removed first, as with --overwrite)
            stale = plan.stale
            plan = plan_inputs(keys, overwrite=True, **options)
            plan.stale, plan.replace_parts = stale, True
        return plan, state, ""
    except OSError as e:
        return None, None, _disk_full_while("preparing the manifest", e)


def execute(job: Job, plan: Plan | None, state, totals, stopped: str) -> str:
    """Log the keys settled before the start, then run the actors over the rest (starting
    Ray only when there is work), adding every entry to `totals`. Returns why the run stopped early ("" if it did not)."""
    config, out = job.config, job.out
    started_ray = False
    try:
        if plan is not None and plan.todo:
            started_ray = _init_ray(config)
            resources = actor_resources(config)
            out.create_staging()
            marker = out.check_shared(resources[0])  # a refusal removes what this run created
        if plan is not None:
            try:
                if job.output_kind == "parquet" and (config.overwrite or plan.replace_parts):
                    out.remove_parts(state.outputs)  # n2n's own parts only: named by its manifest
                out.manifest.append(plan.early)
                totals.add(plan.early)
            except OSError as e:
                plan, stopped = None, _disk_full_while("preparing the manifest", e)
        if plan is not None and plan.todo:
            stopped = run_actors(job, plan, totals, resources, marker)
    finally:
        if started_ray:
            import ray

            ray.shutdown()
    return stopped


def merge_at_end(job: Job, stopped: str) -> str:
    """Merge this run's shards (all of them, also after a stop) and drop Parquet parts no
    finished row uses; a full disk here leaves the shards for the next run."""
    out = job.out
    try:
        out.merge_staging()
        if job.output_kind == "parquet":  # parts of retried batches: named by a line, used by none
            state = out.read_state()
            used = {r["output"] for r in state.latest.values() if r["status"] in FINISHED}
            out.remove_parts(state.outputs - used)
    except OSError as e:
        stopped = (stopped + "; " if stopped else "") + (
            _disk_full_while("merging the manifest", e) + f": its lines wait in "
            f"{out.where(STAGING_NAME)} and the next run merges them")
    return stopped
