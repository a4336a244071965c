"""Benchmark of data-parallel training on Ray, side by side in one run.

    python bench/train.py                    # defaults: unet depth 3 width 16, batch 8, crops 64, 10 steps
    python bench/train.py --steps 20 --json results.json

Rows (all CPU, one torch thread per worker, the same global batch and data):
  1. in-process: the whole batch, gradients + Adam step in this process (no Ray);
  2. Ray, 1 actor x 1 thread: the driver loop of pipeline.training (weights through the
     object store, gradients back, weighted average, Adam on the driver) -> Ray overhead;
  3. Ray, 2 actors x 1 thread: speedup against row 2;
  4. Ray Train TorchTrainer, 2 workers x 1 thread, the torch.nn twin (bench/twins.py) with
     DistributedDataParallel (gloo), each worker on its shard of the same global batch.
Then the driver's own cost per step (put weights, fetch W gradients, average, Adam) for
W workers x P parameters, from synthetic tensors.
Step times are medians over the timed steps, after one warm-up step; rows 1-3 run interleaved
(one step of each in turn) so that all three see the same background load.
"""
from __future__ import annotations

import json
import logging
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import click
import numpy as np
import ray
import torch
from PIL import Image

from n2n_core import Adam, MSELoss
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


class InProcess:
    """The whole batch in this process: gradients + Adam, no Ray."""

    def __init__(self, config: TrainConfig):
        self.model, self.loss_fn = make_model(config), MSELoss()
        self.optimizer, self.batches = make_optimizer(config, self.model), make_batches(config)

    def step(self, step: int) -> None:
        x, y = self.batches.batch(step)
        shard_gradients(self.model, self.loss_fn, x, y)
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


def interleaved(runners: dict, steps: int) -> dict[str, float]:
    """Median seconds per step of each runner, their steps interleaved (A B C A B C ...) so that
    all of them see the same background load; one warm-up step each first."""
    times = {name: [] for name in runners}
    for step in range(steps + 1):
        for name, runner in runners.items():
            t0 = time.perf_counter()
            runner.step(step)
            if step:
                times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(ts) for name, ts in times.items()}


def _torch_train_loop(loop_config: dict) -> None:
    """Ray Train worker: DDP over the torch.nn twin on this worker's shard of each global batch."""
    import ray.train
    import ray.train.torch as rtt

    from bench.twins import build_torch_model

    torch.set_num_threads(1)
    config = TrainConfig(**loop_config["train_config"])
    ctx = ray.train.get_context()
    rank, size = ctx.get_world_rank(), ctx.get_world_size()
    torch.manual_seed(config.seed)
    model = rtt.prepare_model(build_torch_model(config.arch, **config.arch_args))
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr)
    batches = make_batches(config)
    positions = shard_positions(config.batch_size, size, rank)
    times = []
    for step in range(loop_config["steps"] + 1):
        t0 = time.perf_counter()
        x, y = batches.batch(step, positions)
        optimizer.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        optimizer.step()
        times.append(time.perf_counter() - t0)
    # Ray Train v2 keeps no metrics without a checkpoint: each rank writes its own file (one machine)
    Path(loop_config["out_dir"], f"rank{rank}.json").write_text(
        json.dumps({"median_step_s": statistics.median(times[1:]), "loss": float(loss.detach())}))


def ray_train(config: TrainConfig, workers: int, steps: int, storage: str) -> tuple[float, float]:
    """(median step time inside the workers (slowest rank), wall time of trainer.fit) for TorchTrainer."""
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    trainer = TorchTrainer(
        _torch_train_loop,
        train_loop_config={"train_config": config.to_dict(), "steps": steps, "out_dir": storage},
        scaling_config=ScalingConfig(num_workers=workers, use_gpu=False, resources_per_worker={"CPU": 1}),
        torch_config=TorchConfig(backend="gloo"),
        run_config=RunConfig(storage_path=storage, name="bench"),
    )
    Path(storage).mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    trainer.fit()
    wall = time.perf_counter() - t0
    per_rank = [json.loads(Path(storage, f"rank{r}.json").read_text())["median_step_s"] for r in range(workers)]
    return max(per_rank), wall


def driver_cost(workers_list, params_list, repeats: int = 3) -> list[dict]:
    """Driver seconds per step for W workers x P parameters (float32), split by phase."""
    rows = []
    for p in params_list:
        weights = {"w": torch.randn(p)}
        grads_refs_all = {w: [ray.put({"w": torch.randn(p)}) for _ in range(w)] for w in workers_list}
        param = torch.zeros(p)
        from n2n_core.module import Parameter

        par = Parameter(param)
        opt = Adam([par], lr=1e-3)
        for w in workers_list:
            put_t, get_t, avg_t, step_t = [], [], [], []
            for _ in range(repeats):
                t0 = time.perf_counter()
                ref = ray.put(weights)
                t1 = time.perf_counter()
                shards = ray.get(grads_refs_all[w])
                t2 = time.perf_counter()
                par.grad.zero_()
                for g in shards:
                    par.grad.add_(g["w"], alpha=1)
                par.grad.div_(w)
                t3 = time.perf_counter()
                opt.step()
                t4 = time.perf_counter()
                put_t.append(t1 - t0), get_t.append(t2 - t1), avg_t.append(t3 - t2), step_t.append(t4 - t3)
                del ref, shards
                rows.append({"workers": w, "params": p, "put_s": med(put_t), "get_s": med(get_t),
                         "average_s": med(avg_t), "adam_s": med(step_t),
                         "total_s": med(put_t) + med(get_t) + med(avg_t) + med(step_t)})
        del grads_refs_all
    return rows


@click.command()
@click.option("--depth", default=3, show_default=True)
@click.option("--width", default=16, show_default=True)
@click.option("--batch-size", default=8, show_default=True)
@click.option("--crop-size", default=64, show_default=True)
@click.option("--steps", default=10, show_default=True, help="Timed steps per row (after one warm-up).")
@click.option("--json", "json_path", type=click.Path(dir_okay=False), help="Also write the results here.")
@click.option("--skip-ray-train", is_flag=True, help="Leave out the TorchTrainer row.")
def main(depth, width, batch_size, crop_size, steps, json_path, skip_ray_train) -> None:
    """Time in-process, 1 and 2 Ray actors, Ray Train's TorchTrainer, and the driver's cost."""
    logging.getLogger("ray").setLevel(logging.WARNING)
    with tempfile.TemporaryDirectory() as tmp:
        data = make_images(Path(tmp) / "images", 8, 128)
        config = TrainConfig(data=str(data), out=str(Path(tmp) / "out"), arch="unet",
                             arch_args={"depth": depth, "width": width}, batch_size=batch_size,
                             crop_size=crop_size, device="cpu", progress=False, validation_images=0)
        params = make_model(config).num_parameters()
        results = {"machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs",
                   "torch": torch.__version__, "ray": ray.__version__, "model": f"unet depth {depth} width {width}",
                   "parameters": params, "batch_size": batch_size, "crop_size": crop_size, "steps": steps}
        results["load_average_before"] = os.getloadavg()
        torch.set_num_threads(1)
        ray.init(address="local", num_cpus=3, include_dashboard=False, logging_level=logging.WARNING)
        try:
            one, two = RayDriver(config, 1), RayDriver(config, 2)
            try:
                timed = interleaved({"in": InProcess(config), "one": one, "two": two}, steps)
            finally:
                one.pool.shutdown(), two.pool.shutdown()
            results["in_process_s"], results["ray_1_actor_s"], results["ray_2_actors_s"] = (
                timed["in"], timed["one"], timed["two"])
            if not skip_ray_train:
                try:
                    results["ray_train_2_workers_step_s"], results["ray_train_fit_wall_s"] = ray_train(
                        config, 2, steps, str(Path(tmp) / "ray_train"))
                except ImportError as e:
                    results["ray_train_error"] = f"ray.train needs more packages: {e}"
            results["driver_cost"] = driver_cost(WORKERS, PARAMS)
        finally:
            ray.shutdown()
        results["load_average_after"] = os.getloadavg()
    results["ray_overhead_pct"] = 100 * (results["ray_1_actor_s"] / results["in_process_s"] - 1)
    results["speedup_2_vs_1_actor"] = results["ray_1_actor_s"] / results["ray_2_actors_s"]
    click.echo(f"machine: {results['machine']}; torch {results['torch']}, ray {results['ray']}; load average "
               f"(1, 5, 15 min) before {results['load_average_before']}, after {results['load_average_after']}")
    click.echo(f"model: {results['model']} ({params:,} parameters), global batch {batch_size} x 3 x "
               f"{crop_size} x {crop_size}, float32, 1 torch thread per worker; median of {steps} steps, "
               "the first three rows interleaved step by step")
    click.echo(f"{'setting':<44}{'s/step':>10}{'images/s':>10}")
    rows = [("in-process (no Ray)", results["in_process_s"]),
            ("Ray, 1 actor x 1 thread", results["ray_1_actor_s"]),
            ("Ray, 2 actors x 1 thread", results["ray_2_actors_s"])]
    if "ray_train_2_workers_step_s" in results:
        rows.append(("Ray Train TorchTrainer (torch.nn), 2 x 1 thread", results["ray_train_2_workers_step_s"]))
    for name, s in rows:
        click.echo(f"{name:<44}{s:>10.4f}{batch_size / s:>10.1f}")
    click.echo(f"Ray overhead, 1 actor vs in-process: {results['ray_overhead_pct']:+.1f}% (target <= 10%)")
    click.echo(f"speedup, 2 actors vs 1 actor: {results['speedup_2_vs_1_actor']:.2f}x (target >= 1.7x)")
    if "ray_train_fit_wall_s" in results:
        click.echo(f"TorchTrainer.fit wall time (startup included): {results['ray_train_fit_wall_s']:.1f} s")
    if "ray_train_error" in results:
        click.echo(results["ray_train_error"])
    click.echo("driver cost per step (s): workers x parameters (put weights + get grads + average + Adam)")
    click.echo(f"{'params':>12}" + "".join(f"{'W=' + str(w):>10}" for w in WORKERS))
    for p in PARAMS:
        cells = [r["total_s"] for r in results["driver_cost"] if r["params"] == p]
        click.echo(f"{p:>12,}" + "".join(f"{c:>10.4f}" for c in cells))
    if json_path:
        Path(json_path).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
