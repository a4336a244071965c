"""The driver's cost per step, old reduce against new, on a multi-node ray.cluster_utils.Cluster.

Run through bench/train.py (`python bench/train.py --part reduce`). Side by side in one
run, on one Cluster of 4 nodes (plus a head without CPUs that only the driver uses):

- old: the reduce as pipeline.training did it before the node reducers: the weights put
  as a dict of torch tensors, each worker's gradient dict fetched by the driver one after
  the other (torch tensors are pickled by Ray: a copy each way), averaged there, Adam;
- nodes: the first node reducers (commit aa351dc): flat numpy buffers, one NodeReducer
  per node summing its workers, the nodes' sums fetched together, but the driver itself
  calling every worker and handing each reducer the refs of its node's results (W + N
  tasks a step, and W results owned by the driver and borrowed by the reducers);
- new: pipeline.training's WorkerPool.gradients as it is: the driver calls each node's
  reducer once, the reducer calls its node's workers (N tasks a step from the driver),
  then the driver's division and Adam, exactly as pipeline.training.driver does them;
- new, bfloat16: the same with `gradient_dtype="bfloat16"` (`measure(bf16_layout=(N, K))`;
  not in the default run, which fits a 2-core, 24 GiB machine).

`compiled(...)` (`bench/train.py --part compiled`) sets the new reduce beside the same step as a
Ray Compiled Graph (`ray.dag`, beta since Ray 2.44): the graph weights -> each worker's
`grads` -> its node's `SumActor.sum` -> the driver is compiled once, and a step is one
`execute` over shared-memory channels instead of Ray tasks; the driver's mean and Adam are
the same. Its own actors (a compiled graph holds its actors), pinned alike.

Gradients are synthetic: each worker returns a fixed random buffer of P values at once (no
model, no data), so a step's wall time is the reduce alone: what every worker waits for
between two steps, beyond its own compute. The workers are pinned, K to each of N nodes
(as K GPUs on each of N machines), and reserve no CPU. After two warm-up steps of each, the
rows take one step each in turn (the order rotating), repeated; figures are medians, the
ratio is the median of the per-turn ratios old / new. The wall time includes the reducers'
and workers' own work, which here shares the machine's cores with the driver (on a cluster
each node has its own); the driver's CPU time (`time.process_time`, all its threads) is
reported beside it.

Fitted models (least squares on relative residuals), to the driver's CPU time per step (its
own work, which waiting for busy cores does not inflate) and, apart, to the wall time:
    old: t = c0 + c1 P + c2 W P
    new: t = d0 + d1 P + d2 N P + d3 K P     (N nodes, K workers per node, W = N K)
The projection onto a GPU cluster adds to the driver's CPU time the time the head's network
link needs for the step's bytes (`network_s`), since here all nodes share one machine's
loopback; the workers' and reducers' own latency on their nodes is not in it.
"""
from __future__ import annotations

import statistics
import time

import numpy as np
import ray
import torch
from ray.cluster_utils import Cluster
from ray.dag import InputNode, MultiOutputNode
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from bench.scaling import PinnedWorkers
from n2n_core import Adam
from n2n_core.module import Parameter
from pipeline.data.patches import shard_positions
from pipeline.training import TrainConfig
from pipeline.training.flat import StepGradients, from_wire, to_wire
from pipeline.training.placement import WorkerPool
from pipeline.training.worker import GradientWorker

LAYOUTS = ((1, 4), (4, 1), (4, 2), (4, 4), (2, 8))  # (nodes N, workers per node K); 2 x 8: two 8-GPU nodes
PARAMS = (1_000_000, 16_000_000)
ROWS_PER_IMAGE = 16  # rows of the global batch per worker (weak scaling; only the counts matter here)


class SyntheticWorker(GradientWorker):
    """A gradient worker without a model: `grads` returns a fixed random (P,) buffer at once,
    P being the length of the weights it is sent (which it receives as a real worker does).
    `old_grads` answers the old reduce the same way, in its wire format (a dict of torch
    tensors), so that both reduces use the same actors (half the processes)."""

    def __init__(self, config: TrainConfig, threads: int | None = 1, device=None):
        self.config, self.device = config, torch.device("cpu")
        self.buffers: dict[int, torch.Tensor] = {}

    def _buffer(self, p: int) -> torch.Tensor:
        if p not in self.buffers:
            self.buffers[p] = torch.randn(p, generator=torch.Generator().manual_seed(p))
        return self.buffers[p]

    def grads(self, weights, step: int, positions: range):
        return to_wire(self._buffer(len(weights)), self.config.gradient_dtype), 0.0, len(positions)

    def old_grads(self, weights: dict, step: int, positions: range):
        return {"w": self._buffer(weights["w"].numel())}, 0.0, len(positions)


class PinnedPool(PinnedWorkers, WorkerPool):
    """pipeline.training's WorkerPool with worker i on nodes[i // per_node], reserving no CPU."""

    def __init__(self, config: TrainConfig, nodes: list[str], per_node: int):
        self.nodes, self.per_node = nodes, per_node
        super().__init__(config, len(nodes) * per_node, use_gpu=False, worker_class=SyntheticWorker)


class OldReduce:
    """The driver's step before the node reducers (pipeline.training at the commit before them),
    over the same actors as the new reduce (their `old_grads`)."""

    def __init__(self, actors: list):
        self.actors = actors

    def step(self, param: Parameter, optimizer, step: int) -> None:
        n = len(self.actors)
        shards = [shard_positions(ROWS_PER_IMAGE * n, n, i) for i in range(n)]
        weights_ref = ray.put({"w": param.data})
        pending = {i: self.actors[i].old_grads.remote(weights_ref, step, shards[i]) for i in range(n)}
        results = {}
        while pending:  # one by one, in worker order, as WorkerPool.gradients did
            index, ref = next(iter(pending.items()))
            results[index] = ray.get(ref)
            del pending[index]
        shards = [results[i] for i in range(n)]
        total = sum(c for _, _, c in shards)
        param.grad.zero_()
        for grads, _, count in shards:
            param.grad.add_(grads["w"], alpha=count)
        param.grad.div_(total)
        optimizer.step()

    def shutdown(self) -> None:
        pass  # the actors are the new reduce's


class NodesDriverCalls:
    """The node reducers as first built (commit aa351dc), happy path: the driver calls every worker
    and hands each node's reducer the refs of its workers' results. Same actors and reducers as
    the new reduce."""

    def __init__(self, pool: WorkerPool):
        self.pool = pool

    def step(self, param: Parameter, optimizer, step: int) -> None:
        pool, n = self.pool, self.pool.num_workers
        shards = [shard_positions(pool.config.batch_size, n, i) for i in range(n)]
        weights_ref = ray.put(to_wire(param.data))
        refs = [pool.actors[i].grads.remote(weights_ref, step, shards[i]) for i in range(n)]
        by_node: dict[str, list[int]] = {}
        for i in range(n):
            by_node.setdefault(pool.placement[i]["node_id"], []).append(i)
        calls = []
        for node_id, idx in by_node.items():
            if len(idx) == 1:
                calls.append((idx[0], refs[idx[0]], False))
            else:
                calls.append((idx[0], pool._reducer(node_id).reduce.remote(
                    [(i, refs[i]) for i in idx], "float32", "same", 600.0), True))
        gradients = StepGradients()
        results = ray.get([ref for _, ref, _ in calls])  # fetched together
        for (_, _, summed), result in zip(calls, results):  # added in node order
            if summed:
                gradients.parts.append((result["grads"], 1))
                gradients.count += result["count"]
            else:
                gradients.parts.append((result[0], result[2]))
                gradients.count += result[2]
        gradients.mean_into(param.grad)
        optimizer.step()

    def shutdown(self) -> None:
        pass  # the pool is the new reduce's


class NewReduce:
    """The driver's step now: WorkerPool.gradients, the mean into the gradient buffer, Adam."""

    def __init__(self, nodes: list[str], per_node: int, gradient_dtype: str = "same"):
        config = TrainConfig(data="synthetic", out="synthetic", batch_size=ROWS_PER_IMAGE * len(nodes) * per_node,
                             gradient_dtype=gradient_dtype, device="cpu", progress=False)
        self.pool = PinnedPool(config, nodes, per_node)

    def step(self, param: Parameter, optimizer, step: int) -> None:
        gradients = self.pool.gradients(param.data, step)
        gradients.mean_into(param.grad)
        optimizer.step()

    def shutdown(self) -> None:
        self.pool.shutdown()


@ray.remote(num_cpus=0, max_restarts=0)
class SumActor:
    """A node's reducer inside a compiled graph: the count-weighted sum of its workers' results."""

    def sum(self, *results) -> tuple:
        """results: (wire gradient (P,), loss, count) per worker, in worker order -> (float32 (P,) sum, count)."""
        total = torch.zeros(len(results[0][0]), dtype=torch.float32)
        for grads, _, count in results:
            total.add_(from_wire(grads), alpha=count)
        return total.numpy(), sum(count for _, _, count in results)


class CompiledGraphReduce:
    """The new reduce's step as one compiled graph: weights -> K workers per node -> the node's
    SumActor -> the driver (N sums), then the same mean and Adam as the new reduce."""

    def __init__(self, nodes: list[str], per_node: int):
        config = TrainConfig(data="synthetic", out="synthetic", batch_size=ROWS_PER_IMAGE * len(nodes) * per_node,
                             device="cpu", progress=False)
        n = len(nodes) * per_node
        pin = [NodeAffinitySchedulingStrategy(node, soft=False) for node in nodes]
        worker = ray.remote(SyntheticWorker)
        self.workers = [worker.options(num_cpus=0, max_restarts=0, scheduling_strategy=pin[i // per_node]).remote(
            config, threads=1) for i in range(n)]
        self.sums = [SumActor.options(scheduling_strategy=s).remote() for s in pin]
        shards = [shard_positions(config.batch_size, n, i) for i in range(n)]
        with InputNode() as inp:
            outputs = [self.sums[j].sum.bind(*[self.workers[i].grads.bind(inp[0], inp[1], shards[i])
                                               for i in range(j * per_node, (j + 1) * per_node)])
                       for j in range(len(nodes))]
            self.graph = MultiOutputNode(outputs).experimental_compile()

    def step(self, param: Parameter, optimizer, step: int) -> None:
        gradients = StepGradients()
        for grads, count in ray.get(self.graph.execute(to_wire(param.data), step)):  # added in node order
            gradients.parts.append((grads, 1))
            gradients.count += count
        gradients.mean_into(param.grad)
        optimizer.step()

    def shutdown(self) -> None:
        self.graph.teardown(kill_actors=True)  # without kill_actors, teardown can wait forever on a busy actor


def start_cluster(nodes: int, object_store_bytes: int) -> tuple[Cluster, list[str]]:
    """A head without CPUs (the driver's) and `nodes` worker nodes; returns it and their node ids."""
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False,
                                                            "object_store_memory": object_store_bytes})
    ids = [cluster.add_node(num_cpus=1, object_store_memory=object_store_bytes).node_id for _ in range(nodes)]
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, logging_level="WARNING")
    return cluster, ids


def take_turns(reduces: dict, state: dict, warmup: int, repeats: int) -> tuple[dict, dict]:
    """One step of each reduce per turn, the order rotating by one every turn, `warmup` turns
    untimed then `repeats` timed; returns {name: [wall s]} and {name: [driver CPU s]} per turn."""
    names = list(reduces)
    wall, cpu = {name: [] for name in names}, {name: [] for name in names}
    for turn in range(warmup + repeats):
        for name in names[turn % len(names):] + names[:turn % len(names)]:
            t0, c0 = time.perf_counter(), time.process_time()
            reduces[name].step(*state[name], turn)
            t1, c1 = time.perf_counter(), time.process_time()
            if turn >= warmup:
                wall[name].append(t1 - t0)
                cpu[name].append(c1 - c0)
    return wall, cpu


def measure(layouts, params_list, repeats: int, warmup: int = 2, bf16_layout=None) -> list[dict]:
    """One row per (layout, P, reduce): median wall and driver-CPU seconds per step, and the
    median ratios old / this and this / new of the steps taken in the same turn."""
    med = statistics.median
    max_nodes = max(n for n, _ in layouts)
    largest = max(params_list)
    # per node: the weights, K gradients and a reducer's sum of the largest P, twice over (a step's objects
    # are freed after the next one starts), so that no reduce is timed while the store spills to disk
    max_per_node = max(k for _, k in layouts)
    cluster, node_ids = start_cluster(max_nodes, object_store_bytes=max(512 << 20, (2 * max_per_node + 4) * 4 * largest))
    rows = []
    try:
        for nodes, per_node in layouts:
            chosen = node_ids[:nodes]
            new = NewReduce(chosen, per_node)
            reduces = {"old": OldReduce(new.pool.actors), "nodes": NodesDriverCalls(new.pool), "new": new}
            if bf16_layout is not None and (nodes, per_node) == tuple(bf16_layout):
                reduces["new-bf16"] = NewReduce(chosen, per_node, "bfloat16")
            try:
                for p in params_list:
                    state = {name: (Parameter(torch.zeros(p)),) for name in reduces}
                    state = {name: (par, Adam([par], lr=1e-3)) for name, (par,) in state.items()}
                    names = list(reduces)
                    wall, cpu = take_turns(reduces, state, warmup, repeats)
                    for name in names:
                        rows.append({"nodes": nodes, "per_node": per_node, "workers": nodes * per_node,
                                     "params": p, "reduce": name, "wall_s": med(wall[name]),
                                     "driver_cpu_s": med(cpu[name]),
                                     "old_over_this": med(o / x for o, x in zip(wall["old"], wall[name])),
                                     "this_over_new": med(x / o for o, x in zip(wall["new"], wall[name])),
                                     "wall_all_s": wall[name], "driver_cpu_all_s": cpu[name]})
            finally:
                for r in reduces.values():
                    r.shutdown()
                del reduces, new
    finally:
        ray.shutdown()
        cluster.shutdown()
    return rows


def phases(nodes: int = 2, per_node: int = 8, params: int = 1_000_000, steps: int = 20, warmup: int = 3) -> dict:
    """Where the new reduce's driver time goes, at one cell (default 2 x 8 x 1M): per step the
    wall and driver-CPU milliseconds (medians) of the gather (WorkerPool.gradients: the put of
    the weights, the calls, the wait and fetch of the nodes' sums), the mean, Adam, and the
    put of the same weights alone (ray.put of the wire buffer, then dropped)."""
    med = statistics.median
    cluster, node_ids = start_cluster(nodes, object_store_bytes=max(512 << 20, (2 * per_node + 4) * 4 * params))
    try:
        new = NewReduce(node_ids[:nodes], per_node)
        try:
            param = Parameter(torch.zeros(params))
            optimizer = Adam([param], lr=1e-3)
            names = ("gather", "mean", "adam", "put alone")
            wall, cpu = {n: [] for n in names}, {n: [] for n in names}

            def timed(name, fn, record):
                t0, c0 = time.perf_counter(), time.process_time()
                out = fn()
                if record:
                    wall[name].append(time.perf_counter() - t0)
                    cpu[name].append(time.process_time() - c0)
                return out

            for step in range(warmup + steps):
                record = step >= warmup
                gradients = timed("gather", lambda: new.pool.gradients(param.data, step), record)
                timed("mean", lambda: gradients.mean_into(param.grad), record)
                timed("adam", optimizer.step, record)
                del gradients
                timed("put alone", lambda: ray.put(to_wire(param.data)), record)
            return {"nodes": nodes, "per_node": per_node, "params": params, "steps": steps,
                    "wall_ms": {n: 1e3 * med(wall[n]) for n in names},
                    "driver_cpu_ms": {n: 1e3 * med(cpu[n]) for n in names}}
        finally:
            new.shutdown()
    finally:
        ray.shutdown()
        cluster.shutdown()


def compiled(layouts=((2, 2), (2, 8)), params_list=(1_000, 1_000_000), repeats: int = 10,
             warmup: int = 3) -> list[dict]:
    """New reduce against the same step as a compiled graph, side by side (alternating, after
    `warmup` turns): per (layout, P) the median wall and driver-CPU seconds of each, and the
    median ratio new / compiled of the steps taken in the same turn."""
    med = statistics.median
    max_per_node = max(k for _, k in layouts)
    largest = max(params_list)
    cluster, node_ids = start_cluster(max(n for n, _ in layouts),
                                      object_store_bytes=max(512 << 20, (4 * max_per_node + 8) * 4 * largest))
    rows = []
    try:
        for nodes, per_node in layouts:
            chosen = node_ids[:nodes]
            reduces = {"new": NewReduce(chosen, per_node), "compiled": CompiledGraphReduce(chosen, per_node)}
            try:
                for p in params_list:
                    state = {name: Parameter(torch.zeros(p)) for name in reduces}
                    state = {name: (par, Adam([par], lr=1e-3)) for name, par in state.items()}
                    wall, cpu = take_turns(reduces, state, warmup, repeats)
                    equal = bool(torch.equal(state["new"][0].data, state["compiled"][0].data))
                    for name in reduces:
                        rows.append({"nodes": nodes, "per_node": per_node, "params": p, "reduce": name,
                                     "wall_s": med(wall[name]), "driver_cpu_s": med(cpu[name]),
                                     "new_over_this_wall": med(n / x for n, x in zip(wall["new"], wall[name])),
                                     "new_over_this_cpu": med(n / x for n, x in zip(cpu["new"], cpu[name])),
                                     "same_weights": equal})
            finally:
                for r in reduces.values():
                    r.shutdown()
                del reduces
    finally:
        ray.shutdown()
        cluster.shutdown()
    return rows


def _lstsq_relative(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.linalg.lstsq(a / b[:, None], np.ones_like(b), rcond=None)[0]


def fit_old(rows: list[dict], key: str = "driver_cpu_s") -> tuple[float, float, float]:
    """(c0, c1, c2) of rows[key] = c0 + c1 P + c2 W P over the old rows."""
    old = [r for r in rows if r["reduce"] == "old"]
    a = np.array([[1.0, r["params"], r["workers"] * r["params"]] for r in old])
    return tuple(float(x) for x in _lstsq_relative(a, np.array([r[key] for r in old])))


def fit_new(rows: list[dict], key: str = "driver_cpu_s", reduce: str = "new") -> tuple[float, float, float, float]:
    """(d0, d1, d2, d3) of rows[key] = d0 + d1 P + d2 N P + d3 K P over the rows of `reduce` (new, nodes)."""
    new = [r for r in rows if r["reduce"] == reduce]
    a = np.array([[1.0, r["params"], r["nodes"] * r["params"], r["per_node"] * r["params"]] for r in new])
    return tuple(float(x) for x in _lstsq_relative(a, np.array([r[key] for r in new])))


def predict_old(c, workers: int, params: int) -> float:
    return c[0] + c[1] * params + c[2] * workers * params


def predict_new(d, nodes: int, per_node: int, params: int) -> float:
    return d[0] + d[1] * params + d[2] * nodes * params + d[3] * per_node * params


# GPU step times assumed for the projection, seconds per step at 16 crops of 64x64 per GPU.
# Measured: the 340k-parameter default U-Net at 49 steps/s on one H200 without Ray (README,
# "The default model"). Assumed: H100 = H200 (the same GH100 compute; this step is far from
# the memory-bandwidth limit), A10G = H100 x 2.15 (their FP32 peaks, 67 / 31.2 TFLOPS), and
# the 1M-parameter U-Net (depth 5, width 48) = 2.25 x the 340k one (its multiply-adds per pixel).
GPU_STEP_S = {("H100", 340_258): 1 / 49, ("A10G", 340_258): 2.15 / 49,
              ("H100", 991_203): 2.25 / 49, ("A10G", 991_203): 2.25 * 2.15 / 49}
GPUS_PER_NODE = {"H100": 8, "A10G": 4}  # p5.48xlarge; g5.12xlarge (cluster.yaml's g5.xlarge has 1)


def network_s(nodes: int, workers: int, params: int, new: bool, bits_per_s: float) -> float:
    """Seconds the head's network link needs per step: the weights out to each node (Ray pulls an
    object once per node), the gradients in (one per node now, one per worker before), float32."""
    out_bytes = nodes * 4 * params
    in_bytes = (nodes if new else workers) * 4 * params
    return (out_bytes + in_bytes) * 8 / bits_per_s


def projection(c, d, gpus_list=(4, 16, 64), bandwidths=(10e9, 100e9)) -> list[dict]:
    """Driver cost per step (the fitted models `c`, `d` of its CPU time + the head's network) as a
    fraction of a GPU step, old and new."""
    out = []
    for (gpu, params), step_s in GPU_STEP_S.items():
        for gpus in gpus_list:
            per_node = min(GPUS_PER_NODE[gpu], gpus)
            for layout, n, k in (("multi-GPU nodes", gpus // per_node, per_node), ("1 GPU per node", gpus, 1)):
                for bandwidth in bandwidths:
                    old = predict_old(c, gpus, params) + network_s(n, gpus, params, False, bandwidth)
                    new = predict_new(d, n, k, params) + network_s(n, gpus, params, True, bandwidth)
                    out.append({"gpu": gpu, "params": params, "gpus": gpus, "layout": layout, "nodes": n,
                                "per_node": k, "head_gbit_s": bandwidth / 1e9, "gpu_step_s": step_s,
                                "old_s": old, "new_s": new, "old_fraction": old / step_s,
                                "new_fraction": new / step_s})
    return out
