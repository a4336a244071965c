"""NodeReducer: calls the workers on its node for a step and sums their gradients, so one buffer leaves the node.

One reducer actor runs on each node that hosts two or more workers of a step (the driver
calls a node's single worker directly). The driver makes one call per node: the
reducer submits its node's worker tasks itself, reads their gradients from the node's
object store (same node: no copy, no network), adds them weighted by row count in
worker order, in the run's dtype, and returns one (P,) buffer in the wire dtype. So the
driver submits N tasks and owns N results per step instead of W + N tasks and W
borrowed results (Ray's per-object bookkeeping of W gradients, which cost the driver
more CPU than the sums themselves), and the network carries N buffers instead of W.

A worker that died, or sent nothing within the step timeout (hung), does not fail or
block the reduction: its index is returned in `failed` (or `hung`) with the cause, the
others are summed, and the driver kills and replaces those workers and redoes their
shards. The reducer watches the hang because it holds the refs on the node where they
become ready; the driver only needs a deadline for the reducer itself. The gradients
belong to the reducer that asked for them: if it dies, its node's shards are asked for
again (they are a pure function of weights, step and rows).
"""
from __future__ import annotations

import os

import ray
import torch

from pipeline.training.config import DTYPES
from pipeline.training.flat import from_wire, to_wire

# failures of a worker process or node (not bugs in the task: RayTaskError propagates)
WORKER_FAILURES = (ray.exceptions.RayActorError, ray.exceptions.WorkerCrashedError, ray.exceptions.NodeDiedError,
                   ray.exceptions.ObjectLostError, ray.exceptions.ActorUnschedulableError)


def first_line(error: BaseException) -> str:
    """The first line of an error's message (Ray's errors carry long multi-line reports)."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


class NodeReducer:
    """Weighted sum of its node's shard gradients (a Ray actor pinned to the node)."""

    def __init__(self):
        self.workers: dict[int, object] = {}  # worker index -> its actor, as last sent by the driver

    def node_id(self) -> str:
        return ray.get_runtime_context().get_node_id()

    def pid(self) -> int:
        return os.getpid()

    # -- the overlapped step (pipeline.training.overlap) ----------------------------------
    def start_overlap(self, spec) -> str:
        """Start this node's overlapped service (it connects to the driver); returns its workers' address."""
        from pipeline.training.overlap.node import NodeService

        self.stop_overlap()
        self.service = NodeService(spec)
        self.service.start()
        return self.service.address

    def stop_overlap(self) -> None:
        service = getattr(self, "service", None)
        if service is not None:
            self.service = None
            service.stop()

    def gather(self, weights: list, step: int, work: list, dtype: str, gradient_dtype: str, timeout: float) -> dict:
        """Ask each worker of `work` for its shard of `step` and sum the results, in that order.

        Args:
            weights: [object ref of the driver's (P,) weights for the step], in a list so that
                Ray hands the reducer the ref, not the array, and the workers read the
                driver's one object.
            work: [(worker index, its actor or None, positions)] in ascending worker index; the
                driver sends an actor only when this reducer has not seen it for that index
                (the first step, a replacement): handles are costly to send every step.
            dtype, gradient_dtype, timeout: as in `reduce`.

        Returns:
            as `reduce`.
        """
        self.workers.update({index: actor for index, actor, _ in work if actor is not None})
        shards = [(index, self.workers[index].grads.remote(weights[0], step, positions))
                  for index, _, positions in work]
        return self.reduce(shards, dtype, gradient_dtype, timeout)

    def reduce(self, shards: list, dtype: str, gradient_dtype: str, timeout: float) -> dict:
        """Sum the gradients of `shards` [(worker index, ref of its `grads` result)], in that order.

        Args:
            dtype: the run's dtype (float32 | float64): the sum's precision.
            gradient_dtype: the wire dtype of the result (same | bfloat16).
            timeout: seconds to wait for the shards; those still missing then are `hung`.

        Returns:
            {"grads": (P,) wire array of sum(count_i * grads_i), or None when no shard
            was summed; "loss_sum", "count": over the summed shards; "done": their worker
            indices; "failed": {worker index: cause} of dead workers; "hung": the workers
            that sent nothing within `timeout`}.
        """
        refs = [ref for _, ref in shards]
        _, waiting = ray.wait(refs, num_returns=len(refs), timeout=timeout)
        hung = [index for index, ref in shards if ref in waiting]
        total = None
        loss_sum, count, done, failed = 0.0, 0, [], {}
        for index, ref in shards:
            if index in hung:
                continue
            try:
                grads, shard_loss, shard_count = ray.get(ref)
            except WORKER_FAILURES as e:
                failed[index] = f"{type(e).__name__}: {first_line(e)}"
                continue
            if total is None:
                total = torch.zeros(grads.shape[0], dtype=DTYPES[dtype])
            total.add_(from_wire(grads), alpha=shard_count)
            loss_sum += shard_loss
            count += shard_count
            done.append(index)
        return {"grads": None if total is None else to_wire(total, gradient_dtype), "loss_sum": loss_sum,
                "count": count, "done": done, "failed": failed, "hung": hung}
