"""A safetensors-compatible file of named tensors plus string metadata; no pickle.

Layout (the safetensors format, readable by `safetensors.torch.load_file`):
    8 bytes      little-endian unsigned header length N
    N bytes      UTF-8 JSON header, padded with spaces to a multiple of 8:
                 {"__metadata__": {str: str}, name: {"dtype": "F32", "shape": [..],
                  "data_offsets": [begin, end]}, ...}
    the rest     raw little-endian tensor bytes, tensors back to back, offsets
                 relative to the start of this section
On top of the format, the metadata holds "n2n_sha256": a SHA-256 of the header
(canonical JSON, without this field) and of the data, so a flipped byte anywhere is
caught, not just a broken structure.

`write_tensor_file` writes to a temporary name in the same directory, flushes and
fsyncs, then renames (`os.replace`), so a reader never sees half a file.
`read_tensor_file` validates everything and raises `CheckpointError` naming the file.
"""
from __future__ import annotations

import hashlib
import json
import os
import struct
import sys
import tempfile
from math import prod

import torch
from torch import Tensor

CHECKSUM_KEY = "n2n_sha256"
MAX_HEADER_BYTES = 100 * 1024 * 1024

DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U8": torch.uint8, "BOOL": torch.bool,
}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}


class CheckpointError(Exception):
    """A checkpoint (or tensor file) that cannot be read or is corrupt; names the file."""

    def __init__(self, path, reason: str):
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")


def _require_little_endian() -> None:
    if sys.byteorder != "little":
        raise RuntimeError("n2n tensor files are little-endian; big-endian hosts are not supported")


def _tensor_bytes(t: Tensor) -> bytes:
    flat = t.detach().to("cpu").contiguous().reshape(-1)
    if flat.numel() == 0:
        return b""
    return flat.view(torch.uint8).numpy().tobytes()  # raw bytes of any dtype, via uint8


def _checksum(header: dict, data) -> str:
    canonical = json.dumps(header, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    h = hashlib.sha256(canonical.encode("utf-8"))
    h.update(data)
    return h.hexdigest()


def write_tensor_file(path, tensors: dict[str, Tensor], metadata: dict[str, str]) -> None:
    """Write `tensors` and `metadata` (str -> str) atomically to `path`."""
    _require_little_endian()
    for key, value in metadata.items():
        if not isinstance(key, str) or not isinstance(value, str):
            raise TypeError(f"metadata must map str to str; {key!r} -> {type(value).__name__}")
    if CHECKSUM_KEY in metadata:
        raise ValueError(f"metadata key {CHECKSUM_KEY!r} is reserved")
    header: dict = {}
    chunks = []
    offset = 0
    for name, t in tensors.items():
        if not isinstance(name, str) or not name or name == "__metadata__":
            raise ValueError(f"invalid tensor name {name!r}")
        if not isinstance(t, Tensor):
            raise TypeError(f"tensor {name!r} is a {type(t).__name__}")
        if t.dtype not in DTYPE_NAMES:
            raise TypeError(f"tensor {name!r} has unsupported dtype {t.dtype}")
        raw = _tensor_bytes(t)
        header[name] = {"dtype": DTYPE_NAMES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + len(raw)]}
        chunks.append(raw)
        offset += len(raw)
    data = b"".join(chunks)
    header["__metadata__"] = dict(metadata)
    header["__metadata__"][CHECKSUM_KEY] = _checksum(header, data)
    text = json.dumps(header, ensure_ascii=True, separators=(",", ":")).encode("utf-8")
    text += b" " * (-len(text) % 8)

    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".part", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(struct.pack("<Q", len(text)))
            f.write(text)
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; a checkpoint is an ordinary file
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def read_tensor_file(path) -> tuple[dict[str, Tensor], dict[str, str]]:
    """Read and validate a tensor file; returns (tensors on CPU, metadata without the checksum)."""
    _require_little_endian()
    try:
        with open(path, "rb") as f:
            blob = f.read()
    except OSError as e:
        raise CheckpointError(path, f"cannot read file ({e.strerror or e})") from e
    if len(blob) < 8:
        raise CheckpointError(path, f"truncated or not a checkpoint: {len(blob)} bytes, need at least 8")
    (n,) = struct.unpack("<Q", blob[:8])
    if n < 2 or n > MAX_HEADER_BYTES or 8 + n > len(blob):
        raise CheckpointError(path, f"header length {n} does not fit a file of {len(blob)} bytes (truncated or not a checkpoint)")
    try:
        header = json.loads(blob[8 : 8 + n].decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        raise CheckpointError(path, f"header is not valid UTF-8 JSON ({e})") from None
    if not isinstance(header, dict):
        raise CheckpointError(path, "header is not a JSON object")
    metadata = header.get("__metadata__")
    if not isinstance(metadata, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
        raise CheckpointError(path, "header has no '__metadata__' object of strings")
    data = memoryview(blob)[8 + n :]

    spans = []
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        if not isinstance(entry, dict) or set(entry) != {"dtype", "shape", "data_offsets"}:
            raise CheckpointError(path, f"tensor {name!r}: entry must have exactly dtype, shape, data_offsets")
        dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
        if dtype not in DTYPES:
            raise CheckpointError(path, f"tensor {name!r}: unknown dtype {dtype!r}")
        if not isinstance(shape, list) or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in shape):
            raise CheckpointError(path, f"tensor {name!r}: invalid shape {shape!r}")
        if (not isinstance(offsets, list) or len(offsets) != 2
                or not all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)
                or not 0 <= offsets[0] <= offsets[1]):
            raise CheckpointError(path, f"tensor {name!r}: invalid data_offsets {offsets!r}")
        expected = prod(shape) * torch.empty((), dtype=DTYPES[dtype]).element_size()
        if offsets[1] - offsets[0] != expected:
            raise CheckpointError(
                path, f"tensor {name!r}: {offsets[1] - offsets[0]} bytes for shape {shape} of {dtype} (expected {expected})"
            )
        spans.append((offsets[0], offsets[1], name))
    spans.sort()
    end = 0
    for begin, stop, name in spans:
        if begin != end:
            raise CheckpointError(path, f"tensor {name!r}: data does not start where the previous tensor ends ({begin} != {end})")
        end = stop
    if end != len(data):
        raise CheckpointError(
            path, f"data section is {len(data)} bytes but the header describes {end} (truncated or trailing bytes)"
        )
    stored = metadata.pop(CHECKSUM_KEY, None)
    if stored is None:
        raise CheckpointError(path, f"metadata has no {CHECKSUM_KEY!r} checksum")
    if _checksum(header, data) != stored:
        raise CheckpointError(path, "checksum mismatch: the file is corrupt")

    tensors = {}
    for begin, stop, name in spans:
        entry = header[name]
        dtype = DTYPES[entry["dtype"]]
        if stop == begin:
            tensors[name] = torch.empty(entry["shape"], dtype=dtype)
        else:
            raw = torch.frombuffer(bytearray(data[begin:stop]), dtype=torch.uint8)
            tensors[name] = raw.view(dtype).reshape(entry["shape"])
    return tensors, metadata
