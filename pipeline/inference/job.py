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

OUT is a local folder (`_LocalOutput`: outputs.py, manifest.py) or a prefix on an object
store (`_RemoteOutput`: remote.py), with the same layout and rules. A local OUT that an
actor's node may not see is refused (shared_storage.py).

Safety and resume, in short (docs/safety.md and docs/denoise.md have every case): nothing
is created before the checks of `preflight.py` pass; every input gets one outcome
(`planning.py`); the job deletes only what its own manifest or staging folders name; an
output's manifest line is written before the output is renamed into place, so a rerun
after any kill skips every output that landed.
"""
from __future__ import annotations

import contextlib
import hashlib
import math
import os
import re
import time
import uuid

import pyarrow.fs as pafs
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.errors import UsageError
from pipeline.data.images import DEFAULT_MAX_PIXELS as IMAGES_MAX_PIXELS
from pipeline.inference.manifest import (
    DONE, FAILED, FINISHED, MANIFEST_NAME, SKIPPED, Entry, ManifestWriter, OutputBusyError, read_state,
)
from pipeline.inference.outputs import (
    PART_NAME, STAGING_NAME, create_staging, fence_staging, is_disk_full, remove_parts, remove_staging, staging_dir,
)
from pipeline.inference.planning import plan_inputs
from pipeline.inference.preflight import (
    check_input_exists, check_output, check_parquet_schema, check_remote_output, check_same_input, check_separate,
    make_output,
)
from pipeline.inference.remote import (
    RemoteManifestWriter, RemoteOut, RemoteTree, create_live, read_remote_state,
)
from pipeline.inference.tiling import PRECISIONS
from pipeline.inference.worker import DenoiseWorker, WorkerPlan, table_entries
from pipeline.storage.locations import is_remote, is_uri, local_path
from pipeline.storage.names import printable

# Pixel-bomb guard: larger images fail when decoded. The same default as pipeline.data.images
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
    strength: float = 1.0  # correction applied: noisy + strength (denoised - noisy); less keeps more texture
    precision: str = "float32"  # the model's dtype: float32, bfloat16 or float16
    workers: int | None = None  # actors; None: one per GPU, else one per core
    batch_size: int = 4  # images per actor call
    overwrite: bool = False  # redo inputs an earlier run finished
    compare: int = 0  # write before/after strips for this many sampled images
    address: str | None = None  # Ray cluster (pipeline.runtime.ray_session); None: RAY_ADDRESS, else a private Ray
    device: str = "auto"  # "auto" (GPU when the cluster has one), "cpu" or "cuda"
    max_pixels: int = DEFAULT_MAX_PIXELS  # larger images fail (decompression bombs)
    image_column: str = "image"  # Parquet input: the encoded image column
    key_column: str = "path"  # Parquet input: the key (relative path) column
    output_column: str = "denoised"  # Parquet output: the denoised image column
    progress: bool = True  # progress bar on stderr
    follow_symlinks: bool = False  # folder input: enter symlinked folders (each real folder once)

    def __post_init__(self):
        """Bad values are refused, never coerced (a negative overlap used to run, with seams)."""
        def positive(option, value, allow_none=False, minimum=1):
            if value is None and allow_none:
                return
            if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
                need = "a positive integer" if minimum == 1 else "an integer >= 0"
                raise UsageError(f"{option} must be {need}, got {value!r}")

        positive("--workers", self.workers, allow_none=True)
        positive("--batch-size", self.batch_size)
        positive("--tile", self.tile, allow_none=True, minimum=0)
        positive("--overlap", self.overlap, minimum=0)
        positive("--compare", self.compare, minimum=0)
        positive("--max-pixels", self.max_pixels)
        if isinstance(self.strength, bool) or not isinstance(self.strength, (int, float)) \
                or not 0.0 <= self.strength <= 1.0:
            raise UsageError(f"--strength must be a number from 0 to 1, got {self.strength!r}")
        if self.device not in ("auto", "cpu", "cuda"):
            raise UsageError(f"--device must be auto, cpu or cuda, got {self.device!r}")
        if self.precision not in PRECISIONS:
            raise UsageError(f"--precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        if self.model is not None and not os.fspath(self.model):
            raise UsageError(f"--model must name a checkpoint file, got {self.model!r} (leave it out for the "
                             f"built-in default model)")
        for option, value in (("IN", self.input), ("OUT", self.output), ("--image-column", self.image_column),
                              ("--key-column", self.key_column), ("--output-column", self.output_column)):
            if not isinstance(value, str) or not value:
                raise UsageError(f"{option} must be a non-empty string, got {value!r}")


@dataclass(frozen=True)
class DenoiseSummary:
    """What a run did. `failures` lists (key, reason) for every failed input; `stopped`
    says why the run ended early (then `total - done - skipped - failed` inputs were not
    processed), empty when it ran to the end."""

    total: int
    done: int
    skipped: int
    failed: int
    megapixels: float
    seconds: float
    output: str
    manifest: str
    failures: tuple = field(default_factory=tuple)
    stopped: str = ""
    redone: int = 0  # finished by an earlier run, redone because its input or the settings changed

    @property
    def not_processed(self) -> int:
        return self.total - self.done - self.skipped - self.failed

    @property
    def megapixels_per_s(self) -> float:
        return self.megapixels / self.seconds if self.seconds > 0 else 0.0

    @property
    def images_per_s(self) -> float:
        return self.done / self.seconds if self.seconds > 0 else 0.0

    def format(self, max_failures: int = 20) -> str:
        redone = f" ({self.redone} redone: their input or the settings changed)" if self.redone else ""
        lines = [
            f"{self.total} inputs: {self.done} done{redone}, {self.skipped} skipped, {self.failed} failed",
            f"{self.megapixels:.1f} MP in {self.seconds:.1f} s: {self.megapixels_per_s:.2f} MP/s, "
            f"{self.images_per_s:.2f} images/s",
            f"output: {self.output}  manifest: {self.manifest}",
        ]
        for key, reason in self.failures[:max_failures]:
            lines.append(f"  failed {printable(key)}: {printable(reason)}")
        if len(self.failures) > max_failures:
            lines.append(f"  ... and {len(self.failures) - max_failures} more (see the manifest)")
        if self.stopped:
            lines.append(f"stopped early: {self.stopped}")
            lines.append(f"{self.not_processed} inputs not processed; rerun the same command to resume")
        return "\n".join(lines)


def _model_path(config: DenoiseConfig) -> str:
    if config.model:
        return str(config.model)
    from pipeline.assets import default_model_path

    return str(default_model_path())


def _init_ray(config: DenoiseConfig) -> bool:
    """Connect to Ray as --address asks (`pipeline.runtime.ray_session.connect`, shared with training).

    Returns True when this call connected (and the job must shut Ray down).
    """
    from pipeline.runtime.ray_session import connect

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


def _fits_now(device: str, workers: int) -> int:
    """How many actors the cluster holds right now (before any autoscaling)."""
    import ray

    available = ray.cluster_resources()
    now = int(available.get("GPU", 0)) if device == "cuda" else max(1, int(available.get("CPU", 1)))
    return max(1, min(now, workers) if workers else now)


def _read_model(model_path: str) -> bytes:
    """The checkpoint's bytes, read once on the driver (a local path or a URI), after checking
    that they load; errors name --model. The actors get these bytes through Ray's object store,
    so no worker ever needs to see the path."""
    from n2n_core import CheckpointError, load_checkpoint
    from n2n_core.tensorfile import MAX_FILE_BYTES

    try:
        if not is_uri(model_path) or local_path(model_path) is not None:
            path = local_path(model_path)
            load_checkpoint(path, name=model_path)  # refuses FIFOs, folders and oversized files unread
            with open(path, "rb") as f:
                data = f.read()
        else:
            import pyarrow.fs as pafs

            from pipeline.storage.locations import resolve

            try:
                fs, path = resolve(model_path)
                info = fs.get_file_info(path)
            except (OSError, ValueError) as e:
                raise CheckpointError(model_path, f"cannot be reached: {e}") from None
            if info.type != pafs.FileType.File:
                raise CheckpointError(model_path, "no such file")
            if info.size is not None and info.size > MAX_FILE_BYTES:
                raise CheckpointError(model_path, f"{info.size} bytes is larger than the {MAX_FILE_BYTES} allowed")
            with fs.open_input_stream(path) as f:
                data = f.read()
        load_checkpoint(data, name=model_path)
    except CheckpointError as e:
        raise UsageError(f"--model {e}") from None
    except OSError as e:
        raise UsageError(f"--model {model_path!r}: {e.strerror or e}") from None
    return data


def _open_input(config: DenoiseConfig):
    from pipeline.data.datasets import open_dataset

    output = local_path(config.output)
    exclude = () if output is None else (output,)  # never list OUT as input
    try:
        dataset = open_dataset(config.input, image_column=config.image_column, key_column=config.key_column,
                               follow_symlinks=config.follow_symlinks, exclude=exclude)
    except (OSError, ValueError) as e:
        raise UsageError(f"IN {config.input!r}: {e}") from None
    if dataset.kind == "parquet":
        if dataset.problems:  # Ray Data's reader would stop on them mid-run: refuse up front
            raise UsageError(f"IN {config.input!r}: unreadable Parquet input: "
                             + "; ".join(f"{n}: {r}" for n, r in dataset.problems))
        check_parquet_schema(config.input, dataset.schema, config.key_column, config.image_column,
                             config.output_column)
    return dataset


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


@dataclass
class _Job:
    """One run's fixed parts, from the checks before the start to the actor pool."""

    config: DenoiseConfig
    model_path: str  # for messages; the actors get `model_bytes` through the object store
    model_bytes: bytes
    dataset: object  # ImageDataset (folder) or ParquetDataset
    output_kind: str  # "folder" or "parquet"
    run: str  # this run's id: its staging folder and manifest lines
    row_bytes: float  # Parquet input: mean row size, for Ray Data's block size
    out: object  # _LocalOutput or _RemoteOutput
    context: dict = field(default_factory=dict)  # every manifest line's "in" and "settings" (manifest.py)
    table_source: dict | None = None  # Parquet input: every row's "source" (the table's fingerprint)


def run_denoise(config: DenoiseConfig) -> DenoiseSummary:
    """Denoise every image of config.input into config.output; see the module docstring.

    Raises `UsageError` (nothing created or deleted) when the job cannot start as asked.
    """
    start = time.perf_counter()
    model_path, model_bytes, remote, local_output = _preflight(config)
    output_kind = "parquet" if config.output.split("?", 1)[0].rstrip("/").endswith(".parquet") else "folder"
    dataset = _open_input(config)
    keys = list(dataset.keys)
    null_rows = {i for i in range(len(keys)) if dataset.is_null_key(i)}
    row_bytes = dataset.mean_row_bytes() or 0.0  # Parquet input: for Ray Data's block size
    run = time.strftime("%Y%m%dT%H%M%S") + "-" + uuid.uuid4().hex[:8]
    context = {"in": input_identity(config.input), "settings": pixel_settings(config, model_bytes)}
    if remote:
        out = _RemoteOutput(remote, run, context)
    else:
        created = not os.path.lexists(local_output)
        out = _LocalOutput(make_output(local_output), run, config.output, created, context)
    job = _Job(config, model_path, model_bytes, dataset, output_kind, run, row_bytes, out, context,
               dataset.table_stamp())
    totals = _Counts()
    with out:
        plan, state, stopped = _plan(job, keys, null_rows)
        stopped = _execute(job, plan, state, totals, stopped)
        stopped = _merge_at_end(job, stopped)
    c = totals.counts
    return DenoiseSummary(
        total=len(keys), done=c[DONE], skipped=c[SKIPPED], failed=c[FAILED], megapixels=totals.megapixels,
        seconds=time.perf_counter() - start, output=out.where(), manifest=out.where(MANIFEST_NAME),
        failures=tuple(totals.failures), stopped=stopped, redone=plan.stale if plan is not None else 0,
    )


def input_identity(source: str) -> str:
    """The IN a manifest line records: its real path (links and `.` resolved), or for a URI its
    place (scheme, bucket and key prefix; no query). Two runs from one IN record the same."""
    local = local_path(source)
    if local is not None:
        return os.path.realpath(local)
    from pipeline.inference.remote import uri_location

    scheme, place = uri_location(source)
    return f"{scheme}://{place}"


def pixel_settings(config: DenoiseConfig, model_bytes: bytes) -> dict:
    """What changes an output's pixels: the model's bytes and the options that shape its output
    (device, batch size, workers and the rest change only how fast it comes). The precision is
    recorded when it is not float32, so the outputs of runs before the option stay finished."""
    settings = {"model": hashlib.sha256(model_bytes).hexdigest(), "tile": config.tile or None,
                "overlap": config.overlap, "self_ensemble": bool(config.self_ensemble),
                "strength": float(config.strength)}
    if config.precision != "float32":
        settings["precision"] = config.precision
    return settings



def read_manifest(manifest: str | os.PathLike) -> dict[str, dict]:
    """The latest record per input key of an OUT's manifest ({} if none): the main file, then
    the shards of runs not merged yet. `manifest`: the path of `OUT/_manifest.jsonl`, or its
    URI (file:// or an object store's, a query such as `?endpoint_override=...` kept)."""
    text = os.fspath(manifest)
    if is_remote(text):
        base, sep, query = text.partition("?")
        return read_remote_state(RemoteOut(base.rsplit("/", 1)[0] + sep + query)).latest
    return read_state(local_path(text)).latest

def _preflight(config: DenoiseConfig):
    """Every check that can refuse the job before anything is created: the model loads, IN
    exists, IN and OUT are apart, OUT is new, empty or n2n's. Returns (model path, its bytes,
    the RemoteOut of a URI OUT or None, the local OUT path or None)."""
    model_path = _model_path(config)
    check_input_exists(config.input)
    model_bytes = _read_model(model_path)
    check_separate(config.input, config.output)
    remote = RemoteOut(config.output) if is_remote(config.output) else None
    local_output = None if remote else local_path(config.output)
    if remote:
        check_remote_output(remote)
    else:
        check_output(local_output)
    if not config.overwrite:
        state = read_remote_state(remote) if remote else read_state(Path(local_output) / MANIFEST_NAME)
        check_same_input(config.input, config.output, input_identity(config.input), state.last_in)
    return model_path, model_bytes, remote, local_output


def _disk_full_while(what: str, error: OSError) -> str:
    if not is_disk_full(error):
        raise error
    return f"disk full while {what} ({error.strerror or error})"


def _plan(job: _Job, keys: list[str], null_rows: set[int]):
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


def _execute(job: _Job, plan, state, totals: _Counts, stopped: str) -> str:
    """Log the keys settled before the start, then run the actors over the rest (starting
    Ray only when there is work). Returns why the run stopped early ("" if it did not)."""
    config, out = job.config, job.out
    started_ray = False
    try:
        if plan is not None and plan.todo:
            started_ray = _init_ray(config)
            resources = _resources(config)
            out.create_staging()
            marker = _check_shared(out, resources[0])  # a refusal removes what this run created
        if plan is not None:
            try:
                if job.output_kind == "parquet" and (config.overwrite or plan.replace_parts):
                    out.remove_parts(state.outputs)  # n2n's own parts only: named by its manifest
                out.manifest.append(plan.early)
                totals.add(plan.early)
            except OSError as e:
                plan, stopped = None, _disk_full_while("preparing the manifest", e)
        if plan is not None and plan.todo:
            stopped = _process(job, plan, totals, resources, marker)
    finally:
        if started_ray:
            import ray

            ray.shutdown()
    return stopped


def _merge_at_end(job: _Job, stopped: str) -> str:
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


class _LocalOutput:
    """OUT as a local folder (or a shared mount): the manifest lock, staging folders, parts."""

    def __init__(self, root: Path, run: str, given: str, created: bool, context: dict | None = None):
        self.root, self.run, self.given, self.created = root, run, given, created
        self.remote = False
        self.manifest_path = root / MANIFEST_NAME
        had_manifest = os.path.lexists(self.manifest_path)
        try:
            self.manifest = ManifestWriter(self.manifest_path, run, context)
        except OutputBusyError:
            raise UsageError(f"OUT {given!r}: another n2n run is writing it; wait for it to end") from None
        except OSError as e:
            raise UsageError(f"OUT {given!r} is not writable: {e.strerror or e}") from None
        self.created_manifest = not had_manifest

    def where(self, name: str = "") -> str:
        return str(self.root / name) if name else str(self.root)

    def merge_staging(self) -> None:
        _merge_staging(self.root, self.manifest)

    def read_state(self):
        return read_state(self.manifest_path)

    def tree(self):
        return self.root

    def remove_parts(self, names) -> None:
        remove_parts(self.root, names)

    def create_staging(self) -> None:
        create_staging(self.root, self.run)

    def undo(self) -> None:
        """A refused start: remove what this run created (its staging folder; the manifest and
        OUT when this run made them and they are still empty)."""
        remove_staging(self.root, staging_dir(self.root, self.run))
        self.manifest.close()
        if self.created_manifest and self.manifest_path.stat().st_size == 0:
            self.manifest_path.unlink()
            if self.created:
                with contextlib.suppress(OSError):
                    self.root.rmdir()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.manifest.close()


class _RemoteOutput:
    """OUT on an object store (remote.py): no lock; staging fenced by its `_live` object."""

    def __init__(self, out: RemoteOut, run: str, context: dict | None = None):
        self.out, self.run = out, run
        self.remote = True
        self.manifest = RemoteManifestWriter(out, run, context)
        try:  # first of all, as locally: a killed first run leaves an OUT that says it is n2n's
            if out.info(MANIFEST_NAME).type == pafs.FileType.NotFound:
                out.put(MANIFEST_NAME, b"")
        except OSError as e:
            raise UsageError(f"OUT {out.where()!r} is not writable: {e}") from None

    def where(self, name: str = "") -> str:
        return self.out.where(name)

    def merge_staging(self) -> None:
        self.manifest.merge_all()

    def read_state(self):
        return read_remote_state(self.out)

    def tree(self):
        return RemoteTree(self.out)

    def remove_parts(self, names) -> None:
        for name in sorted(names):
            if PART_NAME.fullmatch(name):
                self.out.delete(name)

    def create_staging(self) -> None:
        create_live(self.out, self.run)

    def undo(self) -> None:
        self.manifest.merge_all()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        pass


def _merge_staging(root: Path, manifest: ManifestWriter) -> None:
    """Fence off every staging folder under OUT, merge its shards into the main manifest,
    then delete it (not before: a failed merge leaves it for the next run)."""
    for folder in fence_staging(root):
        manifest.merge_staging(folder)
        remove_staging(root, folder)
    remove_staging(root)


def _check_shared(out, device: str) -> str:
    """A local OUT with actors possibly on other nodes: the marker check of shared_storage.py.
    Returns the marker's token ("" when no check is needed); a node that does not see OUT
    makes the job refuse (UsageError) after removing what this run created."""
    if out.remote:
        return ""
    from pipeline.inference.shared_storage import NotSharedError, check_nodes, needs_check, write_marker

    if not needs_check(device):
        return ""
    try:
        token = write_marker(str(out.root), out.run)
        check_nodes(str(out.root), out.run, token, device)
    except NotSharedError as e:
        out.undo()
        raise UsageError(str(e).replace(repr(str(out.root)), repr(out.given), 1)) from None
    return token


def _process(job: _Job, plan, totals: _Counts, resources, marker: str) -> str:
    """Run the actors over plan.todo; returns why the run stopped early ("" if it did not)."""
    compare = _compare_sample([k for _, k in plan.todo], job.config.compare)
    try:
        with contextlib.closing(_stream(job, plan, compare, resources, marker)) as stream:
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


def _compare_sample(keys: list[str], count: int) -> frozenset:
    if count <= 0 or not keys:
        return frozenset()
    count = min(count, len(keys))
    return frozenset(keys[i * len(keys) // count] for i in range(count))


def _pool_size(config: DenoiseConfig, device: str, fits_now: int) -> dict:
    """The actor pool: `ActorPoolStrategy(min_size, max_size, initial_size)` arguments.

    Ray Data grows an autoscaling pool while inputs wait and the cluster has room (asking the
    cluster autoscaler for more), and shrinks it when idle. It starts with the actors that fit
    now (`initial_size`, at most the maximum) and never goes below one. The maximum is
    `--workers` when given; otherwise, on GPUs, unbounded: each actor claims a whole GPU, so
    the pool is as large as the GPUs the cluster has or the autoscaler adds. On CPUs without
    `--workers` the maximum is the actors that fit now: a CPU actor claims only part of its
    cores (see `_resources`), so an unbounded pool would oversubscribe them.
    """
    if config.workers:
        maximum = config.workers
    elif device == "cuda":
        maximum = None
    else:
        maximum = fits_now
    initial = max(1, fits_now if maximum is None else min(fits_now, maximum))
    return {"min_size": 1, "max_size": maximum, "initial_size": initial}


def _stream(job: _Job, plan, compare: frozenset, resources, marker: str):
    """Yield lists of manifest entries as the actor pool finishes batches."""
    import ray
    from tqdm import tqdm

    config, dataset, out, output_kind, run = job.config, job.dataset, job.out, job.output_kind, job.run

    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False
    device, workers, threads, remote_args = resources
    fits_now = _fits_now(device, workers)
    batch_size = config.batch_size
    todo = plan.todo
    input_kind = dataset.kind
    model_ref = ray.put(job.model_bytes)  # once; every actor reads it from the object store
    worker_plan = WorkerPlan(
        model_path=job.model_path, device=device, threads=threads, tile=config.tile or None, overlap=config.overlap,
        self_ensemble=config.self_ensemble, strength=float(config.strength), precision=config.precision,
        max_pixels=config.max_pixels, input_kind=input_kind, output_kind=output_kind,
        output_root=out.out.uri if out.remote else os.path.abspath(out.root), run=run,
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
            compute=ray.data.ActorPoolStrategy(**_pool_size(config, device, fits_now)), **remote_args,
        )
        with tqdm(total=len(todo), unit="img", disable=not config.progress, desc="denoise") as bar:
            for batch in data.iter_batches(batch_size=None, batch_format="pyarrow"):
                entries = table_entries(batch)
                bar.update(len(entries))
                yield entries
    finally:
        context.target_max_block_size = block_limit
