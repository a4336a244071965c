"""Connecting to Ray and placing the gradient actors: one per GPU, or CPU actors.

- `connect(address)`: `pipeline.ray_session.connect`, shared with the denoise job: attach
  to a Ray cluster or start a private Ray, and say which in one line.
- `WorkerPool`: GPU actors go into a placement group with one {CPU, GPU: 1} bundle
  each; a cluster with fewer GPUs than asked is a clear error at once, and bundles that
  cannot be placed within `placement_timeout` seconds another. CPU actors are spread
  over the nodes. `gradients(weights, step)` gathers every shard and replaces dead
  actors (a node lost, a process killed), redoing their shards, up to `max_failures`.
"""
from __future__ import annotations

import logging

import ray
from ray.exceptions import (ActorUnschedulableError, NodeDiedError, ObjectLostError, RayActorError,
                            WorkerCrashedError)
from ray.util.placement_group import get_current_placement_group, placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from pipeline.patches import shard_positions
from pipeline.ray_session import connect  # noqa: F401  (the driver's import; one function for training and denoise)
from pipeline.training.config import TrainConfig
from pipeline.training.worker import GradientWorker

log = logging.getLogger(__name__)

RemoteGradientWorker = ray.remote(GradientWorker)

# failures of a worker process or node (not bugs in the task: RayTaskError propagates)
WORKER_FAILURES = (RayActorError, WorkerCrashedError, NodeDiedError, ObjectLostError, ActorUnschedulableError)


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


class WorkerPool:
    """The gradient actors of a run, their placement and their replacement on failure."""

    def __init__(self, config: TrainConfig, num_workers: int, use_gpu: bool):
        self.config, self.num_workers, self.use_gpu = config, num_workers, use_gpu
        self.failures = 0
        self.pg = None
        self.host_pg = enclosing_placement_group()  # `n2n sweep`: the trial's own placement group
        if use_gpu and self.host_pg is None:
            self.pg = self._reserve_gpus()
        self.actors = [self._start(i) for i in range(num_workers)]
        try:
            self.placement = self._ready(self.actors)
        except BaseException:
            self.shutdown()
            raise

    # -- placement --------------------------------------------------------------
    def _reserve_gpus(self):
        n, cpus = self.num_workers, self.config.cpus_per_worker
        have = ray.cluster_resources().get("GPU", 0)
        if have < n:
            raise PlacementError(
                f"asked for {n} GPU workers but the Ray cluster has {have:g} GPUs in all; "
                f"pass --workers {int(have)} (or fewer), --device cpu, or add GPU nodes")
        pg = placement_group([{"CPU": cpus, "GPU": 1}] * n, strategy="PACK", name="")
        ready, _ = ray.wait([pg.ready()], timeout=self.config.placement_timeout)
        if not ready:
            available = ray.available_resources().get("GPU", 0)
            remove_placement_group(pg)
            raise PlacementError(
                f"could not reserve {n} bundles of {{CPU: {cpus:g}, GPU: 1}} within "
                f"{self.config.placement_timeout:g} s: the cluster has {have:g} GPUs, {available:g} free "
                f"(others in use?); pass fewer --workers or a longer --placement-timeout")
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
        return RemoteGradientWorker.options(**options).remote(self.config, threads=max(1, int(cpus)))

    def _ready(self, actors) -> list[dict]:
        """Wait until the actors are constructed; returns where each runs."""
        refs = [a.describe.remote() for a in actors]
        done, pending = ray.wait(refs, num_returns=len(refs), timeout=self.config.placement_timeout)
        if pending:
            raise PlacementError(
                f"{len(pending)} of {len(refs)} workers did not start within {self.config.placement_timeout:g} s "
                f"({self.config.cpus_per_worker:g} CPU{' + 1 GPU' if self.use_gpu else ''} each); cluster "
                f"resources: {ray.cluster_resources()}, free: {ray.available_resources()}")
        return ray.get(refs)

    def _replace(self, index: int, error: BaseException) -> None:
        self.failures += 1
        if self.failures > self.config.max_failures:
            raise WorkerFailureError(
                f"worker {index} failed and the failure budget is spent ({self.config.max_failures} "
                f"replacements already): {type(error).__name__}: {error}") from error
        log.warning("worker %d died (%s); starting a replacement (%d of %d failures)", index,
                    type(error).__name__, self.failures, self.config.max_failures)
        try:
            ray.kill(self.actors[index], no_restart=True)
        except Exception:  # already gone
            pass
        self.actors[index] = self._start(index)
        self.placement[index] = self._ready([self.actors[index]])[0]

    # -- one step -----------------------------------------------------------------
    def gradients(self, weights: dict, step: int) -> list[tuple[dict, float, int]]:
        """Every shard's (grads, loss_sum, count) for `step`, in worker order.

        The weights go into the object store once; a dead worker is replaced, the
        weights are put again and its shard is redone (the result is the same: `grads`
        is a pure function of weights, step and positions).
        """
        n = self.num_workers
        shards = [shard_positions(self.config.batch_size, n, i) for i in range(n)]
        weights_ref = ray.put(weights)
        pending = {i: self.actors[i].grads.remote(weights_ref, step, shards[i]) for i in range(n)}
        results: dict[int, tuple] = {}
        while pending:
            index, ref = next(iter(pending.items()))
            try:
                results[index] = ray.get(ref)
                del pending[index]
            except WORKER_FAILURES as e:
                self._replace(index, e)
                weights_ref = ray.put(weights)
                pending[index] = self.actors[index].grads.remote(weights_ref, step, shards[index])
        return [results[i] for i in range(n)]

    def shutdown(self) -> None:
        for actor in self.actors:
            try:
                ray.kill(actor, no_restart=True)
            except Exception:
                pass
        self.actors = []
        if self.pg is not None:
            try:
                remove_placement_group(self.pg)
            except Exception:
                pass
            self.pg = None
