"""GradientWorker: one model replica computing shard gradients (a Ray actor, or in process).

Each actor builds its replica from the TrainConfig (on its own GPU when Ray gave it
one), opens the dataset itself, and computes the gradients of its positions of each
step's global batch. It serves either of the driver's two steps:

- the serial step (`grads`): weights arrive and gradients leave as one flat buffer each
  (`pipeline.training.flat`) through Ray's object store, one call per step. `grads` is
  pure: its result depends only on (weights, step, positions), so the driver can retry it
  on a fresh actor after a failure and get exactly the same numbers.
- the overlapped step (`join`): the worker links to its node's reducer
  (pipeline.training.overlap) and computes a step whenever the node says GO, with the
  weights the driver streamed into the node's shared memory, sending each bucket of
  gradients as soon as backward has finished it, and the next step's batch drawn ahead.

`--accumulate K` runs K micro-batches per step (the rows of the worker's shard in K
parts) and adds their gradients: the step of a K-times larger batch in the memory of one.
"""
from __future__ import annotations

import os
import socket
import sys

import torch

from n2n_core.neighbor import NeighborLoss, NeighborSubsampler, unclipped_weight
from n2n_core.workspace import Workspace
from pipeline.runtime.cuda import LOGICAL_GPUS_ENV, cuda_problem, logical_gpus_allowed
from pipeline.data.patches import shard_positions
from pipeline.training.config import TrainConfig
from pipeline.training.flat import FlatParameters, from_wire, to_wire
from pipeline.training.replica import make_batches, make_loss, make_model
from pipeline.training.prefetch import BatchPrefetcher


def worker_device(config: TrainConfig) -> torch.device:
    """The device of this process: the GPU Ray assigned (visible as cuda:0), else the CPU.

    Ray sets CUDA_VISIBLE_DEVICES to the actor's GPUs, so its first assigned GPU is
    cuda:0 here. An actor Ray gave a GPU must be able to use it: CUDA not usable there is
    an error naming the host, not a quiet fallback to the CPU, unless N2N_LOGICAL_GPUS=1
    (tests of GPU placement with logical GPUs on a machine without one; pipeline.runtime.cuda).
    `device="cuda"` demands a Ray GPU; `"auto"` without one is a CPU actor.
    """
    if config.device == "cpu":
        return torch.device("cpu")
    gpu_ids = _ray_gpu_ids()
    if not gpu_ids:
        if config.device == "cuda":
            raise RuntimeError(f"device='cuda' but Ray gave this worker (host {socket.gethostname()}) no GPU")
        return torch.device("cpu")
    problem = cuda_problem()
    if problem is None:
        return torch.device("cuda", 0)
    if logical_gpus_allowed():
        return torch.device("cpu")
    raise RuntimeError(f"this worker holds Ray GPU {gpu_ids} on host {socket.gethostname()} but CUDA is not "
                       f"usable there: {problem} ({LOGICAL_GPUS_ENV}=1 lets logical GPUs compute on the CPU, "
                       f"for tests only)")


def _ray():
    """The ray module when this process already uses Ray (a Ray worker or driver), else None."""
    ray = sys.modules.get("ray")
    return ray if ray is not None and ray.is_initialized() else None


def _ray_gpu_ids() -> list:
    """The GPU ids Ray gave this process ([] outside a Ray worker or without Ray)."""
    ray = _ray()
    return ray.get_gpu_ids() if ray is not None else []


def local_device(config: TrainConfig) -> torch.device:
    """The device of an in-process run (`ray=False`): the first GPU when there is one (auto/cuda), else the CPU."""
    if config.device == "cpu":
        return torch.device("cpu")
    if torch.cuda.is_available() and torch.cuda.device_count() > 0:
        return torch.device("cuda", 0)
    if config.device == "cuda":
        raise RuntimeError("device='cuda' but torch.cuda.is_available() is False in this process")
    return torch.device("cpu")


class GradientWorker:
    """One model replica; `grads(weights, step, positions)` for its shard of a step, or `join` a node.

    Args:
        config: the run's TrainConfig (model, data, noise, dtype, device, threads).
        threads: torch intra-op threads of this actor (its reserved CPUs); None keeps the process's.
        device: where the replica lives; None: the GPU Ray gave this actor, else the CPU (`worker_device`).
    """

    def __init__(self, config: TrainConfig, threads: int | None = 1, device: torch.device | None = None):
        if threads is not None:
            torch.set_num_threads(max(1, int(threads)))
        self.config = config
        self.device = device if device is not None else worker_device(config)
        self.model = make_model(config, device=self.device)
        self.flat = FlatParameters(self.model)  # p.data, p.grad: views into two (P,) buffers
        self.own = self.flat                    # the replica's own buffers (the overlapped step may swap them)
        self.loss_fn = make_loss(config)
        self.workspace = Workspace()  # large CPU buffers kept across steps (n2n_core/workspace.py)
        self.subsampler = NeighborSubsampler().eval()  # its backward is never needed: no state kept
        self.nb_loss = NeighborLoss()
        self.batches = make_batches(config)
        self.prefetch = BatchPrefetcher(self.batches.batch)
        self.positions: range | None = None     # this worker's rows of each step (set by `join`)
        self.link = None                        # its WorkerLink while joined to a node
        self.plan = None                        # the run's BucketPlan while joined
        self.shared = None                      # (weights, slot) of the node, for a GPU replica's copies
        self._bucket_of: list[int] = []         # parameter index -> bucket
        self._left: list[int] | None = None     # parameters still to finish in each bucket, during backward
        self._on_bucket = None
        for index, p in enumerate(self.model.parameters()):
            p.register_post_accumulate_grad_hook(lambda param, index=index: self._param_done(index))

    def describe(self) -> dict:
        """Where this replica runs: node (None outside Ray), host, pid, Ray GPU ids, CUDA_VISIBLE_DEVICES, device."""
        ray = _ray()
        node_id = ray.get_runtime_context().get_node_id() if ray is not None else None
        return {"node_id": node_id, "host": socket.gethostname(), "pid": os.getpid(),
                "gpu_ids": [str(g) for g in _ray_gpu_ids()],
                "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
                "device": str(self.device), "threads": torch.get_num_threads()}

    # -- the serial step ------------------------------------------------------------------
    def grads(self, weights, step: int, positions: range):
        """Gradients of the mean loss over `positions` of the global batch of `step`.

        Args:
            weights: the driver's flat weights for this step, (P,) (a wire array, see
                pipeline.training.flat; or a tensor).
            step: the step (selects the batch rows; see pipeline.data.patches).
            positions: this worker's rows of the global batch (shard_positions).

        Returns:
            (grads: (P,) wire array in the config's `gradient_dtype`, loss_sum: float,
            count: int); weighted by count, the sum over shards divided by the batch
            size is the full batch's gradient.
        """
        if self.link is not None:
            raise RuntimeError("this worker is joined to an overlapped step: its weights are the node's")
        self.flat.load(from_wire(weights) if not isinstance(weights, torch.Tensor) else weights)
        loss_sum, count = self.compute(step, positions, ahead=False)
        return to_wire(self.flat.grads, self.config.gradient_dtype), loss_sum, count

    # -- both steps ----------------------------------------------------------------------
    def compute(self, step: int, positions: range, on_bucket=None, on_loss=None, ahead: bool = True
                ) -> tuple[float, int]:
        """Forward and backward of `positions` of step `step`'s batch with the weights the replica
        holds; the gradients land in its parameters' `grad`. See `forward_backward`.

        `ahead`: the batch was drawn on a thread while the previous step computed, and the next
        one is drawn now (pipeline.training.prefetch); False: drawn here (the serial step)."""
        if ahead:
            inputs, targets = self.prefetch.get(step, positions)  # (n, 3, crop, crop) float32 each
        else:
            inputs, targets = self.batches.batch(step, positions)
        return self.forward_backward(inputs, targets, on_bucket, on_loss, gamma=self.config.nb_gamma_at(step))

    def forward_backward(self, inputs: torch.Tensor, targets: torch.Tensor, on_bucket=None, on_loss=None,
                         gamma: float = 0.0) -> tuple[float, int]:
        """The mean loss's gradients over the rows, in `accumulate` micro-batches.

        Shape:
            inputs, targets: (n, C, H, W) float32 on the CPU (target "neighbor": targets are the
            rows' pair choices, (n, H/2, W/2) int64); returns (loss sum over the rows, n).

        `on_loss(loss_sum, n)` is called once the last forward pass is done, `on_bucket(b)` as
        the last backward pass finishes each bucket of the joined node's plan. `gamma`: the
        Neighbor2Neighbor regulariser's weight at this step.
        """
        with self.workspace:  # the large buffers of the last step, handed out again (no page faults)
            n = inputs.shape[0]
            chunks = [(x, y) for x, y in zip(inputs.tensor_split(self.config.accumulate),
                                             targets.tensor_split(self.config.accumulate)) if x.shape[0]]
            dtype = self.config.torch_dtype
            self.model.train()
            self.model.zero_grad()
            loss_sum = 0.0
            for j, (x, y) in enumerate(chunks):
                x = x.to(device=self.device, dtype=dtype)
                if self.config.target == "neighbor":
                    loss, grad = self._neighbor_loss(x, y.to(self.device), gamma)
                else:
                    y = y.to(device=self.device, dtype=dtype)
                    loss = self.loss_fn(self.model(x), y)  # the chunk's mean
                    grad = self.loss_fn.backward()
                loss_sum += float(loss) * x.shape[0]
                if len(chunks) > 1:  # the chunk's share of the mean over all n rows
                    grad = grad * (x.shape[0] / n)
                last = j == len(chunks) - 1
                if last:
                    if on_loss is not None:
                        on_loss(loss_sum, n)
                    self._arm(on_bucket)
                try:
                    self.model.backward(grad, input_grad=False)  # only the parameters' gradients
                finally:
                    if last:
                        self._disarm()
            return loss_sum, n

    def _neighbor_loss(self, y: torch.Tensor, pairs: torch.Tensor, gamma: float):
        """Neighbor2Neighbor on noisy images y (N, C, H, W): f(y) without gradient, the two neighbour
        sub-samples of y and of f(y) with the rows' pair choices (N, H/2, W/2), then f(g1(y)) kept for
        backward; returns (the loss, its gradient with respect to f(g1(y)))."""
        self.model.eval()  # keeps nothing for backward
        fy = self.model(y)
        self.model.train()
        g1_y, g2_y = self.subsampler(y, pairs)  # (N, C, H/2, W/2) each
        g1_fy, g2_fy = self.subsampler(fy, pairs)
        weight = unclipped_weight(g1_y) if self.config.nb_mask_clipped else None
        loss = self.nb_loss(self.model(g1_y), g2_y, g1_fy, g2_fy, gamma, weight)
        return loss, self.nb_loss.backward()

    # -- the overlapped step --------------------------------------------------------------
    def join(self, address: str, token: str, num_workers: int, index: int) -> bool:
        """Link to a node's reducer (a Ray call from the driver) as worker `index` of `num_workers`."""
        from pipeline.training.overlap.member import WorkerLink

        self.leave()
        self.positions = shard_positions(self.config.rows_per_step, num_workers, index)
        self.link = WorkerLink(self, address, token, index)
        return True

    def leave(self) -> None:
        if self.link is not None:
            link, self.link = self.link, None
            link.close()

    def attach_shared(self, weights: torch.Tensor, slot: torch.Tensor, plan) -> None:
        """The node's shared (P,) weights and this worker's (P,) gradient slot (WorkerLink)."""
        self.plan = plan
        self._bucket_of = [0] * len(self.model.parameters())
        for b, bucket in enumerate(plan.buckets):
            for index in bucket.params:
                self._bucket_of[index] = b
        if self.stages():  # copy each bucket in and out
            self.shared = (weights, slot)
        else:  # compute straight on the shared memory
            self.flat = FlatParameters.over(self.model, weights, slot)

    def stages(self) -> bool:
        """Whether the replica copies the node's weights and its gradients in and out (a GPU replica)
        instead of computing on the shared memory itself (a CPU replica)."""
        return self.device.type != "cpu"

    def detach_shared(self) -> None:
        if self.flat is not self.own:
            self.flat = FlatParameters.over(self.model, self.own.weights, self.own.grads)
        self.shared, self.plan = None, None

    def stage_weights(self, bucket) -> None:
        """A GPU replica copies a bucket of the node's weights in (CPU replicas compute on them)."""
        if self.shared is not None:
            self.flat.weights[bucket.lo:bucket.hi].copy_(self.shared[0][bucket.lo:bucket.hi])

    def _arm(self, on_bucket) -> None:
        if on_bucket is not None and self.plan is not None:
            self._left = [len(bucket.params) for bucket in self.plan.buckets]
            self._on_bucket = on_bucket

    def _param_done(self, index: int) -> None:
        """Hook: parameter `index` has its gradient for this pass; a finished bucket goes out."""
        if self._on_bucket is None:
            return
        b = self._bucket_of[index]
        self._left[b] -= 1
        if self._left[b] == 0:
            self._bucket_done(b)

    def _bucket_done(self, b: int) -> None:
        if self.shared is not None:  # GPU: the bucket's gradients into the shared slot first (waits for them)
            bucket = self.plan.buckets[b]
            self.shared[1][bucket.lo:bucket.hi].copy_(self.flat.grads[bucket.lo:bucket.hi])
        self._on_bucket(b)

    def _disarm(self) -> None:
        """After backward: a bucket whose parameters got no gradient (unused) goes out as it is."""
        if self._on_bucket is not None:
            for b, left in enumerate(self._left):
                if left > 0:
                    self._left[b] = 0
                    self._bucket_done(b)
        self._left, self._on_bucket = None, None
