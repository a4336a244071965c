"""LocalPool: the gradient replica of a run without Ray, in the driver's process.

`n2n train --no-ray` trains one replica here, on the first GPU when there is one.
It has the WorkerPool's interface (`placement`, `failures`, `gradients`, `shutdown`)
and computes the same thing as one Ray actor: the gradients of the whole global batch
of each step. Batches, checkpoints and the optimizer are the driver's as with Ray, so a
run may switch between the two when it resumes. Use it for one GPU (no Ray process
start-up, no object-store copies) or to debug; a cluster needs Ray.

While a step computes, a thread draws the next step's batch (batches depend only on the
step, so this changes no number; a GPU would otherwise wait for the CPU's crops and noise).
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

from pipeline.data.patches import shard_positions
from pipeline.training.config import TrainConfig
from pipeline.training.flat import StepGradients
from pipeline.training.worker import GradientWorker, local_device


class LocalPool:
    """One in-process replica with WorkerPool's interface (never fails over)."""

    def __init__(self, config: TrainConfig):
        self.config = config
        self.worker = GradientWorker(config, threads=None, device=local_device(config))
        self.num_workers = 1
        self.failures = 0
        self.placement = [self.worker.describe()]
        self._positions = shard_positions(config.batch_size, 1, 0)
        self._drawer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="n2n-batches")
        self._next = None  # (step, future of its batch)

    def _draw(self, step: int):
        return self._drawer.submit(self.worker.batches.batch, step, self._positions)

    def gradients(self, weights, step: int) -> StepGradients:
        """The whole batch of `step` as one part (see GradientWorker.grads); weights (P,)."""
        future = self._next[1] if self._next is not None and self._next[0] == step else self._draw(step)
        inputs, targets = future.result()
        self._next = (step + 1, self._draw(step + 1))
        grads, loss_sum, count = self.worker.grads_of(weights, inputs, targets)
        return StepGradients(parts=[(grads, count)], loss_sum=loss_sum, count=count)

    def shutdown(self) -> None:
        if self._next is not None:
            self._next[1].cancel()
        self._drawer.shutdown(wait=True)
        self.worker = None
