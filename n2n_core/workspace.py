"""Large CPU buffers kept and handed out again: `Workspace`, and `empty`, the allocation the kernels use.

Why. A U-Net training step at batch 16 of 64x64 allocates about 110 MB of large buffers
(convolution outputs, padded inputs and gradients) and frees them by its end. The C library
hands buffers this large straight back to the system (glibc maps them with mmap, and maps a
buffer of a size it has seen freed afresh), so every page of such a buffer faults on its first
write: about 10,000 page faults a step, each a trip into the kernel inside a GEMM both threads
wait on (measured on a 2-core CPU: the first GEMM of a block into a fresh output took 330-500 us,
57 us into the same buffer once mapped). A `Workspace` keeps the buffers it handed out and hands
one out again once nothing references it any more: no fault after the first step.

How.
- `with workspace:` makes it the current workspace of this thread (a context variable, so
  other threads and outer code are unaffected).
- `empty(like, *shape)` is `like.new_empty(shape)` (contiguous, contents undefined) that takes,
  under a current workspace, the smallest free buffer with at least as many elements (best
  fit: a buffer held for one shape serves others), else allocates one and keeps it. What a
  workspace holds is above a plain run's peak all the same, since the C library also splits
  and joins freed blocks: for the default U-Net, 135 against about 115 MiB for a training
  step at batch 16 of 64x64, 228 against 163 MiB for a 512x512 inference.
- A buffer is free when no tensor shares its storage: the storage's reference count (views,
  the layout's `_n2n_padded` marks, a caller's output, a NumPy array over it: all hold a
  reference) equals the count of the lone buffer. A buffer is never handed out while any
  tensor can still read it.
- A buffer not handed out for `horizon` requests is released at the next allocation: a
  workspace holds about the working set of its recent calls, not of every shape it has seen.
- Not under a workspace, not on the CPU (CUDA's caching allocator does this already), or
  under the workspace's `min_elements` (default `MIN_ELEMENTS`: the C library's heap recycles
  small blocks): plain `new_empty`. Where torch lacks the storage reference count, nothing is
  reused.

Who enters one: the training workers and the denoising actors, for their life (pipeline/). A
model called outside a workspace allocates as before and keeps nothing after the call. A
workspace pays off over many calls of one size; for one call it costs: the buffers it holds
cannot serve the call's other allocations (bench/denoise.py's loop over 512x512 files, each
through `denoise_image` in a workspace of its own, ran at 0.80x the rate of plain calls).
"""
from __future__ import annotations

import math
import threading
from contextvars import ContextVar

import torch
from torch import Tensor

MIN_ELEMENTS = 1 << 15  # 128 KiB in float32 (glibc's first mmap threshold): below it, plain allocation
_use_count = getattr(torch._C, "_storage_Use_Count", None)  # None: no reuse (see the module docstring)
_current: ContextVar["Workspace | None"] = ContextVar("n2n_workspace", default=None)


def _references(t: Tensor) -> int:
    """References to t's storage: every tensor sharing it, and (during the call) one temporary wrapper."""
    return _use_count(t.untyped_storage()._cdata)


class _Buffer:
    __slots__ = ("tensor", "lone", "last")

    def __init__(self, tensor: Tensor, last: int):
        self.tensor = tensor  # flat, contiguous
        self.lone = _references(tensor) if _use_count is not None else -1  # the count when only we hold it
        self.last = last  # the request that last took it

    def free(self) -> bool:
        return _use_count is not None and _references(self.tensor) <= self.lone


class Workspace:
    """A pool of large CPU buffers for `empty` (see the module docstring).

    Args:
        horizon: a buffer not taken for this many requests is released at the next allocation.
        slack: a request of n elements takes a free buffer of at most slack x n elements (default: any;
            measured on the default U-Net, a bound of 2 held more: 143 against 135 MiB for a training
            step, 269 against 228 MiB for a 512x512 inference, since every miss allocates).
        min_elements: smaller requests are plain allocations (tests pass 1 to pool everything).
    """

    def __init__(self, horizon: int = 1024, slack: float = math.inf, min_elements: int = MIN_ELEMENTS):
        if horizon < 1 or slack < 1 or min_elements < 1:
            raise ValueError(f"Workspace: horizon, slack and min_elements must be >= 1, "
                             f"got {horizon}, {slack} and {min_elements}")
        self.horizon, self.slack, self.min_elements = int(horizon), float(slack), int(min_elements)
        self._buffers: list[_Buffer] = []
        self._requests = 0
        self.reused = 0  # requests served with a buffer handed out before
        self._lock = threading.Lock()
        self._entered = threading.local()  # each thread's stack of context-variable tokens

    def __enter__(self) -> "Workspace":
        tokens = self._entered.__dict__.setdefault("tokens", [])
        tokens.append(_current.set(self))
        return self

    def __exit__(self, *exc) -> None:
        _current.reset(self._entered.tokens.pop())

    def take(self, like: Tensor, shape: tuple[int, ...]) -> Tensor:
        """A contiguous tensor of `shape` with like's dtype and device, its contents undefined."""
        n = math.prod(shape)
        with self._lock:
            self._requests += 1
            best = None
            for buffer in self._buffers:
                t = buffer.tensor
                if (t.dtype == like.dtype and t.device == like.device and n <= t.numel() <= self.slack * n
                        and (best is None or t.numel() < best.tensor.numel()) and buffer.free()):
                    best = buffer
            if best is None:
                self._release_idle()
                best = _Buffer(like.new_empty(n), self._requests)
                self._buffers.append(best)
            else:
                self.reused += 1
            best.last = self._requests
            return best.tensor[:n].view(shape)

    def _release_idle(self) -> None:
        self._buffers = [b for b in self._buffers if self._requests - b.last < self.horizon or not b.free()]

    def clear(self) -> None:
        """Drop every buffer (those still referenced live on with their tensors)."""
        with self._lock:
            self._buffers = []

    @property
    def nbytes(self) -> int:
        """Bytes of the buffers held."""
        return sum(b.tensor.numel() * b.tensor.element_size() for b in self._buffers)

    def __len__(self) -> int:
        return len(self._buffers)


def current() -> Workspace | None:
    """This thread's current workspace, if any."""
    return _current.get()


def empty(like: Tensor, *shape: int) -> Tensor:
    """like.new_empty(shape), contiguous, taken from the current workspace when there is one and
    the buffer is large and on the CPU (see the module docstring). Its contents are undefined."""
    workspace = _current.get()
    if workspace is None or like.device.type != "cpu" or math.prod(shape) < workspace.min_elements:
        return like.new_empty(shape)
    return workspace.take(like, shape)
