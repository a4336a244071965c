"""The node's side of the overlapped step: one service per node, inside its `NodeReducer` actor.

The service owns the node's shared memory: the weights (P,) that the driver streams in,
bucket by bucket, and one gradient slot (P,) per worker of the node. Workers on the CPU
compute with their parameters viewing that memory, so weights reach them and gradients
leave them without a copy; GPU workers copy each bucket in and out.

One thread runs the service. It waits on three kinds of socket:
- the TCP link to the driver: WEIGHTS frames (their payload is read straight into the
  shared weights), GO (compute a step, in an epoch, with these workers), STOP;
- the Unix listener: a worker joining (HELLO with the run's token, answered by WELCOME
  carrying the weights' and its slot's file descriptors);
- each worker's connection: LOSS after its forward pass, READY as backward finishes each
  bucket; end of file when its process dies.
When every worker of the step has READY for a bucket, the service adds their slots in
worker order, weighted by their row counts, in the run's dtype, and sends the driver one
SUM frame for the node (a node of one worker sends its slot as it is, with its row count
as the factor the driver applies: one pass less over the bucket on each side). A worker that dies, or has not finished the step within the step
timeout of its GO (hung), is reported to the driver (FAULT) once; the driver decides.

Epochs: the driver starts a new epoch whenever it restarts a step after a failure; frames
of an older epoch (a worker that was still finishing) are dropped, so a step's sums only
ever add gradients computed from the same weights.
"""
from __future__ import annotations

import logging
import selectors
import socket
import threading
import time
from dataclasses import dataclass

import torch

from pipeline.training.overlap import frames
from pipeline.training.overlap.buckets import BucketPlan
from pipeline.training.overlap.frames import Kind, LinkClosed
from pipeline.training.overlap.shared import SharedTensor, remove_listener, unix_listener

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LinkSpec:
    """What the driver tells a node reducer (and, through the reducer, its workers) to link up.

    `plan` is `BucketPlan.to_list()`; `dtype` the run's ("float32" | "float64"); `wire` the
    gradients' dtype on the driver's link ("same" | "bfloat16")."""

    token: str
    driver: tuple[str, int]  # (host, port) of the driver's listener
    node_id: str
    link_id: str             # this reducer's link, among the run's (a replacement gets a new one)
    size: int
    plan: list
    dtype: str
    wire: str
    step_timeout: float


TORCH_DTYPES = {"float32": torch.float32, "float64": torch.float64}
HELLO_TIMEOUT_S = 10.0  # for a new connection's first frame


class _Member:
    """A worker connected to this node: its socket, its gradient slot, and its progress in the current step."""

    def __init__(self, index: int, sock: socket.socket, slot: SharedTensor, staging: bool):
        self.index, self.sock, self.slot, self.staging = index, sock, slot, staging
        self.loss: tuple[float, int] | None = None  # (loss sum, rows) of the current step
        self.ready: set[int] = set()                # buckets of the current step in its slot


class NodeService:
    """The overlapped step on one node (see the module docstring); `start()` runs it in a thread."""

    def __init__(self, spec: LinkSpec):
        torch.set_num_threads(1)  # the reducer holds no CPU of its own: its sums must not spin up threads
        self.spec = spec
        self.plan = BucketPlan.from_list(spec.plan, spec.size)
        self.dtype = TORCH_DTYPES[spec.dtype]
        self.weights = SharedTensor.create(spec.size, self.dtype, "n2n-weights")  # (P,), shared with the workers
        self.total = torch.zeros(spec.size, dtype=self.dtype)  # (P,) the node's sums
        self.listener, self.address = unix_listener()
        self.driver = socket.create_connection(tuple(spec.driver), timeout=30)
        self.driver.settimeout(None)
        self.driver.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        frames.send(self.driver, Kind.HELLO, meta={"token": spec.token, "node_id": spec.node_id,
                                                   "link": spec.link_id, "address": self.address})
        self.members: dict[int, _Member] = {}
        self.departed: set[int] = set()  # workers whose connection ended (and that have not joined again)
        self.pending: set[socket.socket] = set()  # connected, HELLO not read yet
        self.epoch, self.step, self.workers = 0, -1, []  # the current GO: its epoch, step and workers
        self.go_at: float | None = None  # when the current GO went out (None: no step running)
        self.sent: set[int] = set()      # buckets of the current step sent to the driver
        self.reported: set[int] = set()  # workers reported (FAULT) in the current epoch
        self.selector = selectors.DefaultSelector()
        self.thread: threading.Thread | None = None
        self.error: str | None = None

    # -- running ---------------------------------------------------------------------------
    def start(self) -> None:
        self.thread = threading.Thread(target=self._run, name="n2n-node-service", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        self.selector.register(self.driver, selectors.EVENT_READ, "driver")
        self.selector.register(self.listener, selectors.EVENT_READ, "listener")
        try:
            while True:
                timeout = None
                if self.go_at is not None:
                    timeout = max(0.0, self.go_at + self.spec.step_timeout - time.monotonic())
                events = self.selector.select(timeout)
                if not events:
                    self._report_hung()
                    continue
                for key, _ in events:
                    if key.data == "driver":
                        if not self._from_driver():
                            return
                    elif key.data == "listener":
                        self._accept()
                    else:
                        self._from_worker(key.fileobj, key.data)
        except LinkClosed as e:
            self.error = f"the driver's link closed: {e}"
        except Exception as e:  # a bug or a broken socket: end the service; the driver sees the link close
            self.error = f"{type(e).__name__}: {e}"
            log.exception("the node service stopped")
        finally:
            self.close()

    def stop(self) -> None:
        """End the service from another thread (the actor's shutdown): its loop sees the link close."""
        try:
            self.driver.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        if self.thread is not None:
            self.thread.join(timeout=10)

    def close(self) -> None:
        for member in list(self.members.values()):
            self._drop(member)
        for sock in list(self.pending):
            sock.close()
        self.pending.clear()
        for sock in (self.driver,):
            try:
                sock.close()
            except OSError:
                pass
        remove_listener(self.listener, self.address)

    # -- the driver -------------------------------------------------------------------------
    def _from_driver(self) -> bool:
        """Handle one frame from the driver; False when the run is over."""
        frame = frames.recv(self.driver)
        if frame.kind == Kind.WEIGHTS:
            bucket = self.plan.buckets[frame.bucket]
            target = self.weights.tensor[bucket.lo:bucket.hi]
            if frame.payload_len != target.numel() * target.element_size():
                raise LinkClosed(f"weights of bucket {frame.bucket}: {frame.payload_len} bytes, expected "
                                 f"{target.numel() * target.element_size()}")
            frames.recv_into(self.driver, memoryview(target.numpy()))
            for member in list(self.members.values()):  # _tell drops a member whose connection ended
                if member.staging:  # a GPU worker copies each bucket in as it comes
                    self._tell(member, Kind.WEIGHTS, frame.epoch, frame.step, frame.bucket)
        elif frame.kind == Kind.GO:
            self._go(frame.epoch, frame.step, [int(i) for i in frame.meta["workers"]])
        elif frame.kind == Kind.STOP:
            return False
        else:
            raise LinkClosed(f"unexpected {frame.kind.name} frame from the driver")
        return True

    def _go(self, epoch: int, step: int, workers: list[int]) -> None:
        self.epoch, self.step, self.workers = epoch, step, sorted(workers)
        self.go_at, self.sent, self.reported = time.monotonic(), set(), set()
        for member in list(self.members.values()):  # _tell drops a member whose connection ended
            member.loss, member.ready = None, set()
            if member.index in self.workers:
                self._tell(member, Kind.GO, epoch, step)
        for index in self.workers:  # a worker of the step whose connection ended between steps
            if index in self.departed:
                self._fault(index, "its process died (its connection to the node's reducer closed)")

    def _send_driver(self, kind: Kind, bucket: int = -1, meta: dict | None = None, payload=None) -> None:
        frames.send(self.driver, kind, self.epoch, self.step, bucket, meta, payload)

    # -- workers ----------------------------------------------------------------------------
    def _accept(self) -> None:
        sock, _ = self.listener.accept()
        sock.settimeout(HELLO_TIMEOUT_S)  # a peer that connects and sends half a frame must not stall the node
        self.pending.add(sock)
        self.selector.register(sock, selectors.EVENT_READ, None)

    def _welcome(self, sock: socket.socket) -> None:
        """A new connection's first frame: HELLO with the token, then the worker gets its memory."""
        self.pending.discard(sock)
        frame = frames.recv(sock)
        if frame.kind != Kind.HELLO or frame.meta.get("token") != self.spec.token:
            raise LinkClosed("a connection without the run's token")
        index = int(frame.meta["worker"])
        sock.settimeout(None)
        old = self.members.get(index)
        if old is not None:  # a replacement of the same worker index
            self._drop(old)
        slot = SharedTensor.create(self.spec.size, self.dtype, f"n2n-slot-{index}")
        member = _Member(index, sock, slot, bool(frame.meta.get("staging")))
        socket.send_fds(sock, [frames.pack(Kind.WELCOME, self.epoch, self.step,
                                           meta={"size": self.spec.size, "plan": self.spec.plan,
                                                 "dtype": self.spec.dtype})],
                        [self.weights.fd, slot.fd])
        self.members[index] = member
        self.departed.discard(index)
        self.selector.modify(sock, selectors.EVENT_READ, member)
        if self.go_at is not None and index in self.workers and index not in self.reported:
            self._tell(member, Kind.GO, self.epoch, self.step)  # it joined after the step's GO

    def _from_worker(self, sock: socket.socket, member: _Member | None) -> None:
        try:
            if member is None:
                self._welcome(sock)
                return
            frame = frames.recv(sock)
        except (LinkClosed, OSError, ValueError, KeyError, TypeError) as e:
            if member is None:
                log.warning("a connection to the node's reducer was refused: %s", e)
                self.selector.unregister(sock)
                sock.close()
                return
            self._lost(member)
            return
        if frame.epoch != self.epoch or frame.step != self.step or self.go_at is None:
            return  # a worker still finishing an earlier epoch or step: dropped
        if frame.kind == Kind.FAULT:  # the worker's computation raised: the driver stops the run
            self._send_driver(Kind.FAULT, meta={"worker": member.index, "cause": str(frame.meta.get("error")),
                                                "traceback": str(frame.meta.get("traceback", "")), "error": True})
        elif frame.kind == Kind.LOSS:
            member.loss = (float(frame.meta["loss_sum"]), int(frame.meta["count"]))
        elif frame.kind == Kind.READY:
            member.ready.add(frame.bucket)
            self._sum_if_complete(frame.bucket)
        else:
            self._lost(member)

    def _tell(self, member: _Member, kind: Kind, epoch: int, step: int, bucket: int = -1) -> None:
        try:
            frames.send(member.sock, kind, epoch, step, bucket)
        except OSError:
            self._lost(member)

    def _lost(self, member: _Member) -> None:
        """A worker's connection ended: its process died (or it broke the protocol)."""
        self._drop(member)
        self.departed.add(member.index)
        if self.go_at is not None and member.index in self.workers:
            self._fault(member.index, "its process died (its connection to the node's reducer closed)")

    def _drop(self, member: _Member) -> None:
        if self.members.get(member.index) is member:
            del self.members[member.index]
        try:
            self.selector.unregister(member.sock)
        except (KeyError, ValueError):
            pass
        member.sock.close()
        member.slot.close()

    def _fault(self, index: int, cause: str, hung: bool = False) -> None:
        if index in self.reported:
            return
        self.reported.add(index)
        self._send_driver(Kind.FAULT, meta={"worker": index, "cause": cause, "hung": hung})

    def _report_hung(self) -> None:
        """The step timeout passed since GO: every worker of the step that has not finished is hung."""
        late = [i for i in self.workers if i not in self.reported
                and (i not in self.members or len(self.members[i].ready) < len(self.plan))]
        for index in late:
            self._fault(index, f"no gradients within --step-timeout {self.spec.step_timeout:g} s (hung)", hung=True)
        self.go_at = None if late or len(self.sent) == len(self.plan) else self.go_at

    # -- the sum ----------------------------------------------------------------------------
    def _sum_if_complete(self, b: int) -> None:
        if b in self.sent:
            return
        members = [self.members.get(i) for i in self.workers]
        if any(m is None or b not in m.ready or m.loss is None for m in members):
            return
        bucket = self.plan.buckets[b]
        if len(members) == 1:  # nothing to add: the slot goes out as it is, its rows the driver's factor
            total, scale = members[0].slot.tensor[bucket.lo:bucket.hi], members[0].loss[1]
        else:  # in worker order, weighted by rows: what the serial step's reducer does
            total, scale = self.total[bucket.lo:bucket.hi], 1
            torch.mul(members[0].slot.tensor[bucket.lo:bucket.hi], members[0].loss[1], out=total)
            for member in members[1:]:
                total.add_(member.slot.tensor[bucket.lo:bucket.hi], alpha=member.loss[1])
        wire = total if self.spec.wire == "same" else total.to(torch.bfloat16).view(torch.int16)
        meta = {"workers": self.workers, "loss_sum": sum(m.loss[0] for m in members),
                "count": sum(m.loss[1] for m in members), "scale": scale}
        self._send_driver(Kind.SUM, b, meta, wire.numpy())
        self.sent.add(b)
        if len(self.sent) == len(self.plan):
            self.go_at = None  # the step is done here: no hang to watch for
