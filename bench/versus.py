"""n2n_core of this working tree against n2n_core of another git revision, side by side in one process.

    PYTHONPATH=. python bench/versus.py --before HEAD~1                  # the default model's size
    PYTHONPATH=. python bench/versus.py --before 2e6f3d6 --arch depth=5,width=48 --repeats 9

For a change to the CPU kernels: both versions build the same U-Net (the same weights,
copied by name), then a training step (batch 16 of 64x64: forward, MSE, backward, Adam)
and an inference (one 512x512 image, eval mode) run interleaved, the order alternating
every repetition, so background load hits both alike; the figure is the median over the
repetitions after the warm-up of the per-repetition ratio now / before. The other
revision's `n2n_core` is exported with `git archive` into a temporary folder under another
package name; nothing in the working tree changes.

Instances. One build of each revision is too few on a noisy machine: on a 2-core VM one
revision against itself read 1.047x with one build of each, and the medians of four builds of
one revision, run alternately, spread over 392-424 ms. So each revision builds `--instances`
models (3 by default), built and run in alternating order, and a repetition's ratio is the
mean time of the now-instances over that of the before-instances (the same revision against
itself, four of each: 1.005x and 1.008x). The spread of the instances' own medians is printed
beside it: a difference smaller than it is noise.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib
import inspect
import os
import re
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def import_revision(revision: str, into: Path):
    """`n2n_core` as of `revision`, imported as the package `n2n_core_before`."""
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", revision, "n2n_core"], check=True,
                             capture_output=True).stdout
    with tempfile.TemporaryFile() as f:
        f.write(archive)
        f.seek(0)
        with tarfile.open(fileobj=f) as tar:
            tar.extractall(into, filter="data")
    package = into / "n2n_core_before"
    (into / "n2n_core").rename(package)
    for source in package.glob("*.py"):
        text = source.read_text()
        source.write_text(re.sub(r"\bn2n_core\b", "n2n_core_before", text))
    sys.path.insert(0, str(into))
    return importlib.import_module("n2n_core_before")


def runs(core, arch: dict, state: dict | None):
    """{"step": callable, "infer": callable} on one build of the U-Net; returns them and its state dict."""
    model = core.build_model("unet", generator=torch.Generator().manual_seed(0), **arch)
    if state is not None:
        model.load_state_dict(state)
    g = torch.Generator().manual_seed(1)
    x, target = torch.rand(16, 3, 64, 64, generator=g), torch.rand(16, 3, 64, 64, generator=g)
    image = torch.rand(1, 3, 512, 512, generator=g)
    loss, optimizer = core.MSELoss(), core.Adam(model.parameters(), lr=1e-6)
    # as training runs it: without the input's gradient, where the revision can skip it
    skip_input = {"input_grad": False} if "input_grad" in inspect.signature(model.backward).parameters else {}
    # and under a workspace of its own where the revision has them (n2n_core/workspace.py)
    workspace = core.Workspace() if hasattr(core, "Workspace") else contextlib.nullcontext()

    def step():
        with workspace:
            model.train()
            optimizer.zero_grad()
            loss(model(x), target)
            model.backward(loss.backward(), **skip_input)
            optimizer.step()

    def infer():
        with workspace:
            model.eval()
            model(image)

    if hasattr(core, "Workspace"):  # bench/core.py's _twice empties it before measuring memory
        step.workspace = infer.workspace = workspace
    return {"step": step, "infer": infer}, {k: v.clone() for k, v in model.state_dict().items()}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--before", required=True, help="git revision to compare against (e.g. HEAD~1)")
    parser.add_argument("--arch", default="depth=4,width=44,residual=true",
                        help="U-Net arguments (default: the default model's)")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--cases", nargs="+", choices=("step", "infer"), default=["step", "infer"])
    parser.add_argument("--instances", type=int, default=3,
                        help="models built of each revision, run alternately (see the docstring; 1: one each)")
    parser.add_argument("--memory", action="store_true", help="also the peak memory of two runs of each (bench/core.py's)")
    parser.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                        help="cpu: the process's CPU time (time.process_time), steadier than wall time when "
                             "other jobs oversubscribe the cores; meaningful with --threads 1")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    arch = {}
    for item in args.arch.split(","):
        key, value = item.split("=")
        arch[key] = value.lower() == "true" if value.lower() in ("true", "false") else int(value)
    import n2n_core

    if args.instances < 1:
        parser.error("--instances must be at least 1")
    with tempfile.TemporaryDirectory() as folder:
        before = import_revision(args.before, Path(folder))
        instances = {"now": [], "before": []}
        state = None
        for k in range(args.instances):  # built alternately, so neither revision always comes first
            for name in (("now", "before") if k % 2 == 0 else ("before", "now")):
                built, built_state = runs(n2n_core if name == "now" else before, arch, state)
                state = state if state is not None else built_state
                instances[name].append(built)
        print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs, U-Net {arch}; "
              f"{args.instances} instance(s) of each; load average {os.getloadavg()[0]:.1f} at the start")
        clock = time.process_time if args.clock == "cpu" else time.perf_counter
        for case in args.cases:
            order = [(name, k) for k in range(args.instances) for name in ("now", "before")]
            times = {key: [] for key in order}
            for r in range(args.warmup + args.repeats):
                for key in (order if r % 2 == 0 else order[::-1]):
                    t0 = clock()
                    instances[key[0]][key[1]][case]()
                    times[key].append(clock() - t0)
            kept = {key: t[args.warmup:] for key, t in times.items()}

            def mean_of(name, r):
                return statistics.fmean(kept[(name, k)][r] for k in range(args.instances))

            ratio = statistics.median(mean_of("now", r) / mean_of("before", r) for r in range(args.repeats))
            medians = {name: [statistics.median(kept[(name, k)]) * 1e3 for k in range(args.instances)]
                       for name in ("now", "before")}
            spread = "".join(f", {name} instances {min(m):.0f}-{max(m):.0f}" for name, m in medians.items()
                             if len(m) > 1)
            print(f"{case:<6} now / {args.before}: {ratio:.3f}x   ({args.clock} clock; median ms now "
                  f"{statistics.median(medians['now']):.0f}, before {statistics.median(medians['before']):.0f}{spread})",
                  flush=True)
            if args.memory:  # bench/core.py's measure, the peak rise of the resident set during two runs from
                # an empty workspace: the median of four, alternating (one measured first or second read +-15% apart)
                from bench.core import _twice, peak_memory
                rise = {name: [] for name in instances}
                for r in range(4):
                    for name in (("now", "before") if r % 2 == 0 else ("before", "now")):
                        rise[name].append(peak_memory(_twice(instances[name][0][case])) / 2**20)
                print(f"{case:<6} peak memory now {statistics.median(rise['now']):.0f} MiB, "
                      f"before {statistics.median(rise['before']):.0f} MiB", flush=True)
        print(f"load average {os.getloadavg()[0]:.1f} at the end")


if __name__ == "__main__":
    main()
