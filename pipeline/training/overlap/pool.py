"""The driver's side of the overlapped step: `OverlapPool`, a `WorkerPool` whose step hides the driver.

Start: the workers start as in `WorkerPool` (placement, the autoscaler, timeouts); the
driver opens a TCP listener, starts the overlapped service of each node's `NodeReducer`
(which connects back with the run's token) and joins every worker to its node's reducer.

A step, seen from the driver (`step`): every node sends one SUM frame per bucket as soon
as all its workers have finished that bucket, last layers first, while they still run the
rest of backward; a reader thread per node reads each sum straight into that node's
buffer. When every node's sum of bucket b is in, the driver adds them in node order (the
first worker each covers), divides by the rows, keeps the bucket's old weights, runs the
optimizer on the bucket's parameters alone and streams the new weights of the bucket to
every node at once. After the last bucket it says GO for the next step, so only the last
bucket's sum, update and weights stay between one step's backward and the next forward.
Adam and SGD are elementwise, so this gives exactly the serial step's numbers.

Failures: a worker that dies or hangs (its node reports it), a node reducer that dies or
stops answering, a node lost with all it held: the driver replaces what failed, exactly
as the serial step does (the same failure budget and messages), and restarts the step it
was in from that step's weights in a new epoch: every worker computes the step again, and
frames of the old epoch are dropped. Buckets already stepped keep their update (their sum
was complete); the rest are summed from the restarted step. The result is the run without
the failure.
"""
from __future__ import annotations

import logging
import math
import queue
import secrets
import socket
import threading
import time
import uuid
from dataclasses import dataclass, field

import ray
import torch

from n2n_core.architectures import parameter_shapes
from pipeline.training.config import TrainConfig
from pipeline.training.overlap import frames
from pipeline.training.overlap.buckets import BucketPlan, plan_buckets
from pipeline.training.overlap.frames import Kind, LinkClosed
from pipeline.training.overlap.node import LinkSpec
from pipeline.training.placement import REDUCER_GRACE_S, WorkerPool
from pipeline.training.reduce import WORKER_FAILURES, first_line

log = logging.getLogger("pipeline.training.placement")  # the pool's messages, wherever the step runs

WIRE_DTYPES = {"same": None, "bfloat16": torch.bfloat16}


class _Listener:
    """The driver's TCP listener: a thread accepts node reducers and reads their HELLO (token checked)."""

    def __init__(self, token: str):
        self.token = token
        host = ray.util.get_node_ip_address()
        family = socket.getaddrinfo(host, 0, type=socket.SOCK_STREAM)[0][0]
        self.sock = socket.create_server((host, 0), family=family, backlog=64)
        self.address = (host, self.sock.getsockname()[1])
        self.arrived: dict[str, tuple[socket.socket, dict]] = {}
        self.cond = threading.Condition()
        self.thread = threading.Thread(target=self._accept, name="n2n-driver-listener", daemon=True)
        self.thread.start()

    def _accept(self) -> None:
        while True:
            try:
                sock, _ = self.sock.accept()
            except OSError:
                return  # closed
            try:
                sock.settimeout(30)
                frame = frames.recv(sock)
                if frame.kind != Kind.HELLO or frame.meta.get("token") != self.token:
                    raise LinkClosed("no run token")
                sock.settimeout(None)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except (LinkClosed, OSError) as e:
                log.warning("refused a connection to the training driver: %s", e)
                sock.close()
                continue
            with self.cond:
                self.arrived[str(frame.meta.get("link"))] = (sock, frame.meta)
                self.cond.notify_all()

    def take(self, link_id: str, timeout: float) -> tuple[socket.socket, dict]:
        """The connection of reducer link `link_id` (waits up to `timeout` s for it)."""
        with self.cond:
            if not self.cond.wait_for(lambda: link_id in self.arrived, timeout=timeout):
                raise TimeoutError(f"the node reducer of link {link_id} did not connect within {timeout:g} s")
            return self.arrived.pop(link_id)

    def close(self) -> None:
        self.sock.close()
        with self.cond:
            for sock, _ in self.arrived.values():
                sock.close()
            self.arrived.clear()


class _Link:
    """The driver's connection to one node's reducer; a thread reads its frames into `events`."""

    def __init__(self, sock: socket.socket, node_id: str, address: str, plan: BucketPlan, dtype: torch.dtype,
                 events: queue.Queue):
        self.sock, self.node_id, self.address, self.plan, self.events = sock, node_id, address, plan, events
        self.recv = torch.empty(plan.size, dtype=dtype)  # (P,) the node's sums, in the wire dtype
        self.send_lock = threading.Lock()
        self.thread = threading.Thread(target=self._read, name=f"n2n-link-{node_id[:8]}", daemon=True)
        self.thread.start()

    def _read(self) -> None:
        try:
            while True:
                frame = frames.recv(self.sock)
                if frame.kind == Kind.SUM and 0 <= frame.bucket < len(self.plan):
                    bucket = self.plan.buckets[frame.bucket]
                    target = self.recv[bucket.lo:bucket.hi]
                    if frame.payload_len != target.numel() * target.element_size():
                        raise LinkClosed(f"a sum of {frame.payload_len} bytes for bucket {frame.bucket}")
                    wire = target.view(torch.int16) if target.dtype == torch.bfloat16 else target
                    frames.recv_into(self.sock, memoryview(wire.numpy()))
                    self.events.put(("sum", self, frame))
                elif frame.kind == Kind.FAULT:
                    self.events.put(("fault", self, frame))
                else:
                    raise LinkClosed(f"unexpected {frame.kind.name} frame")
        except (LinkClosed, OSError) as e:
            self.events.put(("lost", self, str(e)))

    def send(self, kind: Kind, epoch: int, step: int, bucket: int = -1, meta: dict | None = None,
             payload=None) -> None:
        """Send a frame; a broken link is reported by its reader thread, not here."""
        try:
            with self.send_lock:
                frames.send(self.sock, kind, epoch, step, bucket, meta, payload)
        except OSError:
            pass

    def close(self) -> None:
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()


@dataclass
class _StepState:
    """What one step has gathered so far."""

    step: int
    parts: list = field(default_factory=list)    # bucket -> [(first worker, link, loss_sum, count, scale)]
    covered: list = field(default_factory=list)  # bucket -> workers covered by its parts
    done: list = field(default_factory=list)     # bucket -> stepped
    sent: list = field(default_factory=list)     # bucket -> its new weights streamed to every node
    loss_sum: float | None = None
    count: int | None = None

    @classmethod
    def new(cls, step: int, buckets: int) -> "_StepState":
        return cls(step, [[] for _ in range(buckets)], [0] * buckets, [False] * buckets, [False] * buckets)

    def forget_partial(self) -> None:
        """A restart: sums of buckets not stepped yet are computed again."""
        for b, done in enumerate(self.done):
            if not done:
                self.parts[b], self.covered[b] = [], 0
        self.sent = [False] * len(self.done)  # the nodes hold this step's weights again


class OverlapPool(WorkerPool):
    """`WorkerPool` with the overlapped step (see the module docstring). Same arguments."""

    def __init__(self, config: TrainConfig, num_workers: int, use_gpu: bool, worker_class=None):
        super().__init__(config, num_workers, use_gpu, worker_class=worker_class)
        self.links: dict[str, _Link] = {}
        self.listener = None
        try:
            sizes = [math.prod(shape) for _, shape in parameter_shapes(config.arch, **config.arch_args)]
            self.plan = plan_buckets(sizes, config.buckets)
            self.wire = WIRE_DTYPES[config.gradient_dtype] or config.torch_dtype
            self.token = secrets.token_hex(16)
            self.events: queue.Queue = queue.Queue()
            self.listener = _Listener(self.token)
            self.epoch = 0
            self.running: int | None = None  # the step the workers were told to compute (GO sent)
            self.prev: torch.Tensor | None = None  # (P,) the weights a step started from, for its stepped buckets
            for node_id in sorted({p["node_id"] for p in self.placement}):
                self._link(node_id)
            for index in range(num_workers):
                self._attach(index)
        except BaseException:
            self.shutdown()
            raise

    # -- links ----------------------------------------------------------------------------
    def _link(self, node_id: str) -> "_Link":
        """Start the overlapped service of the node's reducer and take its connection."""
        reducer = self._reducer(node_id)
        spec = LinkSpec(token=self.token, driver=self.listener.address, node_id=node_id, link_id=uuid.uuid4().hex,
                        size=self.plan.size, plan=self.plan.to_list(), dtype=self.config.dtype,
                        wire=self.config.gradient_dtype, step_timeout=self.config.step_timeout)
        ray.get(reducer.start_overlap.remote(spec), timeout=self.config.start_timeout)
        sock, meta = self.listener.take(spec.link_id, timeout=60)
        link = _Link(sock, node_id, meta["address"], self.plan, self.wire, self.events)
        self.links[node_id] = link
        return link

    def _attach(self, index: int) -> None:
        """Join worker `index` to its node's reducer; a worker that died meanwhile is replaced first."""
        while True:
            node_id = self.placement[index]["node_id"]
            link = self.links.get(node_id) or self._link(node_id)
            try:
                ray.get(self.actors[index].join.remote(link.address, self.token, self.num_workers, index),
                        timeout=self.config.start_timeout)
                return
            except WORKER_FAILURES as e:
                self._replace(index, self._cause(index, e))

    def _workers_on(self, node_id: str) -> list[int]:
        return [i for i, p in enumerate(self.placement) if p["node_id"] == node_id]

    def _unlink(self, link: "_Link") -> None:
        link.close()
        if self.links.get(link.node_id) is link:
            del self.links[link.node_id]
        self._drop_reducer(link.node_id)

    # -- a step ---------------------------------------------------------------------------
    def step(self, step: int, flat, optimizer, go_on) -> float:
        """One optimizer step at `step` (see the module docstring); returns the batch's mean loss.

        `go_on()` is asked when the step's last bucket is out: True lets the workers begin step + 1.
        """
        if self.prev is None:
            self.prev = torch.empty_like(flat.weights)
        state = _StepState.new(step, len(self.plan))
        if self.running != step:
            self._restart(state, flat)
        deadline = time.monotonic() + self.config.step_timeout + REDUCER_GRACE_S
        while not all(state.done):
            try:
                kind, link, payload = self.events.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                self._stuck(state)
                self._restart(state, flat)
                deadline = time.monotonic() + self.config.step_timeout + REDUCER_GRACE_S
                continue
            if self.links.get(link.node_id) is not link:
                continue  # a link already replaced
            if kind == "sum":
                if self._take_sum(state, link, payload, flat, optimizer):
                    deadline = time.monotonic() + self.config.step_timeout + REDUCER_GRACE_S
            elif kind == "fault":
                if payload.epoch == self.epoch:
                    self._worker_failed(link, payload)
                    self._restart(state, flat)
                    deadline = time.monotonic() + self.config.step_timeout + REDUCER_GRACE_S
            else:
                self._link_lost(link, payload)
                self._restart(state, flat)
                deadline = time.monotonic() + self.config.step_timeout + REDUCER_GRACE_S
        if go_on():
            for b, sent in enumerate(state.sent):
                if not sent:  # stepped before a restart: the nodes hold the step's old weights there
                    self._send_weights(flat.weights, step + 1, b)
            for link in self.links.values():
                link.send(Kind.GO, self.epoch, step + 1, meta={"workers": self._workers_on(link.node_id)})
            self.running = step + 1
        else:
            self.running = None
        return state.loss_sum / state.count

    def _restart(self, state: _StepState, flat) -> None:
        """(Re)start the workers on `state.step` in a new epoch, from that step's weights."""
        self.epoch += 1
        state.forget_partial()
        for b, bucket in enumerate(self.plan.buckets):
            source = self.prev if state.done[b] else flat.weights  # stepped buckets: their old weights
            for link in self.links.values():
                link.send(Kind.WEIGHTS, self.epoch, state.step, b, payload=source[bucket.lo:bucket.hi].numpy())
        for link in self.links.values():
            link.send(Kind.GO, self.epoch, state.step, meta={"workers": self._workers_on(link.node_id)})
        self.running = state.step

    def _take_sum(self, state: _StepState, link: "_Link", frame, flat, optimizer) -> bool:
        """A node's sum of a bucket; when every worker is covered, step the bucket. True if it was new."""
        b = frame.bucket
        if frame.epoch != self.epoch or frame.step != state.step or state.done[b]:
            return False
        workers = frame.meta["workers"]
        state.parts[b].append((min(workers), link, float(frame.meta["loss_sum"]), int(frame.meta["count"]),
                               int(frame.meta.get("scale", 1))))
        state.covered[b] += len(workers)
        if state.covered[b] == self.num_workers:
            self._step_bucket(state, b, flat, optimizer)
        return True

    def _step_bucket(self, state: _StepState, b: int, flat, optimizer) -> None:
        bucket = self.plan.buckets[b]
        parts = sorted(state.parts[b], key=lambda part: part[0])
        count = sum(part[3] for part in parts)
        out = flat.grads[bucket.lo:bucket.hi]
        for i, (_, link, _, _, scale) in enumerate(parts):  # in node order (each one's first worker), as the serial step
            part = link.recv[bucket.lo:bucket.hi]
            if i > 0:
                out.add_(part, alpha=scale)  # in out's dtype, whatever the wire's
            elif part.dtype == out.dtype:
                torch.mul(part, scale, out=out)  # scale x part: what 0 + scale x part gives, one pass
            else:  # bfloat16 on the wire: widen first, then scale in the run's dtype
                out.copy_(part)
                if scale != 1:
                    out.mul_(scale)
        out.div_(count)
        if state.loss_sum is None:
            state.loss_sum, state.count = sum(part[2] for part in parts), count
        self.prev[bucket.lo:bucket.hi].copy_(flat.weights[bucket.lo:bucket.hi])
        optimizer.step(bucket.params)
        state.done[b] = True
        self._send_weights(flat.weights, state.step + 1, b)
        state.sent[b] = True

    def _send_weights(self, weights: torch.Tensor, step: int, b: int) -> None:
        bucket = self.plan.buckets[b]
        payload = weights[bucket.lo:bucket.hi].numpy()
        for link in self.links.values():
            link.send(Kind.WEIGHTS, self.epoch, step, b, payload=payload)

    # -- failures -------------------------------------------------------------------------
    def _settled(self, link: "_Link", seconds: float = 2.0) -> bool:
        """Whether `link` stays up for `seconds` (a worker's death may be its whole node going down:
        then that is the failure to handle, once). Events that arrive meanwhile are kept, in order."""
        kept, lost, end = [], False, time.monotonic() + seconds
        while True:
            try:
                event = self.events.get(timeout=max(0.0, end - time.monotonic()))
            except queue.Empty:
                break
            kept.append(event)
            if event[0] == "lost" and event[1] is link:
                lost = True
                break
        for event in kept:
            self.events.put(event)
        return not lost

    def _worker_failed(self, link: "_Link", frame) -> None:
        index, meta = int(frame.meta["worker"]), frame.meta
        if meta.get("error"):
            # the message is the line the command line prints; the worker's traceback is a note on
            # it, shown with the driver's own traceback under --debug
            cause = " ".join(str(meta.get("cause")).split())
            error = RuntimeError(f"worker {index} failed at step {frame.step}: {cause}")
            if meta.get("traceback") and hasattr(error, "add_note"):
                error.add_note(f"the worker's traceback:\n{meta['traceback'].rstrip()}")
            raise error
        if meta.get("hung"):
            log.warning("worker %d sent no gradients for step %d within %g s (--step-timeout): killing it",
                        index, frame.step, self.config.step_timeout)
            self.hung.add(index)
            try:
                ray.kill(self.actors[index], no_restart=True)
            except Exception:
                pass
        elif not self._settled(link):
            self._link_lost(link, "the node's reducer went away with the worker")
            return
        self._replace(index, self._cause(index, meta.get("cause", "unknown")))
        self._attach(index)

    def _link_lost(self, link: "_Link", reason) -> None:
        """A node's reducer is gone (killed, or its node lost): replace what went with it."""
        node_id = link.node_id
        self._unlink(link)
        workers = self._workers_on(node_id)
        if self._node_alive(node_id):  # the reducer alone: a new one, and the node's workers join it
            self._count_failure(f"the gradient reducer of node {node_id}", f"its link closed: {reason}")
            self._link(node_id)
            for index in workers:
                self._attach(index)
            return
        self._count_failure(f"node {node_id} (workers {workers})", "the node died")
        for index in workers:
            self._replace(index, "its node died", counted=True)
        for index in workers:
            self._attach(index)

    def _stuck(self, state: _StepState) -> None:
        """No progress within the step timeout and the grace: the reducers that owe a sum are stuck."""
        for node_id, link in list(self.links.items()):
            owes = any(not state.done[b] and not any(part[1] is link for part in state.parts[b])
                       for b in range(len(self.plan)))
            if owes:
                log.warning("the gradient reducer of node %s did not answer within %g s: killing it", node_id,
                            self.config.step_timeout + REDUCER_GRACE_S)
                reducer = self.reducers.get(node_id)
                if reducer is not None:
                    try:
                        ray.kill(reducer, no_restart=True)
                    except Exception:
                        pass
                self._link_lost(link, "stuck")

    # -- the end --------------------------------------------------------------------------
    def shutdown(self) -> None:
        for link in list(getattr(self, "links", {}).values()):
            link.send(Kind.STOP, 0, 0)
            link.close()
        self.links = {}
        if getattr(self, "listener", None) is not None:
            self.listener.close()
            self.listener = None
        super().shutdown()
