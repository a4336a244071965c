"""n2n_core against its torch.nn twin: a training step and inference, same weights, same threads.

    PYTHONPATH=. python bench/core.py            # or: n2n bench core
    PYTHONPATH=. python bench/core.py --threads 1 --repeats 5 --cases unet-train
    PYTHONPATH=. python bench/core.py --device cuda          # on a GPU: the same cases there
    PYTHONPATH=. python bench/core.py --device cuda --conv-path taps   # one convolution path, whatever the device's rule

Cases (all by default):
  seed-train      `seed`, batch (64, 3, 64, 64): forward, MSE, backward, Adam step
  seed-infer      `seed` in eval mode on one (1, 3, 512, 512) image (peer under torch.no_grad)
  unet-train      `unet` (the paper's: depth 5, width 48), batch (16, 3, 64, 64)
  unet-infer      the same network on one 512x512 image
  default-train   the default model's U-Net (depth 4, width 44, residual), batch (16, 3, 64, 64)
  default-infer   the same network on one 512x512 image
  chain-train     a chain of 3x3 convolutions (3 -> 48, 3 x 48 -> 48, 48 -> 3; padding 1, leaky
                  ReLU 0.1 between), batch (16, 3, 64, 64): the convolution kernels alone
  chain-infer     the same chain on one 512x512 image

Each case times three contestants on the same weights: n2n (ours), the torch.nn twin
(pipeline/export/torch_twins.py) in its default NCHW layout, and the twin in channels_last (the peer's
best setting on CPU). After warm-up they run interleaved, the order rotating every
repetition, so background load on a shared machine hits all of them alike; the figure
is the median over repetitions of the per-repetition ratio ours / peer. `--clock cpu` times the
process's CPU time instead of the wall clock: on a machine whose cores other jobs
oversubscribe, a run's wall time counts its waits for a core, its CPU time does not. Peak memory:
the largest rise of the process's resident set over its level before two runs (sampled
every millisecond in a thread; freed memory handed back to the OS before them). n2n runs
under one `n2n_core.workspace.Workspace` for the whole case, as the training workers and the
denoising actors do (its large buffers are kept and reused, not faulted in afresh each run);
its memory is measured from an empty workspace, so the buffers it keeps count.
On CUDA (`--device cuda`) every run ends with `torch.cuda.synchronize()` inside its
timing, and peak memory is the rise of torch's allocated GPU memory during one run
(`torch.cuda.max_memory_allocated`).

`--conv-path taps|gemm` runs n2n's convolutions on that path with the device's block sizes
(`n2n_core.conv_plan.ConvPlan`); `auto` (the default) follows the device's rule.
"""
from __future__ import annotations

import argparse
import ctypes
import gc
import os
import statistics
import threading
import time

import dataclasses

import torch

from n2n_core import Adam, Conv2d, LeakyReLU, MSELoss, Sequential, build_model
from n2n_core.conv import set_conv_plan
from n2n_core.conv_plan import plan_for
from n2n_core.workspace import Workspace
from pipeline.export.torch_twins import copy_weights, torch_twin

DEFAULT_UNET = dict(depth=4, width=44, residual=True)  # the default model's (pipeline/assets/default.n2n)
CHAIN = dict(width=48, inner=3)
CASES = {
    "seed-train": ("seed", {}, "train", (64, 3, 64, 64)),
    "seed-infer": ("seed", {}, "infer", (1, 3, 512, 512)),
    "unet-train": ("unet", {}, "train", (16, 3, 64, 64)),
    "unet-infer": ("unet", {}, "infer", (1, 3, 512, 512)),
    "default-train": ("unet", DEFAULT_UNET, "train", (16, 3, 64, 64)),
    "default-infer": ("unet", DEFAULT_UNET, "infer", (1, 3, 512, 512)),
    "chain-train": ("chain", CHAIN, "train", (16, 3, 64, 64)),
    "chain-infer": ("chain", CHAIN, "infer", (1, 3, 512, 512)),
}


def conv_chain(width: int, inner: int, generator=None) -> Sequential:
    """A chain of 3x3 convolutions (3 -> width, inner x width -> width, width -> 3), padding 1, with
    leaky ReLUs 0.1 (in place, as the U-Net's) between: n2n's convolution kernels and little else."""
    channels = [3] + [width] * (inner + 1) + [3]
    layers = []
    for i, (cin, cout) in enumerate(zip(channels, channels[1:])):
        layers.append(Conv2d(cin, cout, 3, padding=1, generator=generator))
        if i < len(channels) - 2:
            layers.append(LeakyReLU(0.1, inplace=True))
    return Sequential(*layers)


def chain_twin(model: Sequential) -> torch.nn.Sequential:
    """The torch.nn twin of a `conv_chain`, with its weights, dtype and device."""
    p = model.parameters()[0].data
    layers = [torch.nn.Conv2d(m.in_channels, m.out_channels, 3, padding=1) if isinstance(m, Conv2d)
              else torch.nn.LeakyReLU(m.negative_slope) for m in model]
    twin = torch.nn.Sequential(*layers).to(dtype=p.dtype, device=p.device)
    copy_weights(model, twin)
    return twin


def build_pair(arch: str, kwargs: dict, generator):
    """(n2n model, a function making its torch.nn twin with the same weights, dtype and device)."""
    if arch == "chain":
        model = conv_chain(**kwargs, generator=generator)
        return model, lambda: chain_twin(model)
    model = build_model(arch, generator=generator, **kwargs)
    return model, lambda: torch_twin(model)


try:
    _LIBC = ctypes.CDLL("libc.so.6")
except OSError:  # not glibc: no trimming, the figures are then upper bounds
    _LIBC = None


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_memory(fn) -> int:
    """Run fn once; return the peak rise in resident memory (bytes) above the level before it."""
    gc.collect()
    if _LIBC is not None:
        _LIBC.malloc_trim(0)
    base = _rss_bytes()
    peak = [base]
    done = threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], _rss_bytes())
            time.sleep(0.001)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        fn()
    finally:
        done.set()
        thread.join()
    peak[0] = max(peak[0], _rss_bytes())
    return peak[0] - base


def peak_cuda_memory(fn) -> int:
    """Run fn once on CUDA; return the peak rise of torch's allocated GPU memory (bytes) during it."""
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


def force_conv_path(model, path: str, device) -> None:
    """Run `model`'s convolutions on `path` ("taps" or "gemm") with `device`'s block sizes; "auto": its rule."""
    if path != "auto":
        set_conv_plan(model, dataclasses.replace(plan_for(device), path=path))


def contestants(arch: str, kwargs: dict, mode: str, shape, seed: int = 0, device: str = "cpu",
                conv_path: str = "auto"):
    """{name: zero-argument callable running one step}, all on the same weights and batch (on `device`).
    n2n's runs under one workspace, its attribute `workspace` (see the module docstring)."""
    g = torch.Generator().manual_seed(seed)
    model, make_twin = build_pair(arch, kwargs, g)
    force_conv_path(model, conv_path, device)
    x = torch.rand(shape, generator=g)
    target = (x + 0.1 * torch.randn(shape, generator=g)).clamp(0, 1)
    model.to(device=device)
    x, target = x.to(device), target.to(device)
    twin = make_twin()
    twin_cl = make_twin().to(memory_format=torch.channels_last)
    x_cl, target_cl = x.contiguous(memory_format=torch.channels_last), target.contiguous(memory_format=torch.channels_last)

    if mode == "infer":
        model.eval()
        twin.eval()
        twin_cl.eval()

        def peer_infer(net, inp):
            def run():
                with torch.no_grad():
                    net(inp)
            return run

        return {"n2n": _in_workspace(lambda: model(x)), "torch": peer_infer(twin, x),
                "torch-cl": peer_infer(twin_cl, x_cl)}

    loss, opt = MSELoss(), Adam(model.parameters(), lr=1e-4)

    def ours():
        opt.zero_grad()
        loss(model(x), target)
        model.backward(loss.backward(), input_grad=False)  # as training: the peers' input needs no gradient
        opt.step()

    def peer(net, inp, tgt):
        popt = torch.optim.Adam(net.parameters(), lr=1e-4)

        def run():
            popt.zero_grad()
            torch.nn.functional.mse_loss(net(inp), tgt).backward()
            popt.step()
        return run

    return {"n2n": _in_workspace(ours), "torch": peer(twin, x, target), "torch-cl": peer(twin_cl, x_cl, target_cl)}


def _in_workspace(fn):
    """fn run under one workspace for all its calls; the workspace is the result's attribute `workspace`."""
    workspace = Workspace()

    def run():
        with workspace:
            fn()
    run.workspace = workspace
    return run


def _twice(fn):
    """fn run twice from an empty workspace (if it has one): a run's peak with what the workspace keeps."""
    def run():
        fn()
        fn()
    if hasattr(fn, "workspace"):
        fn.workspace.clear()
    return run


# wall: elapsed time; cpu: the process's CPU time (all its threads), which a busy machine's
# waiting for a core does not inflate
CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


def _synchronized(fn):
    def run():
        fn()
        torch.cuda.synchronize()
    return run


def run_case(name: str, repeats: int, warmup: int, seed: int = 0, device: str = "cpu",
             conv_path: str = "auto", clock: str = "wall") -> dict:
    arch, kwargs, mode, shape = CASES[name]
    runs = contestants(arch, kwargs, mode, shape, seed, device, conv_path)
    if device != "cpu":  # time the work, not its asynchronous launch
        runs = {n: _synchronized(fn) for n, fn in runs.items()}
    names = list(runs)
    for _ in range(warmup):
        for n in names:
            runs[n]()
    times = {n: [] for n in names}
    now = CLOCKS[clock]
    for r in range(repeats):
        order = names[r % len(names):] + names[:r % len(names)]  # rotate who goes first
        for n in order:
            t0 = now()
            runs[n]()
            times[n].append(now() - t0)
    measure = peak_memory if device == "cpu" else peak_cuda_memory
    memory = {n: measure(_twice(runs[n])) for n in names}
    ratio = {peer: statistics.median(o / p for o, p in zip(times["n2n"], times[peer])) for peer in ("torch", "torch-cl")}
    return {"case": name, "arch": arch, "mode": mode, "shape": shape, "repeats": repeats, "device": device,
            "conv_path": conv_path, "clock": clock,
            "median_s": {n: statistics.median(t) for n, t in times.items()}, "ratio": ratio, "peak_bytes": memory}


def format_result(res: dict) -> str:
    med, mem = res["median_s"], res["peak_bytes"]
    digits = 0 if min(med.values()) >= 0.1 else 2
    cells = ", ".join(f"{n} {med[n] * 1e3:.{digits}f} ms / {mem[n] / 2**20:.0f} MiB" for n in med)
    return (f"{res['case']:<13} {str(tuple(res['shape'])):<18} ratio n2n/torch {res['ratio']['torch']:.2f}x, "
            f"n2n/torch-cl {res['ratio']['torch-cl']:.2f}x   (median time / peak memory: {cells})")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cases", nargs="+", action="extend", choices=sorted(CASES), default=None,
                        help="cases to run (also repeatable: --cases a --cases b; default: all)")
    parser.add_argument("--repeats", type=int, default=7, help="interleaved timed repetitions per case")
    parser.add_argument("--warmup", type=int, default=2, help="untimed runs of each contestant first")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda / cuda:N")
    parser.add_argument("--conv-path", choices=("auto", "taps", "gemm"), default="auto",
                        help="n2n's convolution path (default: the device's rule, n2n_core.conv_plan.plan_for)")
    parser.add_argument("--clock", choices=sorted(CLOCKS), default="wall",
                        help="cpu: the process's CPU time, steadier than wall time where other jobs oversubscribe "
                             "the cores (CPU only; meaningful with --threads 1)")
    args = parser.parse_args(argv)
    if args.clock == "cpu" and args.device != "cpu":
        parser.error("--clock cpu times CPU work: use the wall clock with --device cuda")
    if args.device != "cpu" and not torch.cuda.is_available():
        parser.error(f"--device {args.device}: torch.cuda.is_available() is False here")
    report(args.cases or list(CASES), args.repeats, args.warmup, args.threads, args.device, args.conv_path,
           args.clock)


def report(cases, repeats: int, warmup: int, threads: int | None, device: str = "cpu",
           conv_path: str = "auto", clock: str = "wall") -> list[dict]:
    if threads:
        torch.set_num_threads(threads)
    where = torch.cuda.get_device_name(torch.device(device)) if device != "cpu" else "CPU"
    path = conv_path if conv_path != "auto" else f"auto ({plan_for(device).path})"
    print(f"torch {torch.__version__}, {where}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs; "
          f"n2n convolution path {path}; {repeats} interleaved repetitions after {warmup} warm-up; {clock} clock; "
          f"load average {os.getloadavg()[0]:.1f}")
    results = []
    for case in cases:
        res = run_case(case, repeats, warmup, device=device, conv_path=conv_path, clock=clock)
        print(format_result(res), flush=True)
        results.append(res)
    print(f"load average {os.getloadavg()[0]:.1f} at the end")
    return results


if __name__ == "__main__":
    main()
