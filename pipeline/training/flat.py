"""One contiguous buffer for a model's weights and one for its gradients, and their wire format.

`FlatParameters(model)` re-binds every `Parameter`'s `data` and `grad` to views into two
1-D buffers (parameters in `named_parameters()` order, each flattened row-major). The
driver then puts its weights into Ray's object store as one array with no copy of its
own, a worker loads them with one copy, and a worker's backward pass accumulates its
gradients straight into one buffer that leaves the process as a single object.

On the wire (between workers, node reducers and the driver) a buffer is a 1-D numpy
array: Ray hands numpy arrays over without pickling them (a reader on the same node
maps the object store's memory, no copy), where a torch tensor is pickled and copied
(about 6x slower to put, and slower still to get, for 64 MB on the benchmark machine).
Gradients travel in the run's dtype, or as bfloat16 (`gradient_dtype="bfloat16"`,
half the bytes; numpy has no bfloat16, so they travel as their int16 bit patterns) and
are summed in the run's dtype (float32 or float64), never in bfloat16.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import numpy as np
import torch

from n2n_core.module import Module

WIRE_BF16 = np.dtype(np.int16)  # a bfloat16 buffer travels as its bit patterns


class FlatParameters:
    """The parameters of `model` as views into `weights` and `grads`, each of shape (P,).

    After this, `p.data` and `p.grad` of every parameter are slices of the two buffers:
    writing `weights` changes the model, and a backward pass fills `grads`. (Code that
    re-binds `p.data` or `p.grad`, such as `Module.to`, breaks the link: flatten after
    moving the model.)
    """

    def __init__(self, model: Module):
        params = [p for _, p in model.named_parameters()]
        if not params:
            raise ValueError("FlatParameters: the model has no parameters")
        first = params[0].data
        self.size = sum(p.numel() for p in params)
        self.weights = torch.empty(self.size, dtype=first.dtype, device=first.device)
        self.grads = torch.zeros(self.size, dtype=first.dtype, device=first.device)
        offset = 0
        for p in params:
            n = p.numel()
            weight = self.weights[offset:offset + n].view(p.shape)
            weight.copy_(p.data)
            p.data = weight
            p.grad = self.grads[offset:offset + n].view(p.shape)
            offset += n

    @classmethod
    def over(cls, model: Module, weights: torch.Tensor, grads: torch.Tensor) -> "FlatParameters":
        """Re-bind the model's parameters to views of the given (P,) buffers, copying nothing.

        For memory shared with other processes (pipeline.training.overlap): the weights are
        whatever the buffer holds, and backward writes the gradients into `grads`.
        """
        params = [p for _, p in model.named_parameters()]
        size = sum(p.numel() for p in params)
        for name, t in (("weights", weights), ("grads", grads)):
            if t.shape != (size,) or t.dtype != params[0].dtype or t.device != params[0].device:
                raise ValueError(f"FlatParameters.over: {name} must be ({size},) {params[0].dtype} on "
                                 f"{params[0].device}, got {tuple(t.shape)} {t.dtype} on {t.device}")
        flat = cls.__new__(cls)
        flat.size, flat.weights, flat.grads = size, weights, grads
        offset = 0
        for p in params:
            n = p.numel()
            p.data = weights[offset:offset + n].view(p.shape)
            p.grad = grads[offset:offset + n].view(p.shape)
            offset += n
        return flat

    def load(self, weights: torch.Tensor) -> None:
        """Copy a flat weight buffer (P,) of any device and float dtype into the model."""
        if weights.shape != (self.size,):
            raise ValueError(f"FlatParameters.load: expected ({self.size},) weights, got {tuple(weights.shape)}")
        self.weights.copy_(weights)


def to_wire(t: torch.Tensor, gradient_dtype: str = "same") -> np.ndarray:
    """A 1-D tensor (any device) as a 1-D numpy array for Ray: its dtype, or bfloat16 bits."""
    if gradient_dtype == "bfloat16":
        return t.detach().to(torch.bfloat16).to("cpu").view(torch.int16).numpy()
    return t.detach().to("cpu").numpy()


def from_wire(a: np.ndarray) -> torch.Tensor:
    """The tensor (1-D, CPU) of a wire array, sharing its memory; never write to it.

    Arrays that Ray returns map its object store read-only; torch warns about that
    (it cannot mark a tensor read-only), which is moot here: the tensor is only read.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        t = torch.from_numpy(a)
    return t.view(torch.bfloat16) if a.dtype == WIRE_BF16 else t


@dataclass
class StepGradients:
    """What a pool of workers returns for one step, before the driver's division by `count`.

    `parts` are (wire buffer (P,), weight) pairs whose weighted sum is the sum over the
    global batch of each row's gradient: a node reducer's sum (weight 1) or one worker's
    mean gradient (weight = its row count). Their order is fixed by the pool (by the
    first worker index each covers), so a run repeats its own rounding exactly.
    """

    parts: list = field(default_factory=list)
    loss_sum: float = 0.0
    count: int = 0

    def mean_into(self, out: torch.Tensor) -> float:
        """Write the batch's mean gradient into `out` (P,); returns the batch's mean loss."""
        weighted_sum(self.parts, out)
        out.div_(self.count)
        return self.loss_sum / self.count


def weighted_sum(parts, out: torch.Tensor) -> torch.Tensor:
    """out = sum of weight * buffer over `parts` [(wire array, weight)], in that order, in out's dtype.

    The order is the caller's, so that a run adds the same numbers in the same order
    every time (floating-point addition is not associative).
    """
    out.zero_()
    for buffer, weight in parts:
        out.add_(from_wire(buffer), alpha=weight)
    return out


class SerialStep:
    """`step` for a pool whose `gradients(weights, step)` returns a whole step's StepGradients: the
    driver waits for all of them, takes their mean and steps every parameter at once."""

    def step(self, step: int, flat: "FlatParameters", optimizer, go_on) -> float:
        """One optimizer step at `step`; `go_on()` is asked once (the pool has no next step to start)."""
        loss = self.gradients(flat.weights, step).mean_into(flat.grads)
        optimizer.step()
        go_on()
        return loss

