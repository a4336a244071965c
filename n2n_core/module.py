"""The module contract: `Parameter` (a tensor and its gradient) and `Module`.

Every layer of n2n_core is a `Module` with an explicit `forward` that keeps what its
`backward` needs, and a `backward(grad_output) -> grad_input` that *adds* each
parameter's gradient into `Parameter.grad` (so gradients of several backward passes
accumulate until `zero_grad`). Parameters and child modules are registered when they
are assigned as attributes, in assignment order, and `state_dict` walks them into
dotted keys exactly as PyTorch's modules do ("enc_conv0.weight", "0.bias", ...), so weights
copy one to one between an n2n module and its PyTorch twin.

Gradient hooks: `Parameter.register_post_accumulate_grad_hook(hook)` (torch's name) calls
`hook(parameter)` each time a layer has added a backward pass's gradient into it
(`Parameter.accumulate`). Each parameter is used once per forward in n2n's layers, so the
call says that its gradient for this pass is complete: a data-parallel worker sends a
bucket of gradients as soon as backward has finished it (pipeline/training/overlap).

Decision: a module in `eval()` mode keeps nothing for backward (inference on large
images then costs no extra memory), and `backward` after an eval-mode forward raises.
None of our layers behaves differently in train and eval mode otherwise.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Iterator

import torch
from torch import Tensor


class HookHandle:
    """What `register_post_accumulate_grad_hook` returns: `remove()` unregisters the hook."""

    __slots__ = ("_hooks", "_hook")

    def __init__(self, hooks: list, hook):
        self._hooks, self._hook = hooks, hook

    def remove(self) -> None:
        if self._hook in self._hooks:
            self._hooks.remove(self._hook)


class Parameter:
    """A trainable tensor `data` and the gradient `grad` accumulated into it.

    `grad` always exists, has the shape, dtype and device of `data`, and starts at zero.
    Layers add their gradients with `accumulate`, which then calls the parameter's
    post-accumulate hooks.
    """

    __slots__ = ("data", "grad", "_grad_hooks")

    def __init__(self, data: Tensor):
        if not isinstance(data, Tensor):
            raise TypeError(f"Parameter needs a torch.Tensor, got {type(data).__name__}")
        self.data = data
        self.grad = torch.zeros_like(data)
        self._grad_hooks: list = []

    def accumulate(self, grad: Tensor) -> None:
        """Add a backward pass's gradient into `grad` (in place), then call the hooks with this parameter."""
        self.grad += grad
        for hook in tuple(self._grad_hooks):
            hook(self)

    def register_post_accumulate_grad_hook(self, hook) -> HookHandle:
        """Call `hook(parameter)` after every `accumulate`, in the order hooks were registered."""
        if not callable(hook):
            raise TypeError(f"a gradient hook must be callable, got {type(hook).__name__}")
        self._grad_hooks.append(hook)
        return HookHandle(self._grad_hooks, hook)

    @property
    def shape(self) -> torch.Size:
        return self.data.shape

    @property
    def dtype(self) -> torch.dtype:
        return self.data.dtype

    @property
    def device(self) -> torch.device:
        return self.data.device

    def numel(self) -> int:
        return self.data.numel()

    def zero_grad(self) -> None:
        self.grad.zero_()

    def to(self, device=None, dtype=None) -> "Parameter":
        self.data = self.data.to(device=device, dtype=dtype)
        self.grad = self.grad.to(device=device, dtype=dtype)
        return self

    def __repr__(self) -> str:
        return f"Parameter(shape={tuple(self.data.shape)}, dtype={self.data.dtype}, device={self.data.device})"


class Module:
    """Base class of every layer and network.

    Subclasses set parameters and children as attributes and implement `forward` and
    `backward`. Attributes:
        training: True after `train()` (the default), False after `eval()`.
    """

    def __init__(self) -> None:
        object.__setattr__(self, "_parameters", OrderedDict())
        object.__setattr__(self, "_modules", OrderedDict())
        object.__setattr__(self, "training", True)

    # -- registration ---------------------------------------------------------
    def __setattr__(self, name: str, value) -> None:
        if "_parameters" not in self.__dict__:
            raise RuntimeError(f"{type(self).__name__}.__init__ must call super().__init__() first")
        self._parameters.pop(name, None)
        self._modules.pop(name, None)
        if isinstance(value, Parameter):
            self._parameters[name] = value
        elif isinstance(value, Module):
            self._modules[name] = value
        object.__setattr__(self, name, value)

    def __delattr__(self, name: str) -> None:
        self._parameters.pop(name, None)
        self._modules.pop(name, None)
        object.__delattr__(self, name)

    # -- computation ----------------------------------------------------------
    def __call__(self, *args, **kwargs):
        return self.forward(*args, **kwargs)

    def forward(self, *args, **kwargs):
        raise NotImplementedError(f"{type(self).__name__} does not implement forward")

    def backward(self, grad_output):
        raise NotImplementedError(f"{type(self).__name__} does not implement backward")

    def _saved(self, value, what: str = "its input"):
        """Return a value cached by forward, or raise a clear error if there is none."""
        if value is None:
            raise RuntimeError(
                f"{type(self).__name__}.backward called without a training-mode forward "
                f"(no {what} was kept; call model.train() before forward)"
            )
        return value

    # -- traversal ------------------------------------------------------------
    def children(self) -> Iterator["Module"]:
        return iter(self._modules.values())

    def named_children(self) -> Iterator[tuple[str, "Module"]]:
        return iter(self._modules.items())

    def named_modules(self, prefix: str = "") -> Iterator[tuple[str, "Module"]]:
        yield prefix, self
        for name, child in self._modules.items():
            yield from child.named_modules(f"{prefix}.{name}" if prefix else name)

    def modules(self) -> Iterator["Module"]:
        for _, module in self.named_modules():
            yield module

    def named_parameters(self, prefix: str = "") -> Iterator[tuple[str, Parameter]]:
        for name, param in self._parameters.items():
            yield (f"{prefix}.{name}" if prefix else name), param
        for name, child in self._modules.items():
            yield from child.named_parameters(f"{prefix}.{name}" if prefix else name)

    def parameters(self) -> list[Parameter]:
        return [p for _, p in self.named_parameters()]

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def zero_grad(self) -> None:
        for p in self.parameters():
            p.zero_grad()

    # -- state ----------------------------------------------------------------
    def state_dict(self) -> "OrderedDict[str, Tensor]":
        """Dotted name -> the parameter's tensor (a reference, like torch; clone to keep)."""
        return OrderedDict((name, p.data) for name, p in self.named_parameters())

    def load_state_dict(self, state: dict, strict: bool = True) -> tuple[list[str], list[str]]:
        """Copy tensors into the parameters in place; returns (missing, unexpected) keys.

        With strict=True, missing or unexpected keys raise a KeyError listing them all.
        A shape mismatch always raises, naming the key and both shapes.
        """
        own = dict(self.named_parameters())
        missing = [k for k in own if k not in state]
        unexpected = [k for k in state if k not in own]
        if strict and (missing or unexpected):
            raise KeyError(
                f"{type(self).__name__}.load_state_dict: missing keys {missing}, unexpected keys {unexpected}"
            )
        for key, param in own.items():
            if key not in state:
                continue
            value = state[key]
            if not isinstance(value, Tensor):
                raise TypeError(f"load_state_dict: {key!r} is a {type(value).__name__}, not a tensor")
            if tuple(value.shape) != tuple(param.data.shape):
                raise ValueError(
                    f"load_state_dict: {key!r} has shape {tuple(value.shape)}, "
                    f"the module expects {tuple(param.data.shape)}"
                )
            param.data.copy_(value)
        return missing, unexpected

    def to(self, device=None, dtype=None) -> "Module":
        for p in self.parameters():
            p.to(device=device, dtype=dtype)
        return self

    def train(self, mode: bool = True) -> "Module":
        for module in self.modules():
            object.__setattr__(module, "training", bool(mode))
            module._on_mode_change()
        return self

    def eval(self) -> "Module":
        return self.train(False)

    def _on_mode_change(self) -> None:
        """Hook for layers that drop cached tensors when leaving training mode."""

    # -- printing -------------------------------------------------------------
    def extra_repr(self) -> str:
        return ""

    def __repr__(self) -> str:
        lines = [f"{type(self).__name__}({self.extra_repr()}"]
        if self._modules:
            for name, child in self._modules.items():
                child_repr = repr(child).replace("\n", "\n  ")
                lines.append(f"\n  ({name}): {child_repr}")
            lines.append("\n")
        lines.append(")")
        return "".join(lines)


class Sequential(Module):
    """Modules applied in order; backward runs them in reverse.

    Children are named "0", "1", ... so state-dict keys match PyTorch's Sequential.
    """

    def __init__(self, *modules: Module):
        super().__init__()
        for index, module in enumerate(modules):
            if not isinstance(module, Module):
                raise TypeError(f"Sequential item {index} is a {type(module).__name__}, not a Module")
            setattr(self, str(index), module)

    def __len__(self) -> int:
        return len(self._modules)

    def __getitem__(self, index: int) -> Module:
        return list(self._modules.values())[index]

    def __iter__(self) -> Iterator[Module]:
        return iter(self._modules.values())

    def forward(self, x):
        for module in self._modules.values():
            x = module(x)
        return x

    def backward(self, grad_output, input_grad: bool = True):
        """Every module's backward, last first; with `input_grad=False` the first module (a
        convolution: its backward takes `input_grad`) skips the input's gradient and None is returned."""
        modules = list(self._modules.values())
        for i in reversed(range(len(modules))):
            if i == 0 and not input_grad:
                return modules[0].backward(grad_output, input_grad=False)
            grad_output = modules[i].backward(grad_output)
        return grad_output if input_grad else None
