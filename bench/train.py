"""Benchmark of data-parallel training on Ray, side by side in one run.

    python bench/train.py                    # defaults: the training defaults, unet depth 5 width 48,
                                             # global batch 16, crops 64, 10 timed steps; then the reduce
    python bench/train.py --depth 4 --width 32 --steps 20 --json results.json
    python bench/train.py --part reduce      # only the driver's cost, old vs new reduce (bench/reduce.py)
    python bench/train.py --part phases      # where the new reduce's driver time goes, 2 x 8, P = 1k and 1M
    python bench/train.py --part compiled    # the new reduce against the same step as a Ray Compiled Graph
    python bench/train.py --part scaling     # serial vs overlapped step on simulated GPUs (bench/scaling.py)
    python bench/train.py --part scaling --layouts 2x8 --params 1000000 --gpu-step-ms 80   # one cell

Rows (all CPU, one torch thread per worker, the same global batch and data):
  1. in-process: the whole batch, gradients + Adam step in this process (no Ray);
  2. Ray, 1 actor x 1 thread: the driver loop of pipeline.training (weights through the
     object store, gradients back, weighted average, Adam on the driver) -> Ray overhead;
  3. Ray, 2 actors x 1 thread: speedup against row 2;
  4. the torch.nn twin in-process (autograd, torch.optim.Adam), to tell compute from scaling;
  5. Ray Train TorchTrainer, 2 workers x 1 thread, the torch.nn twin (pipeline/export/torch_twins.py) with
     DistributedDataParallel (gloo) and torch.optim.Adam, each worker on its shard of the
     same global batch (made by the same TrainingBatches).
All five run interleaved, one step of each in turn (the TorchTrainer workers wait on a
baton actor between steps), so that all of them see the same background load; step times
are medians over the timed steps, after one warm-up step. Rows 1-4 are timed on the driver
(wall time of the whole step); row 5 inside its workers (slowest rank per step, from the
baton release to the end of its optimizer step), which leaves it no baton round trip.
Then (`--part reduce`, bench/reduce.py) the driver's cost per step for W workers on N nodes
x P parameters, the reduce before the node reducers against the one now, side by side on a
4-node ray.cluster_utils.Cluster with synthetic gradients, the models fitted to it, and
where they put the driver against a GPU's step.
Ray runs its worker processes at niceness 15; the benchmark gives its actors and TorchTrainer
workers the driver's niceness (or, without the privilege to do that, lowers the driver to
theirs; --keep-niceness does neither), so that on a machine with other work the in-process
row does not get more CPU than the actors.
"""
from __future__ import annotations

import asyncio
import json
import logging
import os
import statistics
import tempfile
import threading
import time
from pathlib import Path

import click
import numpy as np
import ray
import torch
from PIL import Image

from n2n_core import MSELoss
from pipeline.data.patches import shard_positions
from pipeline.training import TrainConfig
from pipeline.training.flat import FlatParameters
from pipeline.training.replica import make_batches, make_model, make_optimizer, shard_gradients
from pipeline.training.placement import WorkerPool
from bench.machine import describe_machine


def make_images(folder: Path, count: int, size: int) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(count):
        low = rng.random((8, 8, 3))
        img = np.kron(low, np.ones((size // 8, size // 8, 1)))
        Image.fromarray((img * 255).round().astype(np.uint8)).save(folder / f"img{i}.png")
    return folder


def set_niceness(pid: int, value: int) -> None:
    """Set the niceness of every thread of process `pid` (Linux niceness is per thread)."""
    tasks = Path(f"/proc/{pid}/task")
    for tid in ([int(t.name) for t in tasks.iterdir()] if tasks.is_dir() else [pid]):
        try:
            os.setpriority(os.PRIO_PROCESS, tid, value)
        except ProcessLookupError:  # a thread that ended meanwhile
            pass


class InProcess:
    """The whole batch in this process: gradients + Adam, no Ray."""

    def __init__(self, config: TrainConfig):
        self.model, self.loss_fn = make_model(config), MSELoss()
        self.optimizer, self.batches = make_optimizer(config, self.model), make_batches(config)
        self.grad_times: list[float] = []  # gradients alone (batch + forward + backward), per step

    def step(self, step: int) -> None:
        t0 = time.perf_counter()
        x, y = self.batches.batch(step)
        shard_gradients(self.model, self.loss_fn, x, y)
        self.grad_times.append(time.perf_counter() - t0)
        self.optimizer.step()


class InProcessTorch:
    """The torch.nn twin on the whole batch in this process (forward, autograd, torch.optim.Adam): the
    peer's compute without Ray Train, to tell its per-step compute from its scaling."""

    def __init__(self, config: TrainConfig):
        from pipeline.export.torch_twins import build_torch_model

        torch.manual_seed(config.seed)
        self.model = build_torch_model(config.arch, **config.arch_args)
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=config.lr)
        self.batches = make_batches(config)

    def step(self, step: int) -> None:
        x, y = self.batches.batch(step)
        self.optimizer.zero_grad()
        torch.nn.functional.mse_loss(self.model(x), y).backward()
        self.optimizer.step()


class RayDriver:
    """The driver loop of pipeline.training.driver (no validation/checkpoints) over `workers` actors."""

    def __init__(self, config: TrainConfig, workers: int):
        self.model = make_model(config)
        self.flat = FlatParameters(self.model)
        self.optimizer = make_optimizer(config, self.model)
        self.pool = WorkerPool(config.replace(workers=workers), workers, use_gpu=False)

    def step(self, step: int) -> None:
        self.pool.gradients(self.flat.weights, step).mean_into(self.flat.grads)  # as pipeline.training.driver
        self.optimizer.step()


def interleaved(runners: dict, steps: int) -> dict[str, list[float]]:
    """Seconds per timed step of each runner, their steps interleaved (A B C A B C ...) so that
    all of them see the same background load; one warm-up step each first (not timed).
    A runner whose step returns a number is timed by that number (its own inner timing)."""
    times = {name: [] for name in runners}
    for step in range(steps + 1):
        for name, runner in runners.items():
            t0 = time.perf_counter()
            inner = runner.step(step)
            if step:
                times[name].append(inner if inner is not None else time.perf_counter() - t0)
    return times


@ray.remote(num_cpus=0)
class Baton:
    """Lets the TorchTrainer workers take one step at a time, when the driver says so."""

    def __init__(self, ranks: int):
        self.ranks, self.allowed, self.done = ranks, -1, {}
        self.cond = None

    def _cond(self) -> asyncio.Condition:
        if self.cond is None:
            self.cond = asyncio.Condition()
        return self.cond

    async def go(self, step: int) -> dict:
        """Driver: release `step`; returns {rank: seconds} once every rank has finished it."""
        cond = self._cond()
        async with cond:
            self.allowed = step
            cond.notify_all()
            await cond.wait_for(lambda: len(self.done.get(step, {})) == self.ranks)
            return self.done.pop(step)

    async def wait(self, step: int) -> None:
        cond = self._cond()
        async with cond:
            await cond.wait_for(lambda: self.allowed >= step)

    async def report(self, step: int, rank: int, seconds: float) -> None:
        cond = self._cond()
        async with cond:
            self.done.setdefault(step, {})[rank] = seconds
            cond.notify_all()


def _torch_train_loop(loop_config: dict) -> None:
    """Ray Train worker: DDP over the torch.nn twin on this worker's shard of each global batch."""
    import ray.train
    import ray.train.torch as rtt

    from pipeline.export.torch_twins import build_torch_model

    torch.set_num_threads(1)
    if loop_config["niceness"] is not None:  # the same priority as the other rows (see main)
        set_niceness(os.getpid(), loop_config["niceness"])
    config = TrainConfig(**loop_config["train_config"])
    ctx = ray.train.get_context()
    rank, size = ctx.get_world_rank(), ctx.get_world_size()
    torch.manual_seed(config.seed)
    model = rtt.prepare_model(build_torch_model(config.arch, **config.arch_args))
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr)
    batches = make_batches(config)
    positions = shard_positions(config.batch_size, size, rank)
    baton = loop_config["baton"]
    for step in range(loop_config["steps"] + 1):
        ray.get(baton.wait.remote(step))
        t0 = time.perf_counter()
        x, y = batches.batch(step, positions)
        optimizer.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        optimizer.step()
        ray.get(baton.report.remote(step, rank, time.perf_counter() - t0))


class RayTrain:
    """Ray Train's TorchTrainer, fit() in a thread, its workers stepping when `step` releases them."""

    def __init__(self, config: TrainConfig, workers: int, steps: int, storage: str, niceness: int | None):
        from ray.train import RunConfig, ScalingConfig
        from ray.train.torch import TorchConfig, TorchTrainer

        self.baton = Baton.options(max_concurrency=4 * workers + 4).remote(workers)
        self.trainer = TorchTrainer(
            _torch_train_loop,
            train_loop_config={"train_config": config.to_dict(), "steps": steps, "baton": self.baton,
                               "niceness": niceness},
            scaling_config=ScalingConfig(num_workers=workers, use_gpu=False, resources_per_worker={"CPU": 1}),
            torch_config=TorchConfig(backend="gloo"),
            run_config=RunConfig(storage_path=storage, name="bench"),
        )
        Path(storage).mkdir(parents=True, exist_ok=True)
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._fit, daemon=True)
        self.thread.start()

    def _fit(self) -> None:
        try:
            self.trainer.fit()
        except BaseException as e:  # reported by step()/join()
            self.error = e

    def step(self, step: int) -> float:
        """Seconds of `step` inside the workers: the slowest rank."""
        ref = self.baton.go.remote(step)
        while True:
            done, _ = ray.wait([ref], timeout=1.0)
            if done:
                return max(ray.get(ref).values())
            if self.error is not None or not self.thread.is_alive():
                raise RuntimeError(f"TorchTrainer stopped: {self.error!r}")

    def join(self) -> None:
        self.thread.join()
        if self.error is not None:
            raise RuntimeError(f"TorchTrainer failed: {self.error!r}") from self.error


@click.command()
@click.option("--depth", default=5, show_default=True, help="U-Net depth (the training default).")
@click.option("--width", default=48, show_default=True, help="U-Net width (the training default).")
@click.option("--batch-size", default=16, show_default=True, help="Global batch, split across the workers.")
@click.option("--crop-size", default=64, show_default=True)
@click.option("--steps", default=10, show_default=True, help="Timed steps per row (after one warm-up).")
@click.option("--part", type=click.Choice(["all", "steps", "reduce", "phases", "compiled", "scaling", "real"]),
              default="all",
              show_default=True,
              help="steps: rows 1-5 (see the module's docstring); reduce: the driver's cost, old vs new reduce, "
                   "on a 4-node cluster (bench/reduce.py); phases: where the new reduce's driver time goes at "
                   "2 nodes x 8 workers, at each --phases-params (not in `all`); compiled: the new reduce against "
                   "the same step as a Ray Compiled Graph, 2 x 2 and 2 x 8 at --phases-params (not in `all`); "
                   "scaling: the serial step against the overlapped one on simulated GPUs, every --layouts x "
                   "--params x --gpu-step-ms cell (bench/scaling.py; not in `all`); real: real CPU training, 4 "
                   "workers on 2 nodes, serial against overlapped step (not in `all`).")
@click.option("--layouts", default="1x1,1x2,1x4,2x4,2x8", show_default=True,
              help="--part scaling: NODESxWORKERS layouts, comma-separated.")
@click.option("--params", default="1000000,16000000", show_default=True,
              help="--part scaling: parameter counts (a depth-4 U-Net of about that size), comma-separated.")
@click.option("--gpu-step-ms", default="20.4,80", show_default=True,
              help="--part scaling: simulated GPU step times in ms, comma-separated (20.4: 16 crops of 64x64 per "
                   "GPU; 80: 4 crops of 256x256; other times: 16 crops of 64x64).")
@click.option("--batch-per-gpu", default=None, metavar="CROPSxSIZE",
              help="--part scaling: every cell draws this batch per GPU (e.g. 1x16) instead of its step time's; "
                   "a diagnostic that leaves this machine's CPU to the step itself.")
@click.option("--turns", default=5, show_default=True, help="--part scaling: timed turns of each path per cell.")
@click.option("--steps-per-turn", default=10, show_default=True, help="--part scaling: steps of one turn.")
@click.option("--buckets", default=8, show_default=True, help="--part scaling: the overlapped step's buckets.")
@click.option("--phases-params", type=int, multiple=True, default=(1000, 1_000_000), show_default=True,
              help="Parameter counts for --part phases and --part compiled: a tiny P shows Ray's fixed work "
                   "per step, 1M the goal's.")
@click.option("--reduce-repeats", default=5, show_default=True, help="Timed turns per reduce cell (after 2 warm-up); --part compiled takes twice as many "
                   "(after 3 warm-up).")
@click.option("--json", "json_path", type=click.Path(dir_okay=False), help="Also write the results here.")
@click.option("--skip-ray-train", is_flag=True, help="Leave out the TorchTrainer row.")
@click.option("--keep-niceness", is_flag=True,
              help="Leave the niceness of the driver and of Ray's workers as they are.")
def main(depth, width, batch_size, crop_size, steps, part, phases_params, layouts, params, gpu_step_ms, batch_per_gpu,
         turns, steps_per_turn, buckets, reduce_repeats, json_path, skip_ray_train, keep_niceness) -> None:
    """Time in-process, 1 and 2 Ray actors, Ray Train's TorchTrainer, and the driver's cost."""
    logging.getLogger("ray").setLevel(logging.WARNING)
    results = {"machine": describe_machine(), "torch": torch.__version__, "ray": ray.__version__,
               "load_average_before": os.getloadavg()}
    if part in ("all", "steps"):
        results["steps"] = steps_benchmark(depth, width, batch_size, crop_size, steps, skip_ray_train, keep_niceness)
    if part in ("all", "reduce"):
        results["reduce"] = reduce_benchmark(reduce_repeats)
    if part == "phases":
        from bench.reduce import phases

        results["phases"] = []
        for params in phases_params:
            found = phases(params=params)
            results["phases"].append(found)
            click.echo(f"the new reduce's driver, {found['nodes']} nodes x {found['per_node']} workers x "
                       f"{found['params']:,} parameters, median of {found['steps']} steps, ms (wall / driver CPU):")
            for name, value in found["wall_ms"].items():
                click.echo(f"  {name:>10}: {value:7.2f} / {found['driver_cpu_ms'][name]:7.2f}")
    if part == "compiled":
        from bench.reduce import compiled

        results["compiled"] = compiled(params_list=phases_params, repeats=reduce_repeats * 2)
        click.echo("the new reduce against the same step as a compiled graph, medians, ms (wall / driver CPU), "
                   "and the median ratio new / this of the turns:")
        for row in results["compiled"]:
            click.echo(f"  {row['nodes']} x {row['per_node']} x {row['params']:>9,} {row['reduce']:>8}: "
                       f"{1e3 * row['wall_s']:7.1f} / {1e3 * row['driver_cpu_s']:6.1f}   new / this: wall "
                       f"{row['new_over_this_wall']:.2f}x, CPU {row['new_over_this_cpu']:.2f}x"
                       f"{'' if row['same_weights'] else '   WEIGHTS DIFFER'}")
    if part == "scaling":
        from bench.scaling import scaling

        click.echo("serial (old) and overlapped (new) step on simulated GPUs, medians over turns; busy = GPU step / "
                   "wall per step; driver CPU per step (all its threads)")
        results["cells"] = scaling(layouts=[v.strip() for v in layouts.split(",")],
                                   params_list=[int(v) for v in params.split(",")],
                                   step_ms_list=[float(v) for v in gpu_step_ms.split(",")], turns=turns,
                                   steps_per_turn=steps_per_turn, buckets=buckets, echo=click.echo,
                                   batch=tuple(int(v) for v in batch_per_gpu.lower().split("x")) if batch_per_gpu else None)
    if part == "real":
        from bench.scaling import real_training

        results["real"] = real_training(echo=click.echo)
    results["load_average_after"] = os.getloadavg()
    click.echo(f"machine: {results['machine']}; torch {results['torch']}, ray {results['ray']}; load average "
               f"(1, 5, 15 min) before {results['load_average_before']}, after {results['load_average_after']}")
    if json_path:
        Path(json_path).write_text(json.dumps(results, indent=2))


def steps_benchmark(depth, width, batch_size, crop_size, steps, skip_ray_train, keep_niceness) -> dict:
    """Rows 1-5 interleaved step by step; prints the table and returns the figures."""
    med = statistics.median
    with tempfile.TemporaryDirectory() as tmp:
        data = make_images(Path(tmp) / "images", 8, 128)
        config = TrainConfig(data=str(data), out=str(Path(tmp) / "out"), arch="unet",
                             arch_args={"depth": depth, "width": width}, batch_size=batch_size,
                             crop_size=crop_size, device="cpu", progress=False, validation_images=0)
        params = make_model(config).num_parameters()
        results = {"model": f"unet depth {depth} width {width}", "parameters": params,
                   "batch_size": batch_size, "crop_size": crop_size, "steps": steps}
        torch.set_num_threads(1)
        # logical CPUs for 1 + 2 actors + 2 TorchTrainer workers: only one row runs at a time
        ray.init(address="local", num_cpus=6, include_dashboard=False, logging_level=logging.WARNING)
        try:
            inproc = InProcess(config)
            runners = {"in": inproc, "one": RayDriver(config, 1), "two": RayDriver(config, 2)}
            # Ray starts its worker processes (our actors, the TorchTrainer workers) at niceness 15; on a
            # machine with other work a nice-0 in-process row would get more CPU than the actors for
            # reasons that are not Ray's. Give the actors the driver's niceness (needs the privilege to
            # lower a niceness), else lower the driver to theirs.
            results["ray_worker_niceness"] = ray.get(ray.remote(num_cpus=0)(lambda: os.nice(0)).remote())
            pids = [p["pid"] for name in ("one", "two") for p in runners[name].pool.placement]
            niceness = None
            if not keep_niceness:
                niceness = os.nice(0)
                try:
                    for pid in pids:
                        set_niceness(pid, niceness)
                except PermissionError:
                    niceness = max(niceness, results["ray_worker_niceness"])
                    set_niceness(os.getpid(), niceness)
                    for pid in pids:
                        set_niceness(pid, niceness)
            results["niceness"] = os.nice(0)
            if not skip_ray_train:
                runners["torch"] = InProcessTorch(config)
                runners["train"] = RayTrain(config, 2, steps, str(Path(tmp) / "ray_train"), niceness)
            try:
                times = interleaved(runners, steps)
                if "train" in runners:
                    runners["train"].join()
            finally:
                runners["one"].pool.shutdown(), runners["two"].pool.shutdown()
            results["step_times_s"] = times
            results["in_process_s"], results["ray_1_actor_s"], results["ray_2_actors_s"] = (
                med(times["in"]), med(times["one"]), med(times["two"]))
            results["in_process_gradients_s"] = med(inproc.grad_times[1:])
            if "train" in times:
                results["torch_in_process_s"] = med(times["torch"])
                results["ray_train_2_workers_s"] = med(times["train"])
        finally:
            ray.shutdown()

    def ratio(a, b):  # median of the per-step ratios a/b (the steps were interleaved)
        return med(x / y for x, y in zip(times[a], times[b]))

    results["ray_overhead_pct"] = 100 * (ratio("one", "in") - 1)
    results["speedup_2_vs_1_actor"] = ratio("one", "two")
    if "train" in times:
        results["ray_train_vs_2_actors"] = ratio("train", "two")
        results["n2n_vs_torch_in_process"] = ratio("in", "torch")
        results["ray_train_speedup_2_vs_in_process"] = ratio("torch", "train")
    results["gradient_s_per_image"] = results["in_process_gradients_s"] / batch_size
    click.echo(f"model: {results['model']} ({params:,} parameters), global batch {batch_size} x 3 x "
               f"{crop_size} x {crop_size}, float32, 1 torch thread per worker; median of {steps} steps, "
               f"all rows interleaved step by step; every row at niceness {results['niceness']} (Ray's workers "
               f"start at {results['ray_worker_niceness']})")
    click.echo(f"{'setting':<50}{'s/step':>10}{'images/s':>10}")
    rows = [("in-process (no Ray)", results["in_process_s"]),
            ("Ray, 1 actor x 1 thread", results["ray_1_actor_s"]),
            ("Ray, 2 actors x 1 thread", results["ray_2_actors_s"])]
    if "ray_train_2_workers_s" in results:
        rows.append(("torch.nn twin in-process (no Ray)", results["torch_in_process_s"]))
        rows.append(("Ray Train TorchTrainer (torch.nn, DDP), 2 x 1 thread", results["ray_train_2_workers_s"]))
    for name, sec in rows:
        click.echo(f"{name:<50}{sec:>10.3f}{batch_size / sec:>10.2f}")
    click.echo(f"Ray overhead, 1 actor vs in-process: {results['ray_overhead_pct']:+.1f}% (target <= 10%)")
    click.echo(f"speedup, 2 actors vs 1 actor: {results['speedup_2_vs_1_actor']:.2f}x (target >= 1.7x)")
    if "ray_train_vs_2_actors" in results:
        click.echo(f"TorchTrainer step / 2-actor step: {results['ray_train_vs_2_actors']:.2f} "
                   "(below 1: the peer is faster)")
        click.echo(f"split: in-process step n2n / torch.nn {results['n2n_vs_torch_in_process']:.2f}x; "
                   f"TorchTrainer 2 workers vs torch.nn in-process {results['ray_train_speedup_2_vs_in_process']:.2f}x")
    click.echo(f"gradients in-process: {1e3 * results['gradient_s_per_image']:.0f} ms per {crop_size}x{crop_size} "
               "image (1 thread)")
    return results


def reduce_benchmark(repeats: int) -> dict:
    """The driver's cost per step, old and new reduce, on a 4-node Cluster (bench/reduce.py); prints
    the table, the fitted models and the projection onto GPU steps, and returns them."""
    from bench.reduce import LAYOUTS, PARAMS, fit_new, fit_old, measure, projection

    rows = measure(LAYOUTS, PARAMS, repeats)
    c, d, e = fit_old(rows), fit_new(rows), fit_new(rows, reduce="nodes")  # the driver's CPU time
    c_wall, d_wall, e_wall = fit_old(rows, "wall_s"), fit_new(rows, "wall_s"), fit_new(rows, "wall_s", "nodes")
    click.echo(f"driver cost per step, ms (median of {repeats} turns; synthetic gradients, float32; the reduce "
               "alone: put, workers, reducers, fetch, average, Adam); old: one fetch per worker; nodes: node "
               "reducers, the driver calling every worker; new: the driver calling each node's reducer; "
               "ratios of the same turn's steps")
    click.echo(f"{'N x K':>7}{'W':>4}{'P':>12}{'old':>10}{'nodes':>10}{'new':>10}{'old/new':>9}{'nodes/new':>10}"
               f"{'old cpu':>9}{'nodes cpu':>10}{'new cpu':>9}")
    for n, k in LAYOUTS:
        for p in PARAMS:
            cell = {r["reduce"]: r for r in rows if (r["nodes"], r["per_node"], r["params"]) == (n, k, p)}
            click.echo(f"{f'{n} x {k}':>7}{n * k:>4}{p:>12,}" + "".join(
                f"{1e3 * cell[name]['wall_s']:>10.1f}" for name in ("old", "nodes", "new"))
                + f"{cell['old']['this_over_new']:>8.2f}x{cell['nodes']['this_over_new']:>9.2f}x"
                + f"{1e3 * cell['old']['driver_cpu_s']:>9.1f}{1e3 * cell['nodes']['driver_cpu_s']:>10.1f}"
                + f"{1e3 * cell['new']['driver_cpu_s']:>9.1f}")
    for what, (c_, e_, d_) in (("driver CPU", (c, e, d)), ("wall", (c_wall, e_wall, d_wall))):
        click.echo(f"{what} fit, old: {1e3 * c_[0]:.2f} ms + {1e9 * c_[1]:.2f} ns x P + {1e9 * c_[2]:.2f} ns x W x P")
        for name, f in (("nodes", e_), ("new", d_)):
            click.echo(f"{what} fit, {name}: {1e3 * f[0]:.2f} ms + {1e9 * f[1]:.2f} ns x P + {1e9 * f[2]:.2f} ns x N x P "
                       f"+ {1e9 * f[3]:.2f} ns x K x P")
    proj = projection(c, d)
    click.echo("projection: driver cost (its CPU-time fit + the head's network, float32) / GPU step "
               "(16 crops of 64x64 per GPU)")
    click.echo(f"{'GPU':>5}{'params':>10}{'GPUs':>6}{'layout':>17}{'Gbit/s':>8}{'step ms':>9}{'old ms':>9}"
               f"{'old %':>7}{'new ms':>9}{'new %':>7}")
    for r in proj:
        click.echo(f"{r['gpu']:>5}{r['params']:>10,}{r['gpus']:>6}{r['layout']:>17}{r['head_gbit_s']:>8.0f}"
                   f"{1e3 * r['gpu_step_s']:>9.1f}{1e3 * r['old_s']:>9.1f}{100 * r['old_fraction']:>6.0f}%"
                   f"{1e3 * r['new_s']:>9.1f}{100 * r['new_fraction']:>6.0f}%")
    return {"rows": rows, "old_fit_cpu": c, "new_fit_cpu": d, "nodes_fit_cpu": e, "old_fit_wall": c_wall,
            "new_fit_wall": d_wall, "nodes_fit_wall": e_wall, "projection": proj}

if __name__ == "__main__":
    main()
