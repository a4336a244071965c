"""How much memory one forward of the denoiser may use, and how much it needs per pixel.

The bulk job sizes its work from these two figures: how many tiles (or small images) go
into one forward, and how large a tile can be (`tiling.denoise_image(forward_pixels=...)`).

- `forward_budget(device)`: the bytes one forward may use. On CUDA, `CUDA_BUDGET_FRACTION`
  (80%) of what the device has free for this process: `torch.cuda.mem_get_info`'s free
  memory plus what torch's caching allocator holds unused, read when the actor starts
  (the rest is headroom for the allocator's rounding and fragmentation, and cuBLAS's
  workspace). On the CPU a fixed `CPU_FORWARD_BYTES` (1 GiB) per actor: what the machine
  has free says little about what the other actors and processes on it will take, and a
  CPU is no faster on larger forwards (the tile of the default `--tile 512` with its
  context needs about 0.3 GiB with the default model).
- `ForwardCost.measure(model, device)`: the bytes an eval-mode forward holds at its peak,
  as `fixed + per_pixel x padded pixels`, from two small probes run while every tensor
  storage the forward creates on the device is counted from its creation to its release
  (`LiveBytes`, a TorchDispatchMode: exact for the code that runs, on any device). The
  probes run with tiny im2col bands; the largest band the device's plan builds
  (`ConvPlan.band_elements`) is added as a constant, since beyond small sizes the columns
  are built one band at a time whatever the tile.
- `is_out_of_memory(error)`: the errors a retry with less memory may cure. On one, the
  tile halves and the image goes on from its first unfinished tile row
  (`tiling.denoise_image`).
"""
from __future__ import annotations

import dataclasses
import weakref
from dataclasses import dataclass

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from n2n_core.conv import Conv2d
from n2n_core.workspace import Workspace

CUDA_BUDGET_FRACTION = 0.8  # of the free device memory at the actor's start
CPU_FORWARD_BYTES = 1 << 30  # per actor: one forward's working memory on the CPU
_PROBE_BAND = 1 << 12  # im2col band of the probes: columns too small to count
_PROBE_SIDE = 64  # the probes are about 64x64 and 128x128 (rounded to the model's multiple)


def forward_budget(device) -> int:
    """Bytes one forward may use on `device` (see the module docstring)."""
    device = torch.device(device)
    if device.type != "cuda":
        return CPU_FORWARD_BYTES
    free, _ = torch.cuda.mem_get_info(device)
    cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    return int(CUDA_BUDGET_FRACTION * (free + cached))


def is_out_of_memory(error: BaseException) -> bool:
    """A CUDA out-of-memory error, a failed CPU allocation, or a MemoryError."""
    if isinstance(error, (MemoryError, torch.cuda.OutOfMemoryError)):
        return True
    text = str(error)
    return isinstance(error, RuntimeError) and ("out of memory" in text or "can't allocate memory" in text)


class LiveBytes(TorchDispatchMode):
    """Counts the bytes of every tensor storage on `device` created while the mode is active, from
    the operation that creates it to its release; `peak` is the most alive at once.

    Storages that exist when it starts (`known`) are never counted. A storage's release is seen
    through a weakref finalizer on torch's Python object for it, which torch keeps for as long
    as the storage lives.
    """

    def __init__(self, device, known=()):
        super().__init__()
        self.device_type = torch.device(device).type
        self.live = 0
        self.peak = 0
        self._seen: set[int] = set()
        self._keep = [t.untyped_storage() for t in known]  # alive, so their ids stay theirs
        self._seen.update(id(s) for s in self._keep)

    def _released(self, key: int, nbytes: int) -> None:
        self.live -= nbytes
        self._seen.discard(key)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.device.type == self.device_type:
                storage = t.untyped_storage()
                key = id(storage)
                if key in self._seen:
                    continue
                self._seen.add(key)
                nbytes = storage.nbytes()
                self.live += nbytes
                self.peak = max(self.peak, self.live)
                weakref.finalize(storage, self._released, key, nbytes)
        return out


@dataclass(frozen=True)
class ForwardCost:
    """Peak bytes of one eval-mode forward (with its padding and output copies): fixed + per_pixel x pixels,
    pixels counted as padded input pixels over the whole batch."""

    fixed: int
    per_pixel: float

    def bytes(self, pixels: int) -> int:
        return int(self.fixed + self.per_pixel * pixels)

    def pixels(self, budget: int) -> int:
        """The most padded pixels one forward may take within `budget` bytes (at least 1)."""
        return max(1, int((budget - self.fixed) / self.per_pixel))

    @classmethod
    def measure(cls, model, device=None, self_ensemble: bool = False) -> "ForwardCost":
        """Run two probes of `model` (on its own device and dtype) and fit the line through their peaks."""
        from pipeline.inference.tiling import model_device_dtype, run_padded

        device, dtype = model_device_dtype(model) if device is None else (torch.device(device),
                                                                          model_device_dtype(model)[1])
        multiple = int(getattr(model, "size_multiple", 1))
        side = -(-_PROBE_SIDE // multiple) * multiple
        in_channels = int(getattr(model, "in_channels", 3))
        convs = [m for m in model.modules() if isinstance(m, Conv2d)]
        plans = [m.plan for m in convs]
        was_training = getattr(model, "training", False)
        peaks = []
        try:
            model.eval()
            for m in convs:
                m.plan = dataclasses.replace(m.plan_for(device), band_elements=_PROBE_BAND)
            for probe in (side, 2 * side):
                region = torch.rand(1, in_channels, probe, probe)  # where tiles come from: host memory
                # under a workspace of its own, as the actors run (worker.py): the buffers it keeps count
                with Workspace(min_elements=1), \
                        LiveBytes(device, known=[p.data for p in model.parameters()] + [region]) as counter:
                    run_padded(model, region, multiple, device, dtype, self_ensemble)
                peaks.append(counter.peak)
        finally:
            for m, plan in zip(convs, plans):
                m.plan = plan
            model.train(was_training)
        small, large = side * side, 4 * side * side
        per_pixel = max(1.0, (peaks[1] - peaks[0]) / (large - small))
        fixed = max(0, int(peaks[1] - per_pixel * large))
        band = max((m.plan_for(device).band_elements for m in convs), default=0) * dtype.itemsize
        return cls(fixed=fixed + band, per_pixel=per_pixel)
