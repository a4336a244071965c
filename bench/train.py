"""Benchmark of data-parallel training on Ray, side by side in one run.

    python bench/train.py                    # defaults: the training defaults, unet depth 5 width 48,
                                             # global batch 16, crops 64, 10 timed steps
    python bench/train.py --depth 4 --width 32 --steps 20 --json results.json

Rows (all CPU, one torch thread per worker, the same global batch and data):
  1. in-process: the whole batch, gradients + Adam step in this process (no Ray);
  2. Ray, 1 actor x 1 thread: the driver loop of pipeline.training (weights through the
     object store, gradients back, weighted average, Adam on the driver) -> Ray overhead;
  3. Ray, 2 actors x 1 thread: speedup against row 2;
  4. the torch.nn twin in-process (autograd, torch.optim.Adam), to tell compute from scaling;
  5. Ray Train TorchTrainer, 2 workers x 1 thread, the torch.nn twin (bench/twins.py) with
     DistributedDataParallel (gloo) and torch.optim.Adam, each worker on its shard of the
     same global batch (made by the same TrainingBatches).
All five run interleaved, one step of each in turn (the TorchTrainer workers wait on a
baton actor between steps), so that all of them see the same background load; step times
are medians over the timed steps, after one warm-up step. Rows 1-4 are timed on the driver
(wall time of the whole step); row 5 inside its workers (slowest rank per step, from the
baton release to the end of its optimizer step), which leaves it no baton round trip.
Then the driver's own cost per step (put weights, fetch W gradients, average, Adam) for
W workers x P parameters, from synthetic float32 tensors fetched from the local object
store (no network), and the size W x P at which it would exceed a worker's compute.
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
import platform
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

from n2n_core import Adam, MSELoss
from n2n_core.module import Parameter
from pipeline.patches import shard_positions
from pipeline.training import TrainConfig
from pipeline.training.parts import make_batches, make_model, make_optimizer, shard_gradients
from pipeline.training.placement import WorkerPool


WORKERS = (1, 2, 4, 8, 16)
PARAMS = (100_000, 1_000_000, 4_000_000, 16_000_000)


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
        from bench.twins import build_torch_model

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
        self.optimizer = make_optimizer(config, self.model)
        self.pool = WorkerPool(config.replace(workers=workers), workers, use_gpu=False)
        self.params = list(self.model.named_parameters())

    def step(self, step: int) -> None:
        shards = self.pool.gradients(self.model.state_dict(), step)
        total = sum(c for _, _, c in shards)
        for name, p in self.params:  # as pipeline.training.driver
            p.grad.zero_()
            for g, _, c in shards:
                p.grad.add_(g[name], alpha=c)
            p.grad.div_(total)
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

    from bench.twins import build_torch_model

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


def driver_cost(workers_list, params_list, repeats: int = 3) -> list[dict]:
    """Driver seconds per step for W workers x P parameters (float32), split by phase.

    As pipeline.training's driver does per step: put the weights, fetch W gradient dicts
    (from the local object store: the transfer between nodes is not included), average them
    weighted by count, Adam step. Medians of `repeats`, after one warm-up."""
    med = statistics.median
    rows = []
    for p in params_list:
        weights = {"w": torch.randn(p)}
        par = Parameter(torch.zeros(p))
        opt = Adam([par], lr=1e-3)
        for w in workers_list:
            grad_refs = [ray.put({"w": torch.randn(p)}) for _ in range(w)]  # as W workers return them
            put_t, get_t, avg_t, step_t = [], [], [], []
            for r in range(repeats + 1):
                t0 = time.perf_counter()
                ref = ray.put(weights)
                t1 = time.perf_counter()
                shards = ray.get(grad_refs)
                t2 = time.perf_counter()
                par.grad.zero_()
                for g in shards:
                    par.grad.add_(g["w"], alpha=1)
                par.grad.div_(w)
                t3 = time.perf_counter()
                opt.step()
                t4 = time.perf_counter()
                if r:
                    put_t.append(t1 - t0), get_t.append(t2 - t1), avg_t.append(t3 - t2), step_t.append(t4 - t3)
                del ref, shards
            rows.append({"workers": w, "params": p, "put_s": med(put_t), "get_s": med(get_t),
                         "average_s": med(avg_t), "adam_s": med(step_t),
                         "total_s": med(put_t) + med(get_t) + med(avg_t) + med(step_t)})
            del grad_refs
    return rows


def fit_driver_cost(rows: list[dict]) -> tuple[float, float, float]:
    """(c0, c1, c2) of total_s = c0 + c1 P + c2 W P over the driver-cost rows (least squares on
    relative residuals, so that the small rows count as much as the large ones)."""
    a = np.array([[1.0, r["params"], r["workers"] * r["params"]] for r in rows])
    b = np.array([r["total_s"] for r in rows])
    c0, c1, c2 = np.linalg.lstsq(a / b[:, None], np.ones_like(b), rcond=None)[0]
    return float(c0), float(c1), float(c2)


def bottleneck(c: tuple[float, float, float], params: int, worker_s: float) -> float:
    """Workers W at which the fitted driver cost c0 + c1 P + c2 W P equals `worker_s`, one worker's
    compute per step (the workers wait while the driver works: beyond W it is the larger part)."""
    c0, c1, c2 = c
    return (worker_s - c0 - c1 * params) / (c2 * params)


@click.command()
@click.option("--depth", default=5, show_default=True, help="U-Net depth (the training default).")
@click.option("--width", default=48, show_default=True, help="U-Net width (the training default).")
@click.option("--batch-size", default=16, show_default=True, help="Global batch, split across the workers.")
@click.option("--crop-size", default=64, show_default=True)
@click.option("--steps", default=10, show_default=True, help="Timed steps per row (after one warm-up).")
@click.option("--driver-repeats", default=3, show_default=True, help="Repeats per driver-cost cell.")
@click.option("--json", "json_path", type=click.Path(dir_okay=False), help="Also write the results here.")
@click.option("--skip-ray-train", is_flag=True, help="Leave out the TorchTrainer row.")
@click.option("--keep-niceness", is_flag=True,
              help="Leave the niceness of the driver and of Ray's workers as they are.")
def main(depth, width, batch_size, crop_size, steps, driver_repeats, json_path, skip_ray_train,
         keep_niceness) -> None:
    """Time in-process, 1 and 2 Ray actors, Ray Train's TorchTrainer, and the driver's cost."""
    logging.getLogger("ray").setLevel(logging.WARNING)
    med = statistics.median
    with tempfile.TemporaryDirectory() as tmp:
        data = make_images(Path(tmp) / "images", 8, 128)
        config = TrainConfig(data=str(data), out=str(Path(tmp) / "out"), arch="unet",
                             arch_args={"depth": depth, "width": width}, batch_size=batch_size,
                             crop_size=crop_size, device="cpu", progress=False, validation_images=0)
        params = make_model(config).num_parameters()
        results = {"machine": f"{platform.machine()}, {os.cpu_count()} CPUs", "torch": torch.__version__,
                   "ray": ray.__version__, "model": f"unet depth {depth} width {width}", "parameters": params,
                   "batch_size": batch_size, "crop_size": crop_size, "steps": steps}
        results["load_average_before"] = os.getloadavg()
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
            results["driver_cost"] = driver_cost(WORKERS, PARAMS, driver_repeats)
        finally:
            ray.shutdown()
        results["load_average_after"] = os.getloadavg()

    def ratio(a, b):  # median of the per-step ratios a/b (the steps were interleaved)
        return med(x / y for x, y in zip(times[a], times[b]))

    results["ray_overhead_pct"] = 100 * (ratio("one", "in") - 1)
    results["speedup_2_vs_1_actor"] = ratio("one", "two")
    if "train" in times:
        results["ray_train_vs_2_actors"] = ratio("train", "two")
        results["n2n_vs_torch_in_process"] = ratio("in", "torch")
        results["ray_train_speedup_2_vs_in_process"] = ratio("torch", "train")
    c = fit_driver_cost(results["driver_cost"])
    per_image = results["in_process_gradients_s"] / batch_size
    shard = max(1, batch_size // 2)
    results["driver_fit_s"] = {"c0": c[0], "per_param": c[1], "per_worker_param": c[2]}
    results["gradient_s_per_image"] = per_image
    # per worker: the 2-actor row's shard, and one crop (the most workers a global batch allows)
    results["bottleneck_workers"] = {crops: bottleneck(c, params, crops * per_image) for crops in (shard, 1)}

    click.echo(f"machine: {results['machine']}; torch {results['torch']}, ray {results['ray']}; load average "
               f"(1, 5, 15 min) before {results['load_average_before']}, after {results['load_average_after']}")
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
    click.echo("driver cost per step (ms): put weights + get W gradients + average + Adam, float32, local object store")
    click.echo(f"{'parameters':>12}" + "".join(f"{'W=' + str(w):>10}" for w in WORKERS))
    for p in PARAMS:
        cells = [r["total_s"] for r in results["driver_cost"] if r["params"] == p]
        click.echo(f"{p:>12,}" + "".join(f"{1e3 * x:>10.1f}" for x in cells))
    click.echo(f"fit: {1e3 * c[0]:.2f} ms + {1e9 * c[1]:.2f} ns x P + {1e9 * c[2]:.2f} ns x W x P")
    click.echo(f"gradients in-process: {1e3 * per_image:.0f} ms per {crop_size}x{crop_size} image (1 thread); "
               f"the driver would exceed a worker's compute for this model ({params:,} parameters) "
               + "; ".join(f"at W = {w:.0f} workers of {crops} crop{'s' if crops > 1 else ''} each "
                           f"(W x P = {w * params:.2e})" for crops, w in results["bottleneck_workers"].items()))
    if json_path:
        Path(json_path).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
