"""Scaling of the training step on simulated GPUs: the serial step against the overlapped one.

Run through bench/train.py:

    PYTHONPATH=. python bench/train.py --part scaling --json scaling.json
    PYTHONPATH=. python bench/train.py --part scaling --layouts 2x8 --params 1000000 --gpu-step-ms 80

Everything is real except the GPU: the driver (its step loop, its optimizer), the node
reducers, Ray's actors, calls and object store, the overlapped step's sockets and shared
memory, on a multi-node `ray.cluster_utils.Cluster`. The gradient workers are
`GradientWorker`s (through the worker hook the tests use) whose forward and backward pass
is a sleep of `--gpu-step-ms` split as a GPU would spend it: a third on the forward pass
and two thirds on backward, backward divided over the gradient buckets in proportion to
the multiply-adds of their layers (counted from the model as built, the real one of P
parameters: a U-Net of depth 4, width 56 for 1M, width 222 for 16M). Their gradients are
synthetic (random numbers, written once); everything else a worker does is real: it
draws its real batch of crops and noise on the CPU each step, loads the weights (serial
step) or computes on the node's shared weights (overlapped step), hands its gradients over.

Per GPU (weak scaling, as data-parallel training runs): 16 crops of 64x64 for a 20.4 ms
step (the H200 step of the default U-Net at that batch), 4 crops of 256x256 for 80 ms (the
batch of the Noise2Noise and Neighbor2Neighbor papers). A layout NxK is N nodes of K
workers, each worker pinned to its node and reserving no CPU, as K GPUs of N machines.

Both steps run on their own actors (same layout, same data, same initial weights), side
by side in one run: after warm-up steps of each, turns alternate (old, new, new, old, ...),
each turn `--steps-per-turn` steps of one path; a turn's steps include its start (the
overlapped step's pipeline fills at the start of each turn). Figures are medians over
turns of the wall time per step, the busy fraction gpu-step-ms / wall ms per step (1.0: a
GPU never waits) and the driver's CPU time per step (`time.process_time`, all its threads);
ratios are medians of the per-turn ratios.

On one machine every actor, reducer, raylet and the driver share its cores, and nodes
talk over loopback: a cluster gives each node its own. These figures are therefore a lower
bound for a cluster.
"""
from __future__ import annotations

import os
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import ray
import torch
from PIL import Image
from ray.cluster_utils import Cluster
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from n2n_core import build_model
from n2n_core.conv import Conv2d
from pipeline.training import TrainConfig
from pipeline.training.flat import FlatParameters
from pipeline.training.overlap.pool import OverlapPool
from pipeline.training.replica import make_model, make_optimizer
from pipeline.training.placement import WorkerPool
from pipeline.training.worker import GradientWorker

LAYOUTS = ("1x1", "1x2", "1x4", "2x4", "2x8")
PARAMS = (1_000_000, 16_000_000)
STEP_MS = (20.4, 80.0)
BATCH_PER_GPU = {20.4: (16, 64), 80.0: (4, 256)}  # gpu step ms -> (crops, crop size) per GPU
WIDTH_FOR = {1_000_000: 56, 16_000_000: 222}       # U-Net depth 4: 1,037,626 and 16,236,861 parameters


def unet_width(params: int) -> int:
    """The depth-4 U-Net width whose parameter count is closest to `params`."""
    if params in WIDTH_FOR:
        return WIDTH_FOR[params]
    from n2n_core.architectures import count_parameters

    return min(range(4, 1024), key=lambda w: abs(count_parameters("unet", depth=4, width=w) - params))


def backward_costs(config: TrainConfig) -> list[float]:
    """Backward multiply-adds attributed to each parameter, in the model's order (a weight carries
    its convolution's two products, input and weight gradient; a bias nothing), per crop."""
    model = make_model(config)
    index = {id(p): i for i, p in enumerate(model.parameters())}
    costs = [0.0] * len(index)
    original = Conv2d.forward
    side = 2 ** config.arch_args.get("depth", 4) * 2  # a small input; multiply-adds scale with its area

    def counting(self, x, *args, **kwargs):
        y = original(self, x, *args, **kwargs)
        kh, kw = self.kernel_size
        costs[index[id(self.weight)]] += 2.0 * y.shape[2] * y.shape[3] * self.out_channels * self.in_channels * kh * kw
        return y

    Conv2d.forward = counting
    try:
        model.eval()
        model(torch.zeros(1, 3, side, side, dtype=config.torch_dtype))
    finally:
        Conv2d.forward = original
    return costs


class SimulatedGPUWorker(GradientWorker):
    """A `GradientWorker` whose forward and backward pass sleeps as a GPU would compute (see the module
    docstring); class attributes `step_s` and `costs` are set by `simulated_worker`."""

    step_s: float = 0.0
    costs: list = []

    def __init__(self, config: TrainConfig, threads: int | None = 1, device=None):
        super().__init__(config, threads=threads, device=torch.device("cpu"))
        self.own.grads.copy_(torch.randn(self.own.size, generator=torch.Generator().manual_seed(1)))

    def attach_shared(self, weights, slot, plan) -> None:
        super().attach_shared(weights, slot, plan)
        slot.copy_(torch.randn(slot.numel(), generator=torch.Generator().manual_seed(1), dtype=slot.dtype))
        total = sum(self.costs)
        self.shares = [sum(self.costs[i] for i in bucket.params) / total for bucket in plan.buckets]

    def forward_backward(self, inputs, targets, on_bucket=None, on_loss=None, gamma=0.0):
        """Sleep until each point of the simulated GPU's timeline, from when the step began here: a GPU
        runs its queued kernels while the host thread waits for a core, so a late wake-up of this
        thread delays what it does next, not the GPU's own timeline."""
        n = inputs.shape[0]  # the real batch was drawn: only the GPU's work is simulated
        began = time.perf_counter()

        def until(seconds: float) -> None:
            time.sleep(max(0.0, began + seconds - time.perf_counter()))

        until(self.step_s / 3)
        if on_loss is not None:
            on_loss(0.01 * n, n)
        backward = 2 * self.step_s / 3
        if on_bucket is None or self.plan is None:
            until(self.step_s)
            return 0.01 * n, n
        self._arm(on_bucket)
        done = self.step_s / 3
        for b, share in enumerate(self.shares):
            done += backward * share
            until(done)
            self._left[b] = 0
            self._bucket_done(b)
        self._left, self._on_bucket = None, None
        return 0.01 * n, n


def simulated_worker(step_ms: float, costs: list) -> type:
    return type("SimulatedGPUWorker", (SimulatedGPUWorker,), {"step_s": step_ms / 1e3, "costs": list(costs)})


class PinnedWorkers:
    """Mixin for a WorkerPool: worker i on nodes[i // per_node], reserving no CPU (as one GPU of that
    machine), on a fixed cluster (no autoscaler request)."""

    nodes: list = []
    per_node: int = 1

    def _request_resources(self) -> None:  # a fixed cluster
        pass

    def _start(self, index: int):
        strategy = NodeAffinitySchedulingStrategy(self.nodes[index // self.per_node], soft=False)
        return self.remote_worker.options(num_cpus=0, max_restarts=0, scheduling_strategy=strategy).remote(
            self.config, threads=1)


def pinned(pool_class: type, nodes: list, per_node: int) -> type:
    return type(f"Pinned{pool_class.__name__}", (PinnedWorkers, pool_class), {"nodes": nodes, "per_node": per_node})


class ProcessCPU:
    """CPU time (user + system, from /proc) of this machine's processes between two snapshots, by role:
    the driver (this process), the gradient workers, the node reducers, and everything else (Ray's
    raylets, GCS and agents, and any other load of the machine). Linux only; elsewhere empty."""

    def __init__(self):
        self.tick = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100

    @staticmethod
    def snapshot() -> dict[int, int]:
        ticks = {}
        if not os.path.isdir("/proc"):
            return ticks
        for entry in os.scandir("/proc"):
            if entry.name.isdigit():
                try:
                    fields = Path(entry.path, "stat").read_text().rsplit(")", 1)[1].split()
                except (OSError, IndexError):
                    continue
                ticks[int(entry.name)] = int(fields[11]) + int(fields[12])
        return ticks

    def split(self, before: dict, after: dict, roles: dict[int, str]) -> dict[str, float]:
        """Seconds of CPU per role between the snapshots (a process that started meanwhile counts whole)."""
        out = {"driver": 0.0, "workers": 0.0, "reducers": 0.0, "other": 0.0}
        for pid, ticks in after.items():
            out[roles.get(pid, "other")] += (ticks - before.get(pid, 0)) / self.tick
        return out


@dataclass
class Path_:
    """One step path under test: its pool and the driver's own model, flat buffers and optimizer."""

    name: str
    pool: object
    flat: FlatParameters
    optimizer: object
    threads: int           # the driver's torch threads while this path steps
    next_step: int = 0

    def run(self, steps: int) -> None:
        torch.set_num_threads(self.threads)
        for i in range(steps):
            step = self.next_step
            last = i == steps - 1
            self.pool.step(step, self.flat, self.optimizer, lambda last=last: not last)
            self.next_step += 1


def make_images(folder: Path, count: int = 16, size: int = 320) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(count):
        img = np.kron(rng.random((size // 8, size // 8, 3)), np.ones((8, 8, 1)))
        Image.fromarray((img * 255).round().astype(np.uint8)).save(folder / f"img{i}.png")
    return folder


def measure_cell(nodes: list, per_node: int, params: int, step_ms: float, data: Path, out: Path, turns: int,
                 steps_per_turn: int, warmup: int, buckets: int, paths=("old", "new"), batch=None) -> list[dict]:
    """Both paths on one layout, P and step time; one row per path. `batch`: (crops, crop size) per GPU
    instead of the step time's own (a diagnostic)."""
    rows_per_gpu, crop = batch or BATCH_PER_GPU.get(step_ms, (16, 64))
    workers = len(nodes) * per_node
    config = TrainConfig(data=str(data), out=str(out), arch="unet", arch_args={"depth": 4, "width": unet_width(params)},
                         noise="gaussian:25", batch_size=rows_per_gpu * workers, crop_size=crop, workers=workers,
                         device="cpu", progress=False, validation_images=0, buckets=buckets, step_timeout=600)
    worker_class = simulated_worker(step_ms, backward_costs(config))
    runs = {}
    try:
        for name in paths:
            pool_class = pinned(WorkerPool if name == "old" else OverlapPool, nodes, per_node)
            pool = pool_class(config, workers, use_gpu=False, worker_class=worker_class)
            model = make_model(config)
            flat = FlatParameters(model)
            # today's serial step ran the driver with torch's default threads; the new one with driver_threads
            threads = os.cpu_count() if name == "old" else pool.driver_threads()
            runs[name] = Path_(name, pool, flat, make_optimizer(config, model), threads)
        for run in runs.values():
            run.run(warmup)
        wall = {name: [] for name in runs}
        cpu = {name: [] for name in runs}
        roles_cpu = {name: [] for name in runs}
        meter = ProcessCPU()
        order = list(runs)
        for turn in range(turns):
            for name in (order if turn % 2 == 0 else order[::-1]):
                roles = _roles(runs[name].pool)
                before = meter.snapshot()
                t0, c0 = time.perf_counter(), time.process_time()
                runs[name].run(steps_per_turn)
                wall[name].append((time.perf_counter() - t0) / steps_per_turn)
                cpu[name].append((time.process_time() - c0) / steps_per_turn)
                split = meter.split(before, meter.snapshot(), roles)
                roles_cpu[name].append({k: v / steps_per_turn for k, v in split.items()})
    finally:
        for run in runs.values():
            run.pool.shutdown()
    layout = f"{len(nodes)}x{per_node}"
    med = statistics.median
    out_rows = []
    for name in runs:
        row = {"layout": layout, "params": params, "parameters": runs[name].flat.size, "gpu_step_ms": step_ms,
               "path": name, "crops_per_gpu": rows_per_gpu, "crop_size": crop, "buckets": buckets,
               "wall_ms": 1e3 * med(wall[name]), "busy_fraction": med(step_ms / 1e3 / w for w in wall[name]),
               "driver_cpu_ms": 1e3 * med(cpu[name]), "driver_threads": runs[name].threads, "turns": turns,
               "steps_per_turn": steps_per_turn}
        if name == "new" and "old" in runs:
            row["old_over_new"] = med(o / n for o, n in zip(wall["old"], wall["new"]))
        # the machine's CPU per step by role, and the busy fraction its cores allow for that much work
        row["cpu_ms_per_step"] = {k: 1e3 * med(t[k] for t in roles_cpu[name]) for k in roles_cpu[name][0]}
        total_s = sum(row["cpu_ms_per_step"].values()) / 1e3
        row["cpu_bound_busy_limit"] = min(1.0, step_ms / 1e3 / (total_s / (os.cpu_count() or 1)))
        out_rows.append(row)
    return out_rows


def _roles(pool) -> dict[int, str]:
    """pid -> role of the driver, the pool's workers and its node reducers."""
    roles = {os.getpid(): "driver"}
    roles.update({p["pid"]: "workers" for p in pool.placement})
    for reducer in list(pool.reducers.values()):
        roles[ray.get(reducer.pid.remote())] = "reducers"
    return roles


def scaling(layouts=LAYOUTS, params_list=PARAMS, step_ms_list=STEP_MS, turns: int = 5, steps_per_turn: int = 10,
            warmup: int = 3, buckets: int = 8, paths=("old", "new"), batch=None, echo=print) -> list[dict]:
    """Every cell of layouts x P x step times; prints a line per row as it goes."""
    shape = [tuple(int(v) for v in layout.lower().split("x")) for layout in layouts]
    most_nodes = max(n for n, _ in shape)
    cells = []
    with tempfile.TemporaryDirectory() as tmp:
        data = make_images(Path(tmp) / "images")
        store = 2 << 30
        cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False,
                                                                "object_store_memory": store})
        try:
            node_ids = [cluster.add_node(num_cpus=1, object_store_memory=store).node_id for _ in range(most_nodes)]
            cluster.wait_for_nodes()
            ray.init(address=cluster.address, logging_level="WARNING", log_to_driver=False)
            for (n, k), layout in zip(shape, layouts):
                for params in params_list:
                    for step_ms in step_ms_list:
                        rows = measure_cell(node_ids[:n], k, params, step_ms, data, Path(tmp) / "out", turns,
                                            steps_per_turn, warmup, buckets, paths, batch)
                        for row in rows:
                            echo(format_row(row))
                        cells.extend(rows)
        finally:
            ray.shutdown()
            cluster.shutdown()
    return cells


def format_row(row: dict) -> str:
    ratio = f"  old/new {row['old_over_new']:.2f}x" if "old_over_new" in row else ""
    cpu = row["cpu_ms_per_step"]
    return (f"{row['layout']:>5} {row['params']:>11,} {row['gpu_step_ms']:>5.1f} ms {row['path']:>4}: "
            f"wall {row['wall_ms']:7.1f} ms/step  busy {row['busy_fraction']:.2f}  driver CPU "
            f"{row['driver_cpu_ms']:6.1f} ms/step{ratio}  | machine CPU ms/step: workers {cpu['workers']:.0f}, "
            f"reducers {cpu['reducers']:.0f}, driver {cpu['driver']:.0f}, other {cpu['other']:.0f} "
            f"(busy at most {row['cpu_bound_busy_limit']:.2f} on {os.cpu_count()} cores)")


def real_training(turns: int = 4, steps_per_turn: int = 8, warmup: int = 2, echo=print) -> dict:
    """Real training, not simulated: `n2n train`'s default U-Net on the CPU, 4 one-thread workers on a
    2-node Cluster (2 + 2), the serial and the overlapped step side by side in turns; steps/s of each
    and how far apart their weights are after the same steps."""
    med = statistics.median
    with tempfile.TemporaryDirectory() as tmp:
        data = make_images(Path(tmp) / "images", count=8, size=128)
        cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False})
        try:
            for _ in range(2):
                cluster.add_node(num_cpus=4)  # room for both paths' 2 workers per node; one path runs at a time
            cluster.wait_for_nodes()
            ray.init(address=cluster.address, logging_level="WARNING", log_to_driver=False)
            config = TrainConfig(data=str(data), out=str(Path(tmp) / "out"), batch_size=16, crop_size=64, workers=4,
                                 device="cpu", progress=False, validation_images=0)
            runs = {}
            for name in ("old", "new"):
                pool_class = WorkerPool if name == "old" else OverlapPool
                pool = pool_class(config.replace(overlap=name == "new"), 4, use_gpu=False)
                model = make_model(config)
                flat = FlatParameters(model)
                threads = os.cpu_count() if name == "old" else pool.driver_threads()
                runs[name] = Path_(name, pool, flat, make_optimizer(config, model), threads)
            try:
                for run in runs.values():
                    run.run(warmup)
                rate = {name: [] for name in runs}
                for turn in range(turns):
                    for name in (["old", "new"] if turn % 2 == 0 else ["new", "old"]):
                        t0 = time.perf_counter()
                        runs[name].run(steps_per_turn)
                        rate[name].append(steps_per_turn / (time.perf_counter() - t0))
                old, new = runs["old"].flat.weights, runs["new"].flat.weights
                apart = float((old - new).abs().max() / old.abs().max())
                placement = {name: sorted(p["node_id"][:8] for p in run.pool.placement) for name, run in runs.items()}
            finally:
                for run in runs.values():
                    run.pool.shutdown()
        finally:
            ray.shutdown()
            cluster.shutdown()
    result = {"model": "unet depth 5 width 48", "parameters": runs["old"].flat.size, "workers": "2 nodes x 2",
              "batch": "16 crops of 64x64", "steps": warmup + turns * steps_per_turn,
              "old_steps_per_s": med(rate["old"]), "new_steps_per_s": med(rate["new"]),
              "new_over_old": med(n / o for n, o in zip(rate["new"], rate["old"])),
              "max_relative_weight_difference": apart, "placement": placement}
    echo(f"real training, {result['model']} ({result['parameters']:,} parameters), {result['workers']} CPU workers, "
         f"{result['batch']}: serial {result['old_steps_per_s']:.3f} steps/s, overlapped "
         f"{result['new_steps_per_s']:.3f} steps/s, new/old {result['new_over_old']:.2f}x; after "
         f"{result['steps']} steps the weights differ by {apart:.1e} (relative, largest)")
    return result
