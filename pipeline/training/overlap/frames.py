"""Frames on the overlapped step's sockets: a fixed header, JSON metadata, raw bytes.

Every message between the driver and a node reducer (TCP) and between a node reducer and
its workers (a Unix socket) is one frame:

    header: magic b"N2", kind (1 byte), epoch (u32), step (i64), bucket (i32),
            metadata length (u32), payload length (u64), all big-endian;
    metadata: UTF-8 JSON (worker indices, losses, causes; empty for most frames);
    payload: raw bytes (a bucket of weights or gradient sums), read straight into the
            receiver's buffer.

Nothing is ever unpickled: a peer that is not ours can at most send bad numbers, and the
first frame on every connection must carry the run's random token (`Kind.HELLO`).
"""
from __future__ import annotations

import enum
import json
import socket
import struct
from dataclasses import dataclass, field

MAGIC = b"N2"
HEADER = struct.Struct("!2sBIqiIQ")
MAX_META = 1 << 20  # metadata is a few numbers; a bigger length is a broken or foreign peer


class Kind(enum.IntEnum):
    HELLO = 1    # first frame of a connection: {"token", ...who is calling}
    WELCOME = 2  # node -> worker: the answer to HELLO, with the shared buffers' file descriptors
    WEIGHTS = 3  # driver -> node: payload = the weights of `step` in `bucket`; node -> worker: a notice
    GO = 4       # driver -> node {"workers"}: compute `step` in `epoch`; node -> worker: the same
    LOSS = 5     # worker -> node {"loss_sum", "count"}: its shard's loss of `step`
    READY = 6    # worker -> node: its gradient of `bucket` for `step` is in its shared slot
    SUM = 7      # node -> driver {"workers", "loss_sum", "count"}: payload = the node's sum of `bucket`
    FAULT = 8    # node -> driver {"worker", "cause", "hung"}: a worker of the node failed in `epoch`
    STOP = 9     # the run is over: close


class LinkClosed(ConnectionError):
    """The peer closed the connection (or it broke) while a frame was expected."""


@dataclass
class Frame:
    kind: Kind
    epoch: int = 0
    step: int = 0
    bucket: int = -1
    meta: dict = field(default_factory=dict)
    payload_len: int = 0  # bytes that follow the frame on the socket, not read yet


def pack(kind: Kind, epoch: int = 0, step: int = 0, bucket: int = -1, meta: dict | None = None,
         payload_len: int = 0) -> bytes:
    """Header and metadata of a frame (its payload, if any, is sent right after)."""
    body = json.dumps(meta, separators=(",", ":")).encode() if meta else b""
    return HEADER.pack(MAGIC, int(kind), epoch, step, bucket, len(body), payload_len) + body


def send(sock: socket.socket, kind: Kind, epoch: int = 0, step: int = 0, bucket: int = -1,
         meta: dict | None = None, payload=None) -> None:
    """One frame; `payload` is anything with the buffer protocol (a numpy array, a memoryview)."""
    view = memoryview(payload).cast("B") if payload is not None else None
    head = pack(kind, epoch, step, bucket, meta, 0 if view is None else view.nbytes)
    if view is None or view.nbytes < 65536:  # small: one system call
        sock.sendall(head + bytes(view) if view is not None else head)
    else:
        sock.sendall(head)
        sock.sendall(view)


def recv_exactly(sock: socket.socket, n: int) -> bytes:
    buf = bytearray(n)
    recv_into(sock, memoryview(buf))
    return bytes(buf)


def recv_into(sock: socket.socket, view: memoryview) -> None:
    """Fill `view` from the socket; LinkClosed if the peer goes away first."""
    view = view.cast("B") if view.format != "B" else view
    got, n = 0, view.nbytes
    while got < n:
        try:
            k = sock.recv_into(view[got:], n - got)
        except OSError as e:
            raise LinkClosed(f"connection broken: {e}") from None
        if k == 0:
            raise LinkClosed("connection closed by the peer")
        got += k


def recv(sock: socket.socket) -> Frame:
    """The next frame's header and metadata; its payload (`payload_len` bytes) is still on the socket."""
    magic, kind, epoch, step, bucket, meta_len, payload_len = HEADER.unpack(recv_exactly(sock, HEADER.size))
    if magic != MAGIC or meta_len > MAX_META:
        raise LinkClosed(f"not an n2n frame (magic {magic!r}, metadata length {meta_len})")
    try:
        kind = Kind(kind)
        meta = json.loads(recv_exactly(sock, meta_len)) if meta_len else {}
    except (ValueError, UnicodeDecodeError) as e:
        raise LinkClosed(f"unreadable frame: {e}") from None
    if not isinstance(meta, dict):
        raise LinkClosed("unreadable frame: metadata is not a mapping")
    return Frame(kind, epoch, step, bucket, meta, payload_len)


def skip(sock: socket.socket, n: int) -> None:
    """Read and drop `n` payload bytes (a frame that is no longer wanted)."""
    scratch = memoryview(bytearray(min(n, 1 << 20)))
    while n > 0:
        k = min(n, scratch.nbytes)
        recv_into(sock, scratch[:k])
        n -= k
