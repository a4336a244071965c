"""The denoising actor: loads the checkpoint once, then reads, decodes, denoises,
encodes and writes each image of the batches it is given.

`DenoiseWorker` is the callable class handed to Ray Data's `map_batches` (one actor per
GPU, or CPU actors sharing the cores). It takes a pyarrow batch (folder input: rows of
`index`, `key`; Parquet input: the table's own rows) and returns a pyarrow table of
manifest entries, one per input row it handled. Nothing an image does can stop the
batch: every error becomes a "failed" entry with its reason.
"""
from __future__ import annotations

import socket
import time
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import torch

from pipeline.cuda import cuda_problem, logical_gpus_allowed
from pipeline.inference.compare import compare_name, compare_png
from pipeline.inference.manifest import DONE, FAILED, Entry
from pipeline.inference.outputs import (
    COMPARE_NAME, open_staging, safe_relative_path, write_atomic, write_part_atomic,
)
from pipeline.inference.tiling import denoise_image

ENTRY_SCHEMA = pa.schema([
    ("key", pa.string()), ("status", pa.string()), ("reason", pa.string()),
    ("output", pa.string()), ("megapixels", pa.float64()), ("seconds", pa.float64()),
])


@dataclass(frozen=True)
class WorkerPlan:
    """What every actor needs to know, fixed for the whole run."""

    model_path: str
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
    exclude_keys: frozenset = frozenset()  # Parquet input: rows already finished or refused
    self_ensemble: bool = False  # average over the 8 flips and rotations of each tile


def entries_table(entries: list[Entry]) -> pa.Table:
    return pa.Table.from_pylist(
        [dict(key=e.key, status=e.status, reason=e.reason, output=e.output,
              megapixels=e.megapixels, seconds=e.seconds) for e in entries],
        schema=ENTRY_SCHEMA,
    )


def table_entries(table: pa.Table) -> list[Entry]:
    return [Entry(**row) for row in table.to_pylist()]


def _actor_device(device: str) -> str:
    """`device`, checked: a "cuda" actor whose CUDA is not usable is an error (pipeline.cuda)."""
    if device != "cuda":
        return device
    problem = cuda_problem()
    if problem is None:
        return device
    if logical_gpus_allowed():
        return "cpu"
    raise RuntimeError(f"this denoise actor holds a Ray GPU on host {socket.gethostname()} but CUDA is not "
                       f"usable there: {problem}")


class DenoiseWorker:
    """Ray Data actor: `DenoiseWorker(plan, dataset)(batch) -> manifest entries table`.

    `dataset` is the folder's `ImageDataset` (read by index inside the actor) or None
    for Parquet input, whose rows carry the encoded image bytes.
    """

    def __init__(self, plan: WorkerPlan, dataset=None):
        from n2n_core import load_checkpoint  # imported in the actor process

        torch.set_num_threads(max(1, plan.threads))
        self.plan = plan
        self.dataset = dataset
        self.model = load_checkpoint(plan.model_path, map_location=_actor_device(plan.device)).model
        self.model.eval()
        self.root = Path(plan.output_root)
        self.staging = open_staging(self.root, plan.run)

    def __call__(self, batch: pa.Table) -> pa.Table:
        if self.plan.input_kind == "folder":
            keys = batch.column("key").to_pylist()
            indices = batch.column("index").to_pylist()
            sources = [(key, lambda i=i: self.dataset.read(i)) for key, i in zip(keys, indices)]
            rows = None
        else:
            if self.plan.exclude_keys:
                column = batch.column(self.plan.key_column)
                excluded = pa.array(sorted(self.plan.exclude_keys), pa.string()).cast(column.type)
                keep = pc.invert(pc.is_in(column, value_set=excluded))
                batch = batch.filter(keep)
            keys = [str(k) for k in batch.column(self.plan.key_column).to_pylist()]
            images = batch.column(self.plan.image_column)
            sources = [(key, lambda i=i: images[i].as_py()) for i, key in enumerate(keys)]
            rows = batch
        entries, encoded = [], []
        for key, read in sources:
            entry, data = self._one(key, read)
            entries.append(entry)
            encoded.append(data)
        if self.plan.output_kind == "parquet":
            entries = self._write_part(keys, rows, entries, encoded)
        return entries_table(entries)

    def _one(self, key: str, read) -> tuple[Entry, bytes | None]:
        """Process one input; returns its entry and (Parquet output) its encoded bytes."""
        from pipeline.images import decode_image, encode_image

        start = time.perf_counter()
        try:
            target = safe_relative_path(key) if self.plan.output_kind == "folder" else ""
            data = read()
            if data is None:
                raise ValueError("no image bytes (null)")
            decoded = decode_image(data, key, max_pixels=self.plan.max_pixels)
            pixels = decoded.pixels
            height, width = pixels.shape[1:]
            compare = key in self.plan.compare_keys
            # In place unless the input is still needed for the strip: one image less in memory.
            out = denoise_image(self.model, pixels, tile=self.plan.tile, overlap=self.plan.overlap,
                                inplace=not compare and pixels.dtype == torch.float32,
                                self_ensemble=self.plan.self_ensemble)
            encoded = encode_image(decoded, out)
            if compare:
                write_atomic(self.root / COMPARE_NAME / compare_name(key), compare_png(pixels, out), self.staging)
            if target:
                write_atomic(self.root / target, encoded, self.staging)
                encoded = None
            megapixels = height * width / 1e6
            return Entry(key, DONE, "", target, megapixels, time.perf_counter() - start), encoded
        except Exception as error:  # one bad image never stops the batch
            reason = str(error) or type(error).__name__
            if type(error).__name__ not in reason:
                reason = f"{type(error).__name__}: {reason}"
            return Entry(key, FAILED, reason, "", 0.0, time.perf_counter() - start), None

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
        try:
            part = write_part_atomic(self.root, table, self.staging)
        except Exception as error:
            reason = f"writing the Parquet part failed: {type(error).__name__}: {error}"
            return [Entry(e.key, FAILED, reason, "", 0.0, e.seconds) if e.status == DONE else e for e in entries]
        return [Entry(e.key, e.status, e.reason, part, e.megapixels, e.seconds) if e.status == DONE else e
                for e in entries]
