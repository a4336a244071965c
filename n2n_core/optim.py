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

Flat parameters. When the parameters' `data` lie back to back in one 1-D storage, in
list order, and so do their `grad`s (what `pipeline.training.flat.FlatParameters`
makes of a model), `step` updates all of them at once: each update is a handful of
tensor operations over (P,) buffers instead of a handful per parameter, and the
per-parameter state tensors become views into one (P,) buffer each. Every value goes
through the same operations as in the per-parameter loop, in the same order, so the two
give the same numbers (tests compare them bit for bit); `state_dict` has the same
per-parameter form either way, so a checkpoint saved by one loads into the other.
`flat=False` keeps the loop. An optimizer checks before every step that the
parameters' tensors are still the ones it found flat (a parameter re-bound by
`Module.to`, say, sends it back to the loop).

A span of parameters. `step(span=range(i, j))` updates parameters i..j-1 only (their
state counts one step more; the others wait). The update of every value is elementwise,
so stepping a model span by span, each span once, gives exactly the numbers of one
`step()`: a data-parallel driver steps each bucket of gradients as it arrives
(pipeline/training/overlap) while the workers still compute the rest.
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


def flat_span(tensors: list[Tensor]) -> Tensor | None:
    """One 1-D tensor over all of `tensors`, when they lie back to back in one storage.

    They must be contiguous, of one dtype and device, each starting where the previous
    one ends, in list order. The span shares their memory: writing it writes them.
    Returns None when they do not lie so.
    """
    first = tensors[0]
    storage_ptr = first.untyped_storage().data_ptr()
    start = end = first.storage_offset()
    for t in tensors:
        if (t.dtype != first.dtype or t.device != first.device or not t.is_contiguous()
                or t.storage_offset() != end or t.untyped_storage().data_ptr() != storage_ptr):
            return None
        end += t.numel()
    return first.as_strided((end - start,), (1,), start)  # (P,)


class _FlatView:
    """The parameters' tensors as found flat: `data` and `grad` spans (P,), and the tensors they cover."""

    def __init__(self, params: list[Parameter], data: Tensor | None, grad: Tensor | None):
        self.datas = [p.data for p in params]
        self.grads = [p.grad for p in params]
        self.data, self.grad = data, grad
        self.offsets = [0]  # parameter i covers [offsets[i], offsets[i + 1]) of the spans
        for p in params:
            self.offsets.append(self.offsets[-1] + p.numel())
        self.state: dict[str, Tensor] = {}  # state name -> (P,) buffer, whose slices are the per-parameter entries
        self.pieces: dict[str, list[Tensor]] = {}  # state name -> those per-parameter slices, in order
        self.scratch: Tensor | None = None  # (P,) work buffer of the update

    def still(self, params: list[Parameter]) -> bool:
        """Whether every parameter still holds the tensors this view was made of."""
        return all(p.data is d and p.grad is g for p, d, g in zip(params, self.datas, self.grads))


class Optimizer:
    """Base class: the parameter list, `zero_grad`, state (de)serialization, and the flat view.

    Args:
        params: the `Parameter`s to update.
        flat: update flat parameters (see the module docstring) all at once; False: one
            parameter at a time, always.
    """

    _hyper_names: tuple[str, ...] = ()
    _state_tensors: tuple[str, ...] = ()

    def __init__(self, params, flat: bool = True) -> None:
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
        self.flat = bool(flat)
        self._view: _FlatView | None = None

    def _flat_view(self) -> _FlatView | None:
        """The flat view of the parameters, or None when they are not flat (or `flat` is False)."""
        if not self.flat:
            return None
        view = self._view
        if view is None or not view.still(self.params):
            data = flat_span([p.data for p in self.params])
            grad = flat_span([p.grad for p in self.params]) if data is not None else None
            if grad is not None and (grad.dtype != data.dtype or grad.device != data.device):
                grad = None
            view = self._view = _FlatView(self.params, data, grad)
        return view if view.grad is not None else None

    def _flat_state(self, view: _FlatView, names: tuple[str, ...], fresh: dict | None = None) -> dict | None:
        """The state tensors `names` of every parameter as slices of one (P,) buffer per name.

        Returns {name: buffer (P,)}; the per-parameter entries `self.state[i][name]` are then
        views into it. Entries that are not (after `load_state_dict`, or made by the
        per-parameter loop) are copied into new buffers once.

        Args:
            fresh: {name: initial (P,) buffer, taken as it is}, used when no parameter has
                state yet (the first step).

        Returns None, changing nothing, when some parameters lack the entries (or all do
        and `fresh` is None).
        """
        if not self.state and fresh is not None:
            self.state = {index: {} for index in range(len(self.params))}
            buffers, copy = fresh, False
        else:
            entries = [self.state.get(i) for i in range(len(self.params))]
            if any(entry is None or any(name not in entry for name in names) for entry in entries):
                return None
            if all(name in view.pieces and all(e[name] is piece for e, piece in zip(entries, view.pieces[name]))
                   for name in names):
                return view.state
            buffers, copy = {name: torch.empty_like(view.data) for name in names}, True
        view.state, view.pieces = {}, {}
        for name in names:
            buffer, pieces, offset = buffers[name], [], 0
            for index, p in enumerate(self.params):
                n = p.numel()
                piece = buffer[offset:offset + n].view(p.shape)
                entry = self.state[index]
                if copy:
                    piece.copy_(entry[name])
                entry[name] = piece
                pieces.append(piece)
                offset += n
            view.state[name], view.pieces[name] = buffer, pieces
        return view.state

    def zero_grad(self) -> None:
        for p in self.params:
            p.zero_grad()

    def step(self, span: range | None = None) -> None:
        """One update of the parameters `span` (a range of indices into the list; None: all)."""
        raise NotImplementedError

    def _span(self, span: range | None) -> range:
        n = len(self.params)
        if span is None:
            return range(n)
        if not isinstance(span, range) or span.step != 1 or not 0 <= span.start < span.stop <= n:
            raise ValueError(f"{type(self).__name__}.step: span must be a non-empty range(i, j) within the "
                             f"{n} parameters, got {span!r}")
        return span

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

    def __init__(self, params, lr: float, momentum: float = 0.0, nesterov: bool = False, weight_decay: float = 0.0,
                 flat: bool = True):
        super().__init__(params, flat=flat)
        self.lr = _check_number("learning rate", lr)
        self.momentum = _check_number("momentum", momentum)
        self.weight_decay = _check_number("weight_decay", weight_decay)
        if not isinstance(nesterov, bool):
            raise ValueError(f"invalid nesterov: {nesterov!r} (must be a bool)")
        if nesterov and self.momentum == 0:
            raise ValueError("Nesterov momentum requires a momentum > 0")
        self.nesterov = nesterov

    def step(self, span: range | None = None) -> None:
        span = self._span(span)
        view = self._flat_view()
        if view is not None and self._step_flat(view, span):
            return
        lr, momentum, wd = self.lr, self.momentum, self.weight_decay
        for index in span:
            p = self.params[index]
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

    def _step_flat(self, view: _FlatView, span: range) -> bool:
        """The loop's update on the (P,) spans at once (their part `span`); False (nothing done) when
        only some parameters have state."""
        lr, momentum, wd = self.lr, self.momentum, self.weight_decay
        lo, hi = view.offsets[span.start], view.offsets[span.stop]
        data, grad = view.data[lo:hi], view.grad[lo:hi]
        first = momentum != 0 and not self.state
        if first and len(span) != len(self.params):
            return False  # the loop starts the buffers of a part; they join the flat buffer once all exist
        if momentum != 0 and not first and self._flat_state(view, ("momentum_buffer",)) is None:
            return False
        if wd != 0:
            grad = grad.add(data, alpha=wd)
        if momentum != 0:
            if first:  # every buffer starts as its gradient
                buf = self._flat_state(view, ("momentum_buffer",), fresh={"momentum_buffer": grad.clone()})
                buf = buf["momentum_buffer"]
            else:
                buf = view.state["momentum_buffer"][lo:hi]
                buf.mul_(momentum).add_(grad)
            grad = grad.add(buf, alpha=momentum) if self.nesterov else buf
        data.add_(grad, alpha=-lr)
        return True


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

    def __init__(self, params, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8, weight_decay: float = 0.0,
                 flat: bool = True):
        super().__init__(params, flat=flat)
        self.lr = _check_number("learning rate", lr)
        self.eps = _check_number("epsilon value", eps)
        self.weight_decay = _check_number("weight_decay", weight_decay)
        if not isinstance(betas, (tuple, list)) or len(betas) != 2:
            raise ValueError(f"invalid betas: {betas!r} (a pair is required)")
        self.betas = (
            _check_number("beta parameter at index 0", betas[0], high=1.0, high_open=True),
            _check_number("beta parameter at index 1", betas[1], high=1.0, high_open=True),
        )

    def step(self, span: range | None = None) -> None:
        span = self._span(span)
        view = self._flat_view()
        if view is not None and self._step_flat(view, span):
            return
        lr, (beta1, beta2), eps, wd = self.lr, self.betas, self.eps, self.weight_decay
        for index in span:
            p = self.params[index]
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

    def _step_flat(self, view: _FlatView, span: range) -> bool:
        """The loop's update on the (P,) spans at once (their part `span`): the same operations on
        every value, in the same order. False (nothing done) when the parameters' state is partial
        or the span's parameters are at different steps."""
        lr, (beta1, beta2), eps, wd = self.lr, self.betas, self.eps, self.weight_decay
        if not self.state:
            self._flat_state(view, self._state_tensors,
                             fresh={name: torch.zeros_like(view.data) for name in self._state_tensors})
            for entry in self.state.values():
                entry["step"] = 0
        buffers = self._flat_state(view, self._state_tensors)
        if buffers is None:
            return False
        entries = [self.state[index] for index in span]
        steps = {entry.get("step") for entry in entries}
        if len(steps) != 1 or None in steps:
            return False
        step = steps.pop() + 1
        for entry in entries:
            entry["step"] = step
        lo, hi = view.offsets[span.start], view.offsets[span.stop]
        data, grad = view.data[lo:hi], view.grad[lo:hi]  # (P,) each, or the span's part
        if wd != 0:
            grad = grad.add(data, alpha=wd)
        exp_avg, exp_avg_sq = buffers["exp_avg"][lo:hi], buffers["exp_avg_sq"][lo:hi]
        exp_avg.lerp_(grad, 1 - beta1)
        exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        step_size = lr / (1 - beta1**step)
        bias_correction2_sqrt = (1 - beta2**step) ** 0.5
        if view.scratch is None:
            view.scratch = torch.empty_like(view.data)
        denom = torch.sqrt(exp_avg_sq, out=view.scratch[lo:hi])
        denom.div_(bias_correction2_sqrt).add_(eps)
        data.addcdiv_(exp_avg, denom, value=-step_size)
        return True
