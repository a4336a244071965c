"""The denoising actor: loads the checkpoint once, then reads, decodes, denoises,
encodes and writes each image of the batches it is given.

`DenoiseWorker` is the callable class handed to Ray Data's `map_batches` (one actor per
GPU, or CPU actors sharing the cores). It takes a pyarrow batch (folder input: rows of
`index`, `key`; Parquet input: the table's own rows) and returns a pyarrow table of
manifest entries, one per input row it handled. Nothing an image does can stop the
batch: every error becomes a "failed" entry with its reason. A full disk is the one
error that asks the driver to stop (`stop`): every later write would fail too.

Within a call three stages overlap, each on its own thread: reading and decoding (a
`LookAhead`, at most one forward's worth of pixels ahead), the model (this thread: every
image decoded by then goes into `denoise_images`, whole images of one padded size in one
forward, the tiles of a large one batched), and encoding and writing (one thread, in
order). The model runs in `plan.precision`; how many pixels one forward may take comes
from the device's free memory (`memory.py`), and an out-of-memory error halves it for the
rest of the actor's life (the image is retried with half the tile, tiling.py).

Each actor appends its entries to its own manifest shard (manifest.py): an output's
line goes in right before the output is renamed into place, so the manifest keeps up
with the outputs even when the job is killed.
"""
from __future__ import annotations

import dataclasses
import errno
import hashlib
import io
import json
import logging
import socket
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import torch

from n2n_core.workspace import Workspace
from pipeline.runtime.cuda import cuda_problem, logical_gpus_allowed
from pipeline.data.records import key_text
from pipeline.inference.compare import compare_name, compare_png
from pipeline.inference.manifest import DONE, FAILED, Entry, ShardWriter
from pipeline.inference.outputs import (
    COMPARE_NAME, PART_PREFIX, FileRecord, is_disk_full, open_staging, safe_relative_path, write_file, write_part,
)
from pipeline.inference.memory import ForwardCost, forward_budget
from pipeline.inference.prefetch import LookAhead
from pipeline.inference.tiling import PRECISIONS, denoise_images
from pipeline.storage.names import from_wire, to_wire, utf8_problem

log = logging.getLogger(__name__)

# key, reason and output travel as bytes (`pipeline.storage.names.to_wire`): a file name that is not
# UTF-8 cannot be an Arrow string, and must come back to the driver exactly as listed
ENTRY_SCHEMA = pa.schema([
    ("key", pa.binary()), ("status", pa.string()), ("reason", pa.binary()),
    ("output", pa.binary()), ("megapixels", pa.float64()), ("seconds", pa.float64()),
    ("size", pa.int64()), ("mtime_ns", pa.int64()), ("sha256", pa.string()), ("stop", pa.bool_()),
    ("source", pa.string()),
])


@dataclass(frozen=True)
class WorkerPlan:
    """What every actor needs to know, fixed for the whole run."""

    model_path: str  # names the model in messages; the actors get its bytes, never this path
    device: str  # "cpu" or "cuda"
    threads: int  # torch intra-op threads of this actor
    tile: int | None
    overlap: int
    max_pixels: int
    input_kind: str  # "folder" or "parquet"
    output_kind: str  # "folder" or "parquet"
    output_root: str
    run: str
    image_column: str = "image"
    key_column: str = "path"
    output_column: str = "denoised"
    compare_keys: frozenset = frozenset()
    exclude_keys: frozenset = frozenset()  # Parquet input: rows already finished or refused (null keys always are)
    self_ensemble: bool = False  # average over the 8 flips and rotations of each tile
    strength: float = 1.0  # correction applied: noisy + strength (denoised - noisy)
    shared_marker: str = ""  # local OUT on several nodes: the token of the driver's marker (shared_storage.py)
    line_context: dict = dataclasses.field(default_factory=dict)  # every manifest line's "in" and "settings"
    table_source: dict | None = None  # Parquet IN: the "source" of every row (the table's fingerprint)
    precision: str = "float32"  # the model's dtype: float32, bfloat16 or float16
    forward_bytes: int | None = None  # memory one forward may use; None: the device's (memory.forward_budget);
    # 0: no limit, one image or tile per forward (the actor before batching: for comparisons)


def entries_table(entries: list[Entry]) -> pa.Table:
    rows = []
    for e in entries:
        file = e.file or FileRecord(0, 0, "")
        rows.append(dict(key=to_wire(e.key), status=e.status, reason=to_wire(e.reason), output=to_wire(e.output),
                         megapixels=e.megapixels, seconds=e.seconds, size=file.size, mtime_ns=file.mtime_ns,
                         sha256=file.sha256, stop=e.stop, source=json.dumps(e.source) if e.source else ""))
    return pa.Table.from_pylist(rows, schema=ENTRY_SCHEMA)


def table_entries(table: pa.Table) -> list[Entry]:
    entries = []
    for row in table.to_pylist():
        size, mtime_ns, sha256 = row.pop("size"), row.pop("mtime_ns"), row.pop("sha256")
        source = row.pop("source", "")
        for name in ("key", "reason", "output"):
            row[name] = from_wire(row[name])
        entries.append(Entry(**row, file=FileRecord(size, mtime_ns, sha256) if sha256 else None,
                             source=json.loads(source) if source else None))
    return entries


def _failure(key: str, error: BaseException, seconds: float) -> Entry:
    reason = str(error) or type(error).__name__
    if type(error).__name__ not in reason:
        reason = f"{type(error).__name__}: {reason}"
    if is_disk_full(error):
        reason = f"disk full: {reason}"
    return Entry(key, FAILED, reason, "", 0.0, seconds, stop=is_disk_full(error))


def _actor_device(device: str) -> str:
    """`device`, checked: a "cuda" actor whose CUDA is not usable is an error (pipeline.runtime.cuda)."""
    if device != "cuda":
        return device
    problem = cuda_problem()
    if problem is None:
        return device
    if logical_gpus_allowed():
        return "cpu"
    raise RuntimeError(f"this denoise actor holds a Ray GPU on host {socket.gethostname()} but CUDA is not "
                       f"usable there: {problem}")


class _LocalSink:
    """Outputs under a local (or shared-mount) OUT: staged, line appended, renamed (outputs.py)."""

    def __init__(self, plan: WorkerPlan):
        self.root = Path(plan.output_root)
        self.staging = open_staging(self.root, plan.run)
        self.shard = ShardWriter(self.staging, uuid.uuid4().hex[:12], plan.run, context=plan.line_context)

    def write_output(self, target: str, data: bytes, before_publish) -> FileRecord:
        return write_file(self.root, target, data, self.staging, before_publish=before_publish)

    def write_part(self, table: pa.Table, before_publish) -> tuple[str, FileRecord]:
        return write_part(self.root, table, self.staging, before_publish=before_publish)

    def write_strip(self, name: str, data: bytes) -> None:
        write_file(self.root, f"{COMPARE_NAME}/{name}", data, self.staging)


class _RemoteSink:
    """Outputs under an OUT on an object store (remote.py): line in a shard object, fence
    checked, object uploaded whole; returns the record with the store's modification time."""

    def __init__(self, plan: WorkerPlan):
        from pipeline.inference.remote import RemoteOut, RemoteShardWriter, check_live, staging_prefix

        self.out = RemoteOut(plan.output_root)
        self.run = plan.run
        self.staging = staging_prefix(plan.run)
        self._check_live = check_live
        check_live(self.out, plan.run)
        self.shard = RemoteShardWriter(self.out, plan.run, uuid.uuid4().hex[:12], context=plan.line_context)

    def _publish(self, name: str, data: bytes) -> FileRecord:
        self._check_live(self.out, self.run)
        self.out.put(name, data, self.staging)
        return self.out.record(name, data)

    def write_output(self, target: str, data: bytes, before_publish) -> FileRecord:
        before_publish(FileRecord(len(data), 0, hashlib.sha256(data).hexdigest()))
        return self._publish(target, data)

    def write_part(self, table: pa.Table, before_publish) -> tuple[str, FileRecord]:
        buffer = io.BytesIO()
        pq.write_table(table, buffer)
        data = buffer.getvalue()
        name = f"{PART_PREFIX}{uuid.uuid4().hex}.parquet"
        before_publish(name, FileRecord(len(data), 0, hashlib.sha256(data).hexdigest()))
        return name, self._publish(name, data)

    def write_strip(self, name: str, data: bytes) -> None:
        self._check_live(self.out, self.run)
        self.out.put(f"{COMPARE_NAME}/{name}", data, self.staging)


def _load_model(plan: WorkerPlan, model, device: str):
    """The network, from the checkpoint bytes the driver put in Ray's object store (`model`:
    the bytes, or a one-element list holding their ObjectRef); None: read plan.model_path
    (tests that build an actor in their own process)."""
    from n2n_core import load_checkpoint

    if model is None:
        return load_checkpoint(plan.model_path, map_location=device).model
    if isinstance(model, list):
        import ray

        model = ray.get(model[0])
    return load_checkpoint(model, map_location=device, name=plan.model_path).model


class DenoiseWorker:
    """Ray Data actor: `DenoiseWorker(plan, dataset, model)(batch) -> manifest entries table`.

    `dataset` is the folder's `ImageDataset` (read by index inside the actor) or None
    for Parquet input, whose rows carry the encoded image bytes. `model`: see `_load_model`.
    """

    def __init__(self, plan: WorkerPlan, dataset=None, model=None):
        from pipeline.storage.locations import is_remote

        torch.set_num_threads(max(1, plan.threads))
        self.plan = plan
        self.dataset = dataset
        if plan.shared_marker:  # before anything else: an OUT this node does not see is never written
            from pipeline.inference.shared_storage import check_marker

            check_marker(plan.output_root, plan.run, plan.shared_marker)
        device = _actor_device(plan.device)
        self.model = _load_model(plan, model, device).to(dtype=PRECISIONS[plan.precision])
        self.model.eval()
        self.workspace = Workspace()  # the forwards' large buffers, kept for the actor's life (n2n_core/workspace.py)
        # padded pixels one forward may take: the budget over what a forward needs per pixel
        self.forward_pixels = None
        if plan.forward_bytes != 0:
            cost = ForwardCost.measure(self.model, self_ensemble=plan.self_ensemble)
            self.forward_pixels = cost.pixels(plan.forward_bytes or forward_budget(device))
        self.remote = is_remote(plan.output_root)
        self.sink = _RemoteSink(plan) if self.remote else _LocalSink(plan)
        self.shard = self.sink.shard
        self.confirmed: list[Entry] = []  # remote OUT: done lines with the uploaded object's record
        self.full = False  # the disk filled up: fail the rest of what this actor is given at once

    def __call__(self, batch: pa.Table) -> pa.Table:
        if self.plan.input_kind == "folder":  # the keys from the dataset itself: any bytes a name holds
            indices = batch.column("index").to_pylist()
            keys = [self.dataset.key(i) for i in indices]
            sources = [(key, lambda i=i: self.dataset.read_stamped(i)) for key, i in zip(keys, indices)]
            rows = None
        else:
            values = batch.column(self.plan.key_column).to_pylist()
            keep = [v is not None and key_text(v) not in self.plan.exclude_keys for v in values]
            if not all(keep):
                batch = batch.filter(pa.array(keep))
            keys = [key_text(v) for v in batch.column(self.plan.key_column).to_pylist()]
            images = batch.column(self.plan.image_column)
            sources = [(key, lambda i=i: (images[i].as_py(), self.plan.table_source)) for i, key in enumerate(keys)]
            rows = batch
        entries, encoded = self._process(sources)
        if self.plan.output_kind == "parquet":
            entries = self._write_part(keys, rows, entries, encoded)
        try:  # done entries were logged as their outputs landed; the failures now (and on an object
            # store the done lines again, with the uploaded objects' modification times)
            self.shard.append([e for e in entries if e.status != DONE] + self.confirmed)
            self.confirmed = []
        except OSError as error:  # the driver still counts them; a rerun retries them
            self.full = self.full or is_disk_full(error)
        if self.full:
            entries = [dataclasses.replace(e, stop=True) if e.status == FAILED else e for e in entries]
        return entries_table(entries)

    def _log_done(self, entries: list[Entry]) -> None:
        """Append outputs' done lines (called before their rename); a failure stops the rename."""
        try:
            self.shard.append(entries)
        except OSError as error:
            self.full = self.full or is_disk_full(error)
            raise

    def _process(self, sources) -> tuple[list[Entry], list[bytes | None]]:
        """Each (key, read) of `sources` through the three stages; returns, in the same order, every
        input's entry and (Parquet output) its encoded bytes."""
        results: list = [None] * len(sources)
        writes = []
        pixels = lambda loaded: loaded.decoded.pixels[0].numel() if isinstance(loaded, _Loaded) else 0
        with LookAhead(enumerate(sources), self._load, pixels, self.forward_pixels or 1) as ahead, \
                ThreadPoolExecutor(1, thread_name_prefix="n2n-write") as writer:
            while not ahead.done:
                group = ahead.take()  # every input decoded by now, at least one
                images = [item for item in group if isinstance(item, _Loaded)]
                for item in group:
                    if not isinstance(item, _Loaded):
                        results[item[0]] = item[1]
                outputs = self._denoise(images)
                for item, out in zip(images, outputs):
                    if isinstance(out, BaseException):
                        results[item.index] = (_failure(item.key, out, time.perf_counter() - item.start), None)
                    else:
                        writes.append((item.index, writer.submit(self._finish, item, out)))
            for index, future in writes:
                results[index] = future.result()
        return [r[0] for r in results], [r[1] for r in results]

    def _load(self, numbered) -> "_Loaded | tuple[int, tuple[Entry, None]]":
        """Read and decode one input (on the look-ahead thread); a failure is (index, (entry, None))."""
        from pipeline.data.images import decode_image

        index, (key, read) = numbered
        start = time.perf_counter()
        try:
            if self.full:
                raise OSError(errno.ENOSPC, "No space left on device (an earlier write of this actor found the disk full)")
            target = safe_relative_path(key) if self.plan.output_kind == "folder" else ""
            if self.plan.output_kind == "parquet" and utf8_problem(key):
                raise ValueError(utf8_problem(key))
            data, source = read()
            if data is None:
                raise ValueError("no image bytes (null)")
            decoded = decode_image(data, key, max_pixels=self.plan.max_pixels)
            return _Loaded(index, key, target, decoded, source, start, key in self.plan.compare_keys)
        except Exception as error:  # one bad image never stops the batch
            self.full = self.full or is_disk_full(error)
            return index, (_failure(key, error, time.perf_counter() - start), None)

    def _denoise(self, images: list["_Loaded"]) -> list:
        """The model on every decoded image (this thread), several per forward where they fit: each
        image's output, or the exception that stopped it."""
        if not images:
            return []

        def out_of_memory(pixels: int, message: str) -> None:
            log.warning("n2n denoise: out of memory (%s); one forward now takes at most %d pixels, and the image "
                        "goes on with smaller tiles", message, pixels)
            self.forward_pixels = pixels

        # In place unless the input is still needed for the strip: one image less in memory.
        inplace = [not item.compare and item.decoded.pixels.dtype == torch.float32 for item in images]
        try:
            with self.workspace:
                return self._denoise_images(images, inplace, out_of_memory)
        except Exception as error:  # noqa: BLE001 - denoise_images returns errors per image; this is a bug's
            return [error] * len(images)

    def _denoise_images(self, images, inplace, out_of_memory) -> list:
        return denoise_images(self.model, [item.decoded.pixels for item in images], tile=self.plan.tile,
                              overlap=self.plan.overlap, inplace=inplace, self_ensemble=self.plan.self_ensemble,
                              strength=self.plan.strength, forward_pixels=self.forward_pixels,
                              on_out_of_memory=out_of_memory)

    def _finish(self, item: "_Loaded", out: torch.Tensor) -> tuple[Entry, bytes | None]:
        """Encode and write one output (on the writer thread); returns its entry and (Parquet output)
        its encoded bytes."""
        from pipeline.data.images import encode_image

        key, start = item.key, item.start
        try:
            if self.full:
                raise OSError(errno.ENOSPC, "No space left on device (an earlier write of this actor found the disk full)")
            height, width = out.shape[1:]
            encoded = encode_image(item.decoded, out)
            if item.compare:
                self.sink.write_strip(compare_name(key), compare_png(item.decoded.pixels, out))
            megapixels = height * width / 1e6
            if not item.target:
                return Entry(key, DONE, "", "", megapixels, time.perf_counter() - start, source=item.source), encoded
            entry = Entry(key, DONE, "", item.target, megapixels, 0.0, source=item.source)

            def log_done(record: FileRecord) -> None:
                nonlocal entry
                entry = dataclasses.replace(entry, file=record, seconds=time.perf_counter() - start)
                self._log_done([entry])

            record = self.sink.write_output(item.target, encoded, before_publish=log_done)
            if record != entry.file:  # an object store: the record now has the object's time
                entry = dataclasses.replace(entry, file=record)
                self.confirmed.append(entry)
            return entry, None
        except Exception as error:  # one bad image never stops the batch
            self.full = self.full or is_disk_full(error)
            return _failure(key, error, time.perf_counter() - start), None

    def _write_part(self, keys, rows, entries, encoded) -> list[Entry]:
        """Write the batch's finished rows as one Parquet part; entries get its name."""
        done = [e.status == DONE for e in entries]
        if not any(done):
            return entries
        column = pa.array([d for d, ok in zip(encoded, done) if ok], pa.large_binary())
        if rows is None:  # folder input: the key and the denoised image
            table = pa.table({self.plan.key_column: [k for k, ok in zip(keys, done) if ok]})
        else:  # Parquet input: its own columns, untouched
            table = rows.filter(pa.array(done))
        table = table.append_column(self.plan.output_column, column)
        finished = entries

        def log(name: str, record: FileRecord) -> None:
            nonlocal finished
            finished = [dataclasses.replace(e, output=name, file=record) if e.status == DONE else e for e in entries]
            self._log_done([e for e in finished if e.status == DONE])

        try:
            _, record = self.sink.write_part(table, before_publish=log)
        except Exception as error:
            self.full = self.full or is_disk_full(error)
            failure = _failure("", error, 0.0)
            reason = f"writing the Parquet part failed: {failure.reason}"
            return [dataclasses.replace(e, status=FAILED, reason=reason, output="", megapixels=0.0, stop=failure.stop)
                    if e.status == DONE else e for e in entries]
        if self.remote:  # the done lines again, with the uploaded part's modification time
            finished = [dataclasses.replace(e, file=record) if e.status == DONE else e for e in finished]
            self.confirmed += [e for e in finished if e.status == DONE]
        return finished


@dataclass
class _Loaded:
    """One decoded input on its way through the actor: its place in the call, key, output path
    (folder output), decoded image, source record, start time and whether it gets a strip."""

    index: int
    key: str
    target: str
    decoded: object  # pipeline.data.images.DecodedImage
    source: dict | None
    start: float
    compare: bool
