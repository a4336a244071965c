"""Optimizers `SGD` and `Adam`, with PyTorch's optimizers' update rules.

An optimizer holds a list of `Parameter`s and reads each one's `.grad`; it never looks
at layer types. Per-parameter state (momentum buffers, Adam moments and step counts)
is keyed by the parameter's index in that list. `lr` is a plain mutable attribute, so
a schedule just assigns `optimizer.lr = ...` between steps.

`state_dict()` returns only tensors, numbers, strings, lists and dicts:
    {"type": "SGD" | "Adam",
     "hyperparams": {"lr": ..., ...},            # betas as a list
     "state": {index: {"momentum_buffer": Tensor} | {"step": int, "exp_avg": Tensor,
                                                     "exp_avg_sq": Tensor}}}
`load_state_dict` restores hyper-parameters (lr included, like torch) and state,
checking the type, the parameter indices and the tensor shapes.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from n2n_core.module import Parameter


def _check_number(name: str, value, *, low: float = 0.0, high: float | None = None, high_open=False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"invalid {name}: {value!r} (a finite number is required)")
    if value < low or (high is not None and (value >= high if high_open else value > high)):
        bound = f"[{low}, {high})" if high_open else f"[{low}, {high}]" if high is not None else f">= {low}"
        raise ValueError(f"invalid {name}: {value!r} (must be {bound})")
    return float(value)


class Optimizer:
    """Base class: the parameter list, `zero_grad`, and state (de)serialization."""

    _hyper_names: tuple[str, ...] = ()
    _state_tensors: tuple[str, ...] = ()

    def __init__(self, params) -> None:
        params = list(params)
        if not params:
            raise ValueError(f"{type(self).__name__} got an empty parameter list")
        for i, p in enumerate(params):
            if not isinstance(p, Parameter):
                raise TypeError(f"{type(self).__name__}: parameter {i} is a {type(p).__name__}, not a Parameter")
        if len({id(p) for p in params}) != len(params):
            raise ValueError(f"{type(self).__name__}: a parameter appears more than once in the list")
        self.params: list[Parameter] = params
        self.state: dict[int, dict] = {}

    def zero_grad(self) -> None:
        for p in self.params:
            p.zero_grad()

    def step(self) -> None:
        raise NotImplementedError

    # -- state ------------------------------------------------------------------
    def hyperparams(self) -> dict:
        out = {}
        for name in self._hyper_names:
            value = getattr(self, name)
            out[name] = list(value) if isinstance(value, tuple) else value
        return out

    def state_dict(self) -> dict:
        """Hyper-parameters and per-parameter state (tensors are clones)."""
        state = {}
        for index, entry in self.state.items():
            state[index] = {k: (v.clone() if isinstance(v, Tensor) else v) for k, v in entry.items()}
        return {"type": type(self).__name__, "hyperparams": self.hyperparams(), "state": state}

    def load_state_dict(self, state_dict: dict) -> None:
        name = type(self).__name__
        if not isinstance(state_dict, dict) or state_dict.get("type") != name:
            got = state_dict.get("type") if isinstance(state_dict, dict) else type(state_dict).__name__
            raise ValueError(f"{name}.load_state_dict: state is for {got!r}, not {name!r}")
        hyper = state_dict.get("hyperparams")
        if not isinstance(hyper, dict) or set(hyper) != set(self._hyper_names):
            raise ValueError(
                f"{name}.load_state_dict: hyperparams keys {sorted(hyper) if isinstance(hyper, dict) else hyper!r}, "
                f"expected {sorted(self._hyper_names)}"
            )
        entries = state_dict.get("state")
        if not isinstance(entries, dict):
            raise ValueError(f"{name}.load_state_dict: 'state' must be a dict")
        new_state: dict[int, dict] = {}
        for key, entry in entries.items():
            try:
                index = int(key)
            except (TypeError, ValueError):
                raise ValueError(f"{name}.load_state_dict: state key {key!r} is not a parameter index") from None
            if not 0 <= index < len(self.params):
                raise ValueError(
                    f"{name}.load_state_dict: state for parameter {index}, but the optimizer has {len(self.params)}"
                )
            if not isinstance(entry, dict):
                raise ValueError(f"{name}.load_state_dict: state[{index}] must be a dict")
            param = self.params[index]
            restored = {}
            for k, v in entry.items():
                if k in self._state_tensors:
                    if not isinstance(v, Tensor) or tuple(v.shape) != tuple(param.shape):
                        shape = tuple(v.shape) if isinstance(v, Tensor) else type(v).__name__
                        raise ValueError(
                            f"{name}.load_state_dict: state[{index}][{k!r}] is {shape}, "
                            f"parameter {index} has shape {tuple(param.shape)}"
                        )
                    restored[k] = v.detach().to(device=param.device, dtype=param.dtype).clone()
                elif k == "step":
                    if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                        raise ValueError(f"{name}.load_state_dict: state[{index}]['step'] = {v!r} is not a count")
                    restored[k] = v
                else:
                    raise ValueError(f"{name}.load_state_dict: unknown state entry {k!r} for parameter {index}")
            new_state[index] = restored
        # validate hyper-parameters by building a fresh optimizer of the same kind
        type(self)([Parameter(torch.zeros(1))], **{k: (tuple(v) if isinstance(v, list) else v) for k, v in hyper.items()})
        for k, v in hyper.items():
            setattr(self, k, tuple(v) if isinstance(v, list) else v)
        self.state = new_state

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v}" for k, v in self.hyperparams().items())
        return f"{type(self).__name__}({len(self.params)} parameters, {args})"


class SGD(Optimizer):
    """Stochastic gradient descent with optional momentum, Nesterov and weight decay.

    Per parameter p with gradient g (PyTorch's SGD, dampening = 0):
        g = g + weight_decay * p                       if weight_decay != 0
        buf = g (first step) | momentum * buf + g      if momentum != 0
        g = g + momentum * buf  (Nesterov)  |  buf     if momentum != 0
        p = p - lr * g
    """

    _hyper_names = ("lr", "momentum", "nesterov", "weight_decay")
    _state_tensors = ("momentum_buffer",)

    def __init__(self, params, lr: float, momentum: float = 0.0, nesterov: bool = False, weight_decay: float = 0.0):
        super().__init__(params)
        self.lr = _check_number("learning rate", lr)
        self.momentum = _check_number("momentum", momentum)
        self.weight_decay = _check_number("weight_decay", weight_decay)
        if not isinstance(nesterov, bool):
            raise ValueError(f"invalid nesterov: {nesterov!r} (must be a bool)")
        if nesterov and self.momentum == 0:
            raise ValueError("Nesterov momentum requires a momentum > 0")
        self.nesterov = nesterov

    def step(self) -> None:
        lr, momentum, wd = self.lr, self.momentum, self.weight_decay
        for index, p in enumerate(self.params):
            grad = p.grad
            if wd != 0:
                grad = grad.add(p.data, alpha=wd)
            if momentum != 0:
                state = self.state.setdefault(index, {})
                buf = state.get("momentum_buffer")
                if buf is None:
                    buf = grad.clone()
                    state["momentum_buffer"] = buf
                else:
                    buf.mul_(momentum).add_(grad)
                grad = grad.add(buf, alpha=momentum) if self.nesterov else buf
            p.data.add_(grad, alpha=-lr)


class Adam(Optimizer):
    """Adam (Kingma & Ba) as PyTorch's Adam, weight decay as L2 added to the gradient.

    Per parameter p with gradient g, at step t = 1, 2, ...:
        g = g + weight_decay * p                       if weight_decay != 0
        m = m + (1 - beta1) (g - m)                    (lerp)
        v = beta2 v + (1 - beta2) g^2
        p = p - lr / (1 - beta1^t) * m / (sqrt(v) / sqrt(1 - beta2^t) + eps)
    """

    _hyper_names = ("lr", "betas", "eps", "weight_decay")
    _state_tensors = ("exp_avg", "exp_avg_sq")

    def __init__(self, params, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8, weight_decay: float = 0.0):
        super().__init__(params)
        self.lr = _check_number("learning rate", lr)
        self.eps = _check_number("epsilon value", eps)
        self.weight_decay = _check_number("weight_decay", weight_decay)
        if not isinstance(betas, (tuple, list)) or len(betas) != 2:
            raise ValueError(f"invalid betas: {betas!r} (a pair is required)")
        self.betas = (
            _check_number("beta parameter at index 0", betas[0], high=1.0, high_open=True),
            _check_number("beta parameter at index 1", betas[1], high=1.0, high_open=True),
        )

    def step(self) -> None:
        lr, (beta1, beta2), eps, wd = self.lr, self.betas, self.eps, self.weight_decay
        for index, p in enumerate(self.params):
            grad = p.grad
            state = self.state.get(index)
            if state is None:
                state = {"step": 0, "exp_avg": torch.zeros_like(p.data), "exp_avg_sq": torch.zeros_like(p.data)}
                self.state[index] = state
            state["step"] += 1
            step = state["step"]
            if wd != 0:
                grad = grad.add(p.data, alpha=wd)
            exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
            exp_avg.lerp_(grad, 1 - beta1)
            exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
            step_size = lr / (1 - beta1**step)
            bias_correction2_sqrt = (1 - beta2**step) ** 0.5
            denom = (exp_avg_sq.sqrt() / bias_correction2_sqrt).add_(eps)
            p.data.addcdiv_(exp_avg, denom, value=-step_size)
