"""Connecting to Ray and placing the gradient actors: one per GPU, or CPU actors.

- `connect(address)`: `pipeline.runtime.ray_session.connect`, shared with the denoise job: attach
  to a Ray cluster or start a private Ray, and say which in one line.
- `WorkerPool`: GPU actors go into a placement group with one {CPU, GPU: 1} bundle
  each, CPU actors are spread over the nodes. The autoscaler is asked for room for all
  of them, and the pool waits up to `start_timeout` seconds (a node boot) for them to
  start, then stops with a clear error. `gradients(weights, step)` gathers every shard,
  summed on each node by a `NodeReducer`, and replaces dead or hung actors (a node
  lost, a process killed, no answer within `step_timeout`), redoing their shards, up to
  `max_failures`.
"""
from __future__ import annotations

import logging
import os
import socket
import time
import uuid
from dataclasses import dataclass

import ray
import torch
from ray.autoscaler.sdk import request_resources
from ray.util.placement_group import get_current_placement_group, placement_group, remove_placement_group
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy, PlacementGroupSchedulingStrategy

from pipeline.data.patches import shard_positions
from pipeline.runtime.ray_session import check_private_room
from pipeline.runtime.ray_session import connect  # noqa: F401  (the driver imports it from here)
from pipeline.training.config import TrainConfig
from pipeline.training.flat import SerialStep, StepGradients, to_wire
from pipeline.training.reduce import WORKER_FAILURES, NodeReducer, first_line
from pipeline.training.worker import GradientWorker

log = logging.getLogger(__name__)

RemoteGradientWorker = ray.remote(GradientWorker)
RemoteNodeReducer = ray.remote(NodeReducer)
REDUCER_GRACE_S = 120.0  # a reducer's own time beyond the step timeout (its start, the sum) before it counts as stuck


class PlacementError(RuntimeError):
    """The cluster cannot host the requested workers."""


class WorkerFailureError(RuntimeError):
    """More workers died than the failure budget allows."""


def resolve_workers(config: TrainConfig) -> tuple[int, bool]:
    """(number of workers, GPU actors?) from the config and the cluster's resources."""
    resources = ray.cluster_resources()
    gpus = int(resources.get("GPU", 0))
    use_gpu = config.device == "cuda" or (config.device == "auto" and gpus > 0)
    if config.workers:
        workers = config.workers
    elif use_gpu:
        workers = max(gpus, 1)
    else:
        workers = max(1, int(resources.get("CPU", 1) // config.cpus_per_worker))
    check_private_room(min(workers, config.batch_size), cpus_each=config.cpus_per_worker, gpus_each=int(use_gpu))
    return min(workers, config.batch_size), use_gpu


# -- hook for `n2n sweep` (pipeline.sweep): a trial's actors go into its placement group --
def enclosing_placement_group():
    """The placement group this process runs in, when it asked for its children to be placed there.

    A Ray Tune trial runs its driver in bundle 0 of the trial's placement group with
    `placement_group_capture_child_tasks=True` and reserves one bundle per gradient
    worker; WorkerPool then starts its actors in that group (any bundle with room) instead
    of spreading them or reserving GPUs of its own. None anywhere else (a driver, a task
    outside a placement group, or one that did not ask for capture).
    """
    if not ray.get_runtime_context().should_capture_child_tasks_in_placement_group:
        return None
    return get_current_placement_group()


@dataclass
class _Call:
    """An outstanding request of a step: a node reducer's sum, or one worker's gradients directly."""

    ref: ray.ObjectRef
    indices: list[int]   # the workers (shards) it covers, ascending
    node_id: str | None  # the reducer's node; None when one worker is called directly
    deadline: float      # time.monotonic() after which its workers are checked for a hang


class _SerialRound:
    """One serial step's gradients: one call per node (to its reducer, or to the worker itself
    when alone on its node), their results gathered as they finish, the shards of failed or
    hung workers and reducers redone (`WorkerPool.gradients`)."""

    def __init__(self, pool: "WorkerPool", weights_ref, step: int):
        self.pool, self.weights_ref, self.step = pool, weights_ref, step
        n = pool.num_workers
        self.shards = [shard_positions(pool.config.rows_per_step, n, i) for i in range(n)]
        self.calls: list[_Call] = []
        self.parts: list[tuple[int, object, float]] = []  # (first worker index, wire buffer, weight)
        self.out = StepGradients()

    def run(self) -> StepGradients:
        """Every shard's gradients, failed shards redone; the parts in worker order."""
        self.launch(range(self.pool.num_workers))
        while self.calls:
            timeout = max(0.0, min(c.deadline for c in self.calls) - time.monotonic())
            ready, _ = ray.wait([c.ref for c in self.calls], num_returns=1, timeout=timeout)
            if not ready:
                now = time.monotonic()
                for call in [c for c in self.calls if c.deadline <= now]:
                    self.expire(call)
                continue
            call = next(c for c in self.calls if c.ref == ready[0])
            self.calls.remove(call)
            redo = self.finish(call)
            if redo:
                self.launch(redo)
        self.parts.sort(key=lambda part: part[0])
        self.out.parts = [(buffer, weight) for _, buffer, weight in self.parts]
        return self.out

    def launch(self, indices) -> None:
        pool, cfg = self.pool, self.pool.config
        by_node: dict[str, list[int]] = {}
        for i in sorted(indices):
            by_node.setdefault(pool.placement[i]["node_id"], []).append(i)
        now = time.monotonic()
        for node_id, idx in by_node.items():
            if len(idx) == 1:  # nothing to sum on that node: the driver asks the worker itself
                ref = pool.actors[idx[0]].grads.remote(self.weights_ref, self.step, self.shards[idx[0]])
                self.calls.append(_Call(ref, idx, None, now + cfg.step_timeout))
            else:  # the node's reducer asks its workers and reports hung ones itself, after step_timeout
                knows = pool.reducer_knows.setdefault(node_id, {})
                work = [(i, None if knows.get(i) is pool.actors[i] else pool.actors[i], self.shards[i]) for i in idx]
                knows.update({i: pool.actors[i] for i in idx})
                ref = pool._reducer(node_id).gather.remote([self.weights_ref], self.step, work, cfg.dtype,
                                                           cfg.gradient_dtype, cfg.step_timeout)
                self.calls.append(_Call(ref, idx, node_id, now + cfg.step_timeout + REDUCER_GRACE_S))

    def finish(self, call: _Call) -> list[int]:
        """Take a finished call's result; returns the workers whose shards must be redone."""
        pool = self.pool
        if call.node_id is None:
            index = call.indices[0]
            try:
                grads, loss_sum, count = ray.get(call.ref)
            except WORKER_FAILURES as e:
                pool._replace(index, pool._cause(index, e))
                return [index]
            self.parts.append((index, grads, count))
            self.out.loss_sum += loss_sum
            self.out.count += count
            return []
        try:
            result = ray.get(call.ref)
        except WORKER_FAILURES as e:  # the reducer died (alone, or with its node) or could not start
            pool._drop_reducer(call.node_id)
            if pool._node_alive(call.node_id):  # its workers live: a new reducer asks them again
                pool._count_failure(f"the gradient reducer of node {call.node_id}",
                                    f"{type(e).__name__}: {first_line(e)}")
                return call.indices
            pool._count_failure(f"node {call.node_id} (workers {call.indices})", "the node died")
            for index in call.indices:
                pool._replace(index, "its node died", counted=True)
            return call.indices
        if result["grads"] is not None:
            self.parts.append((result["done"][0], result["grads"], 1))
            self.out.loss_sum += result["loss_sum"]
            self.out.count += result["count"]
        for index in result["hung"]:
            log.warning("worker %d sent no gradients for step %d within %g s (--step-timeout): killing it",
                        index, self.step, pool.config.step_timeout)
            pool.hung.add(index)
        failed = sorted([*result["failed"], *result["hung"]])
        for index in failed:
            pool._replace(index, pool._cause(index, result["failed"].get(index, "hung")))
        return failed

    def expire(self, call: _Call) -> None:
        """A call past its deadline: a worker called directly is hung and killed (its shard is then
        redone); a reducer (which reports its own hung workers) is itself stuck and replaced."""
        pool = self.pool
        if call.node_id is None:
            index = call.indices[0]
            log.warning("worker %d sent no gradients for step %d within %g s (--step-timeout): killing it",
                        index, self.step, pool.config.step_timeout)
            pool.hung.add(index)
            ray.kill(pool.actors[index], no_restart=True)
        else:
            log.warning("the gradient reducer of node %s did not answer within %g s: killing it",
                        call.node_id, pool.config.step_timeout + REDUCER_GRACE_S)
            pool._drop_reducer(call.node_id)
        call.deadline = time.monotonic() + REDUCER_GRACE_S


class WorkerPool(SerialStep):
    """The gradient actors of a run, their node reducers, and their replacement on failure.

    Args:
        config: the run's TrainConfig (cpus_per_worker, start_timeout, step_timeout,
            max_failures, gradient_dtype, ...).
        num_workers: gradient actors (shards of each global batch).
        use_gpu: one GPU per actor, in a placement group.
        worker_class: a subclass of `GradientWorker` for the actors; None: `GradientWorker`.
            Tests inject faults through it (a worker that hangs) and benchmarks synthetic
            gradients; `n2n train` always uses `GradientWorker`.
    """

    def __init__(self, config: TrainConfig, num_workers: int, use_gpu: bool, worker_class=None):
        self.config, self.num_workers, self.use_gpu = config, num_workers, use_gpu
        self.remote_worker = RemoteGradientWorker if worker_class is None else ray.remote(worker_class)
        self.failures = 0
        self.pg = None
        self.host_pg = enclosing_placement_group()  # `n2n sweep`: the trial's own placement group
        self.actors: list = []
        self.reducers: dict[str, object] = {}  # node id -> its NodeReducer actor
        self.reducer_knows: dict[str, dict[int, object]] = {}  # node id -> the worker actors its reducer holds
        self.hung: set[int] = set()            # workers killed for not answering within step_timeout
        self.requested = False
        try:
            if self.host_pg is None:  # a sweep trial's resources are reserved by Tune already
                self._request_resources()
                if use_gpu:
                    self.pg = self._reserve_gpus()
            self.actors = [self._start(i) for i in range(num_workers)]
            self.placement = self._ready(self.actors)
        except BaseException:
            self.shutdown()
            raise

    # -- placement --------------------------------------------------------------
    def _bundle(self) -> dict:
        return {"CPU": self.config.cpus_per_worker, **({"GPU": 1} if self.use_gpu else {})}

    def _request_resources(self) -> None:
        """Ask the autoscaler (if the cluster has one) for room for every worker, for the whole run.

        The request stands until shutdown, so that a lost node is replaced too; without an
        autoscaler it has no effect. Ray keeps one such request per cluster: two runs on one
        cluster replace each other's."""
        try:
            request_resources(bundles=[self._bundle()] * self.num_workers)
            self.requested = True
        except Exception as e:  # a cluster that cannot take the request still trains on what it has
            log.info("could not ask the autoscaler for %d workers (%s: %s)", self.num_workers,
                     type(e).__name__, first_line(e))

    def _wait_started(self, refs: list, what: str) -> list:
        """Wait up to `start_timeout` s for `refs`, saying every 30 s what is missing; returns those not ready."""
        timeout = self.config.start_timeout
        deadline = time.monotonic() + timeout
        pending, said = list(refs), False
        while pending:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            # the first look soon (a boot to wait for is worth saying at once), then every 30 s
            _, pending = ray.wait(pending, num_returns=len(pending), timeout=min(left, 30.0 if said else 5.0))
            said = True
            if pending and deadline - time.monotonic() > 0:
                resources = ray.cluster_resources()
                progress = f": {len(pending)} of {len(refs)} not started yet" if len(refs) > 1 else ""
                log.info("waiting for %s%s; the cluster has %g GPUs and %g CPUs now (the autoscaler, if any, "
                         "was asked for the rest); up to %.0f s more (--start-timeout)", what, progress,
                         resources.get("GPU", 0), resources.get("CPU", 0), deadline - time.monotonic())
        return pending

    def _reserve_gpus(self):
        n, cpus = self.num_workers, self.config.cpus_per_worker
        have = ray.cluster_resources().get("GPU", 0)
        if have < n:
            log.warning("asked for %d GPU workers but the Ray cluster has %g GPUs now: waiting up to %g s for "
                        "the autoscaler to add the rest (--start-timeout)", n, have, self.config.start_timeout)
        pg = placement_group([self._bundle()] * n, strategy="PACK", name="")
        if self._wait_started([pg.ready()], f"a placement group of {n} {{CPU: {cpus:g}, GPU: 1}} bundles"):
            have = ray.cluster_resources().get("GPU", 0)
            available = ray.available_resources().get("GPU", 0)
            remove_placement_group(pg)
            raise PlacementError(
                f"could not reserve {n} bundles of {{CPU: {cpus:g}, GPU: 1}} within "
                f"{self.config.start_timeout:g} s: the cluster has {have:g} GPUs, {available:g} free "
                f"(others in use, or no autoscaler to add nodes?); pass fewer --workers or a longer --start-timeout")
        return pg

    def _start(self, index: int):
        cpus = self.config.cpus_per_worker
        options = {"num_cpus": cpus, "num_gpus": 1 if self.use_gpu else 0, "max_restarts": 0,
                   "max_task_retries": 0}
        if self.pg is not None:
            options["scheduling_strategy"] = PlacementGroupSchedulingStrategy(
                self.pg, placement_group_bundle_index=index)
        elif self.host_pg is not None:  # `n2n sweep`: any bundle of the trial's group with room
            options["scheduling_strategy"] = PlacementGroupSchedulingStrategy(self.host_pg)
        else:
            options["scheduling_strategy"] = "SPREAD"
        return self.remote_worker.options(**options).remote(self.config, threads=max(1, int(cpus)))

    def _ready(self, actors) -> list[dict]:
        """Wait (up to `start_timeout`: room for a node to boot) until the actors are constructed;
        returns where each runs."""
        refs = [a.describe.remote() for a in actors]
        pending = self._wait_started(refs, f"{len(refs)} worker{'s' if len(refs) > 1 else ''}")
        if pending:
            raise PlacementError(
                f"{len(pending)} of {len(refs)} workers did not start within {self.config.start_timeout:g} s "
                f"({self.config.cpus_per_worker:g} CPU{' + 1 GPU' if self.use_gpu else ''} each); cluster "
                f"resources: {ray.cluster_resources()}, free: {ray.available_resources()}; "
                f"a longer --start-timeout gives the autoscaler more time")
        return ray.get(refs)

    def _count_failure(self, what: str, cause: str) -> None:
        self.failures += 1
        if self.failures > self.config.max_failures:
            raise WorkerFailureError(
                f"{what} failed and the failure budget is spent ({self.config.max_failures} "
                f"replacements already): {cause}")
        log.warning("%s failed (%s); replacing it (%d of %d failures)", what, cause, self.failures,
                    self.config.max_failures)

    def _replace(self, index: int, cause: str, *, counted: bool = False) -> None:
        """Start a new actor for worker `index` and wait for it (up to `start_timeout`: a node may boot)."""
        if not counted:
            self._count_failure(f"worker {index}", cause)
        self.hung.discard(index)
        try:
            ray.kill(self.actors[index], no_restart=True)
        except Exception:  # already gone
            pass
        self.actors[index] = self._start(index)
        self.placement[index] = self._ready([self.actors[index]])[0]

    def _cause(self, index: int, error) -> str:
        if index in self.hung:
            return f"no gradients within --step-timeout {self.config.step_timeout:g} s (hung); killed"
        return error if isinstance(error, str) else f"{type(error).__name__}: {first_line(error)}"

    def _reducer(self, node_id: str):
        reducer = self.reducers.get(node_id)
        if reducer is None:
            reducer = RemoteNodeReducer.options(  # named, so that `ray list actors` shows what it is
                name=f"n2n-reducer-{node_id[:12]}-{uuid.uuid4().hex[:8]}", num_cpus=0, max_restarts=0,
                max_task_retries=0,
                scheduling_strategy=NodeAffinitySchedulingStrategy(node_id, soft=False)).remote()
            self.reducers[node_id] = reducer
        return reducer

    def _drop_reducer(self, node_id: str) -> None:
        reducer = self.reducers.pop(node_id, None)
        self.reducer_knows.pop(node_id, None)
        if reducer is not None:
            try:
                ray.kill(reducer, no_restart=True)
            except Exception:
                pass

    @staticmethod
    def _node_alive(node_id: str) -> bool:
        return any(n.get("NodeID") == node_id and n.get("Alive") for n in ray.nodes())

    def driver_threads(self) -> int:
        """Torch threads for the driver's own work (sums, the optimizer, validation) while the workers run.

        The cores of the driver's machine that none of this run's workers holds, at least one.
        On a head node without workers that is all of them; on a laptop whose cores the workers
        share, the driver takes what is left. More threads than that would not only contend
        with the workers: OpenMP threads spin between the driver's many small operations.
        """
        host = socket.gethostname()
        held = sum(self.config.cpus_per_worker for p in self.placement if p.get("host") == host)
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        return max(1, int(cores - held))

    # -- one step -----------------------------------------------------------------
    def gradients(self, weights: torch.Tensor, step: int) -> StepGradients:
        """The summed gradients of every shard of `step`, one buffer per node (see StepGradients).

        `weights` (P,) go into the object store once. The driver makes one call per node:
        to the node's reducer, which asks the node's workers and sums them there, or to the
        worker itself when it is alone on its node; it fetches the nodes' buffers
        concurrently. A worker that dies, or sends nothing within `step_timeout` (it is
        then killed), is replaced and its shard redone; so are the shards of a node whose
        reducer died with it. A reducer that dies alone or hangs is replaced and the new
        one asks the same workers again. The result is the same: `grads` is a pure
        function of weights, step and positions.
        """
        return _SerialRound(self, ray.put(to_wire(weights)), step).run()

    def shutdown(self) -> None:
        for actor in self.actors + list(self.reducers.values()):
            try:
                ray.kill(actor, no_restart=True)
            except Exception:
                pass
        self.actors, self.reducers, self.reducer_knows = [], {}, {}
        if self.pg is not None:
            try:
                remove_placement_group(self.pg)
            except Exception:
                pass
            self.pg = None
        if self.requested:  # withdraw the standing request, so the autoscaler may scale down
            try:
                request_resources(bundles=[])
            except Exception:
                pass
            self.requested = False
