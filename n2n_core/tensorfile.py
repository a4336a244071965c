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
It reads a path or the file's bytes (a model shipped through an object store), and an
untrusted file costs bounded memory: only regular files are read (never `/dev/zero`,
a FIFO or a directory), at most `max_bytes` of them (`MAX_FILE_BYTES` by default),
and the JSON header is at most `MAX_HEADER_BYTES`.
"""
from __future__ import annotations

import hashlib
import json
import os
import stat
import struct
import sys
import tempfile
from math import prod

import torch
from torch import Tensor

CHECKSUM_KEY = "n2n_sha256"
# The JSON header of a real checkpoint is a few kB (names, shapes, configs); 16 MiB is
# thousands of times that. 4 GiB holds a 300M-parameter float32 model with its Adam state.
MAX_HEADER_BYTES = 16 * 1024 * 1024
MAX_FILE_BYTES = 4 * 1024**3
BytesLike = (bytes, bytearray, memoryview)

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


def _read_bounded(path, max_bytes: int, label) -> bytearray:
    """The bytes of the regular file `path`, refusing anything else and anything over
    max_bytes; errors name `label`."""
    try:
        # O_NONBLOCK: opening a FIFO must not wait for a writer (it is refused just below)
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except OSError as e:
        raise CheckpointError(label, f"cannot read file ({e.strerror or e})") from e
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            kind = "a directory" if stat.S_ISDIR(info.st_mode) else "a device, FIFO or socket"
            raise CheckpointError(label, f"not a regular file ({kind})")
        if info.st_size > max_bytes:
            raise CheckpointError(label, f"file is {info.st_size} bytes, over the limit of {max_bytes} bytes")
        os.set_blocking(fd, True)
        buffer = bytearray(info.st_size)
        view, got = memoryview(buffer), 0
        with open(fd, "rb", buffering=0, closefd=False) as f:
            while got < len(buffer):
                count = f.readinto(view[got:])
                if not count:
                    break
                got += count
            if got == len(buffer) and f.read(1):
                raise CheckpointError(label, "the file grew while it was read")
        view.release()
        del buffer[got:]  # a file that shrank meanwhile: its truncation is caught by the checks
        return buffer
    except OSError as e:
        raise CheckpointError(label, f"cannot read file ({e.strerror or e})") from e
    finally:
        os.close(fd)


def read_tensor_file(source, *, name=None, max_bytes: int = MAX_FILE_BYTES
                     ) -> tuple[dict[str, Tensor], dict[str, str]]:
    """Read and validate a tensor file; returns (tensors on CPU, metadata without the checksum).

    `source` is a path or the file's bytes (bytes, bytearray, memoryview). Errors name
    `name`, else the path, else "<bytes>". At most `max_bytes` are read.
    """
    _require_little_endian()
    if isinstance(source, BytesLike):
        path = name or "<bytes>"
        blob = memoryview(source).cast("B")
        if len(blob) > max_bytes:
            raise CheckpointError(path, f"{len(blob)} bytes, over the limit of {max_bytes} bytes")
    else:
        path = name or source
        blob = memoryview(_read_bounded(source, max_bytes, path))
    if len(blob) < 8:
        raise CheckpointError(path, f"truncated or not a checkpoint: {len(blob)} bytes, need at least 8")
    (n,) = struct.unpack("<Q", blob[:8])
    if n > MAX_HEADER_BYTES:
        raise CheckpointError(path, f"header length {n} is over the limit of {MAX_HEADER_BYTES} bytes (not a checkpoint)")
    if n < 2 or 8 + n > len(blob):
        raise CheckpointError(path, f"header length {n} does not fit a file of {len(blob)} bytes (truncated or not a checkpoint)")
    try:
        header = json.loads(bytes(blob[8 : 8 + n]).decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        raise CheckpointError(path, f"header is not valid UTF-8 JSON ({e})") from None
    if not isinstance(header, dict):
        raise CheckpointError(path, "header is not a JSON object")
    metadata = header.get("__metadata__")
    if not isinstance(metadata, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
        raise CheckpointError(path, "header has no '__metadata__' object of strings")
    data = blob[8 + n :]

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
