"""GradientWorker: one model replica computing shard gradients (a Ray actor, or in process).

Each actor builds its replica from the TrainConfig (on its own GPU when Ray gave it
one), opens the dataset itself, and for each step computes the gradients of its
positions of the global batch. Weights arrive and gradients leave as one flat buffer
each (`pipeline.training.flat`). `grads` is pure: its result depends only on
(weights, step, positions), so the driver can retry it on a fresh actor after a
failure and get exactly the same numbers.
"""
from __future__ import annotations

import os
import socket
import sys

import torch

from pipeline.cuda import LOGICAL_GPUS_ENV, cuda_problem, logical_gpus_allowed
from pipeline.training.config import TrainConfig
from pipeline.training.flat import FlatParameters, from_wire, to_wire
from pipeline.training.parts import make_batches, make_loss, make_model, shard_backward


def worker_device(config: TrainConfig) -> torch.device:
    """The device of this process: the GPU Ray assigned (visible as cuda:0), else the CPU.

    Ray sets CUDA_VISIBLE_DEVICES to the actor's GPUs, so its first assigned GPU is
    cuda:0 here. An actor Ray gave a GPU must be able to use it: CUDA not usable there is
    an error naming the host, not a quiet fallback to the CPU, unless N2N_LOGICAL_GPUS=1
    (tests of GPU placement with logical GPUs on a machine without one; pipeline.cuda).
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
    """One model replica; `grads(weights, step, positions)` for its shard of a step.

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
        self.loss_fn = make_loss(config)
        self.batches = make_batches(config)

    def describe(self) -> dict:
        """Where this replica runs: node (None outside Ray), host, pid, Ray GPU ids, CUDA_VISIBLE_DEVICES, device."""
        ray = _ray()
        node_id = ray.get_runtime_context().get_node_id() if ray is not None else None
        return {"node_id": node_id, "host": socket.gethostname(), "pid": os.getpid(),
                "gpu_ids": [str(g) for g in _ray_gpu_ids()],
                "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
                "device": str(self.device), "threads": torch.get_num_threads()}

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
        inputs, targets = self.batches.batch(step, positions)  # (n, 3, crop, crop) float32 each
        return self.grads_of(weights, inputs, targets)

    def grads_of(self, weights, inputs: torch.Tensor, targets: torch.Tensor):
        """`grads` on a batch already drawn: inputs, targets (n, 3, crop, crop) float32 on the CPU."""
        self.flat.load(from_wire(weights) if not isinstance(weights, torch.Tensor) else weights)
        dtype = self.config.torch_dtype
        inputs = inputs.to(device=self.device, dtype=dtype)
        targets = targets.to(device=self.device, dtype=dtype)
        loss_sum, count = shard_backward(self.model, self.loss_fn, inputs, targets)
        return to_wire(self.flat.grads, self.config.gradient_dtype), loss_sum, count
