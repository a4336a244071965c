"""LocalPool: the gradient replica of a run without Ray, in the driver's process.

`n2n train --no-ray` trains one replica here, on the first GPU when there is one.
It has the WorkerPool's interface (`placement`, `failures`, `step`, `shutdown`)
and computes the same thing as one Ray actor: the gradients of the whole global batch
of each step. Batches, checkpoints and the optimizer are the driver's as with Ray, so a
run may switch between the two when it resumes. Use it for one GPU (no Ray process
start-up, no object-store copies) or to debug; a cluster needs Ray.

While a step computes, a thread draws the next step's batch (pipeline.training.prefetch).
"""
from __future__ import annotations

from pipeline.data.patches import shard_positions
from pipeline.training.config import TrainConfig
from pipeline.training.flat import SerialStep, StepGradients, to_wire
from pipeline.training.worker import GradientWorker, local_device


class LocalPool(SerialStep):
    """One in-process replica with WorkerPool's interface (never fails over)."""

    def __init__(self, config: TrainConfig):
        self.config = config
        self.worker = GradientWorker(config, threads=None, device=local_device(config))
        self.num_workers = 1
        self.failures = 0
        self.placement = [self.worker.describe()]
        self._positions = shard_positions(config.rows_per_step, 1, 0)

    def gradients(self, weights, step: int) -> StepGradients:
        """The whole batch of `step` as one part (see GradientWorker.grads); weights (P,)."""
        self.worker.flat.load(weights)
        loss_sum, count = self.worker.compute(step, self._positions)
        grads = to_wire(self.worker.flat.grads, self.config.gradient_dtype)
        return StepGradients(parts=[(grads, count)], loss_sum=loss_sum, count=count)

    def shutdown(self) -> None:
        if self.worker is not None:
            self.worker.prefetch.close()
        self.worker = None
