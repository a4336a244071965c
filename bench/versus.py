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

    with tempfile.TemporaryDirectory() as folder:
        before = import_revision(args.before, Path(folder))
        now_runs, state = runs(n2n_core, arch, None)
        before_runs, _ = runs(before, arch, state)
        print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs, U-Net {arch}; "
              f"load average {os.getloadavg()[0]:.1f} at the start")
        clock = time.process_time if args.clock == "cpu" else time.perf_counter
        for case in args.cases:
            contestants = {"now": now_runs[case], "before": before_runs[case]}
            times = {name: [] for name in contestants}
            for r in range(args.warmup + args.repeats):
                for name in (("now", "before") if r % 2 == 0 else ("before", "now")):
                    t0 = clock()
                    contestants[name]()
                    times[name].append(clock() - t0)
            kept = {name: t[args.warmup:] for name, t in times.items()}
            ratio = statistics.median(a / b for a, b in zip(kept["now"], kept["before"]))
            print(f"{case:<6} now / {args.before}: {ratio:.3f}x   ({args.clock} clock; median ms now {statistics.median(kept['now']) * 1e3:.0f}, "
                  f"before {statistics.median(kept['before']) * 1e3:.0f})", flush=True)
            if args.memory:  # bench/core.py's measure, the peak rise of the resident set during two runs from
                # an empty workspace: the median of four, alternating (one measured first or second read +-15% apart)
                from bench.core import _twice, peak_memory
                rise = {name: [] for name in contestants}
                for r in range(4):
                    for name in (("now", "before") if r % 2 == 0 else ("before", "now")):
                        rise[name].append(peak_memory(_twice(contestants[name])) / 2**20)
                print(f"{case:<6} peak memory now {statistics.median(rise['now']):.0f} MiB, "
                      f"before {statistics.median(rise['before']):.0f} MiB", flush=True)
        print(f"load average {os.getloadavg()[0]:.1f} at the end")


if __name__ == "__main__":
    main()
