"""Kernel launches per training step and per inference tile, for each convolution path.

    PYTHONPATH=. python bench/launches.py                  # on the CPU: the operator calls a GPU would launch
    PYTHONPATH=. python bench/launches.py --device cuda    # on a GPU: the kernels it did launch

Counted with torch.profiler over one call after a warm-up, for the U-Net of `bench/core.py`
(`unet`, depth 5, width 48) at a training step of batch 16 of 64x64 (forward, MSE,
backward, Adam), and for the default model's architecture (depth 4, width 44, residual)
in eval mode on one inference tile of 576x576 (a 512-pixel tile with 32 pixels of
context on each side), once per convolution path (`taps`, `gemm`; the device's own block
sizes, `n2n_core.conv_plan.ConvPlan`):
- on CUDA, "kernels" are the GPU's own events (kernels, memsets, copies) and "GEMMs" those
  of them that are matrix products (cuBLAS: gemm / gemv / sgemm / cutlass in the name);
- on the CPU, "kernels" are the operator calls n2n makes that do work (aten operators
  called from Python, not from inside another operator, that are not views or bare
  allocations: roughly one GPU kernel each, an addmm with a bias two) and "GEMMs" the
  matrix products among them (mm, addmm, bmm, baddbmm, addmv, matmul).
`--step-shape` and `--tile-size` shrink the work (bench/gpu_check.sh --device cpu does).
"""
from __future__ import annotations

import argparse
import dataclasses

import torch
from torch.profiler import ProfilerActivity, profile

from n2n_core import Adam, MSELoss, build_model
from n2n_core.conv import set_conv_plan
from n2n_core.conv_plan import plan_for

STEP = dict(arch={"depth": 5, "width": 48}, shape=(16, 3, 64, 64))
TILE = dict(arch={"depth": 4, "width": 44, "residual": True}, shape=(1, 3, 576, 576))
GEMMS = {"aten::mm", "aten::addmm", "aten::addmm_", "aten::bmm", "aten::baddbmm", "aten::addmv", "aten::addmv_",
         "aten::mv", "aten::matmul"}
MAYBE_VIEW = {"aten::reshape", "aten::contiguous", "aten::flatten", "aten::to", "aten::type_as"}  # a copy or not
NO_KERNEL = {"aten::empty", "aten::empty_strided", "aten::empty_like", "aten::new_empty", "aten::as_strided",
             "aten::view", "aten::_unsafe_view", "aten::alias", "aten::resize_", "aten::lift_fresh", "aten::detach",
             "aten::t", "aten::_reshape_alias", "aten::unsqueeze", "aten::squeeze", "aten::permute",
             "aten::transpose", "aten::expand", "aten::slice", "aten::select", "aten::split", "aten::unbind",
             "aten::narrow", "aten::split_with_sizes", "aten::unflatten", "aten::view_as", "aten::flip_view",
             "aten::resolve_conj", "aten::resolve_neg", "aten::_has_compatible_shallow_copy_type"}
GPU_GEMM_WORDS = ("gemm", "gemv", "cutlass", "dot_kernel")


def count(fn, device: str) -> tuple[int, int]:
    """(kernels, GEMMs) of one call of fn (see the module docstring for what counts on each device)."""
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device != "cpu" else [])
    with profile(activities=activities) as prof:
        fn()
        if device != "cpu":
            torch.cuda.synchronize()
    events = prof.events()
    if device != "cpu":
        kernels = [e for e in events if e.device_type == torch.autograd.DeviceType.CUDA]
        gemms = [e for e in kernels if any(w in e.name.lower() for w in GPU_GEMM_WORDS)]
        return len(kernels), len(gemms)
    calls = [e for e in events if e.device_type == torch.autograd.DeviceType.CPU and e.name.startswith("aten::")
             and not _inside_an_operator(e) and e.name not in NO_KERNEL and not _only_views(e)]
    return len(calls), sum(e.name in GEMMS for e in calls)


def _inside_an_operator(event) -> bool:
    parent = event.cpu_parent
    while parent is not None:
        if parent.name.startswith("aten::"):
            return True
        parent = parent.cpu_parent
    return False


def _only_views(event) -> bool:
    """A reshape, contiguous, ... that made no copy (its operators are all views): no work."""
    return event.name in MAYBE_VIEW and all(c.name in NO_KERNEL or _only_views(c) for c in event.cpu_children)


def step_and_tile(device: str, path: str, step_shape=STEP["shape"], tile_size: int = TILE["shape"][-1]):
    """The two calls to count, with every convolution on `path`."""
    g = torch.Generator().manual_seed(0)
    plan = dataclasses.replace(plan_for(device), path=path)
    model = set_conv_plan(build_model("unet", generator=g, **STEP["arch"]), plan).to(device=device)
    x = torch.rand(step_shape, generator=g).to(device)
    target = torch.rand(step_shape, generator=g).to(device)
    loss, optimizer = MSELoss(), Adam(model.parameters(), lr=1e-5)

    def step():
        optimizer.zero_grad()
        loss(model(x), target)
        model.backward(loss.backward())
        optimizer.step()

    tile_model = set_conv_plan(build_model("unet", generator=g, **TILE["arch"]), plan).to(device=device).eval()
    tile = torch.rand(1, 3, tile_size, tile_size, generator=g).to(device)
    return step, lambda: tile_model(tile)


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda / cuda:N")
    parser.add_argument("--paths", default="taps,gemm", help="convolution paths to count (taps, gemm)")
    parser.add_argument("--step-shape", default="16,3,64,64", help="training batch N,C,H,W (H, W multiples of 32)")
    parser.add_argument("--tile-size", type=int, default=576, help="inference tile side (a multiple of 16)")
    args = parser.parse_args(argv)
    step_shape = tuple(int(v) for v in args.step_shape.split(","))
    if args.device != "cpu" and not torch.cuda.is_available():
        parser.error(f"--device {args.device}: torch.cuda.is_available() is False here")
    what = "GPU kernels" if args.device != "cpu" else "operator calls (one GPU kernel each, roughly)"
    print(f"torch {torch.__version__}, device {args.device} (its rule: {plan_for(args.device).path}); {what}")
    print(f"step: unet {STEP['arch']} batch {step_shape}; tile: unet {TILE['arch']} on "
          f"{args.tile_size}x{args.tile_size}")
    rows = []
    for path in args.paths.split(","):
        step, tile = step_and_tile(args.device, path, step_shape, args.tile_size)
        step(), tile()  # warm-up: first-call allocations and library initialization
        (step_kernels, step_gemms), (tile_kernels, tile_gemms) = count(step, args.device), count(tile, args.device)
        rows.append(dict(path=path, step_kernels=step_kernels, step_gemms=step_gemms, tile_kernels=tile_kernels,
                         tile_gemms=tile_gemms))
        print(f"{path:<5} per step: {step_kernels:>6} kernels, {step_gemms:>6} GEMMs   "
              f"per tile: {tile_kernels:>6} kernels, {tile_gemms:>6} GEMMs", flush=True)
    return rows


if __name__ == "__main__":
    main()
