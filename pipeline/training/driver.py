"""The training loop on the driver: gather shard gradients, average, step, record.

Per step: every worker computes the gradients of its positions of the global batch
(`shard_positions`); each node sums its workers' gradients weighted by shard size, the
driver adds the nodes' sums and divides by the batch size (so the result is the full
batch's gradient) and takes the optimizer step. By default the step is overlapped
(`pipeline.training.overlap`): the driver steps each bucket of parameters as soon as every
node's sum of it arrives, while the workers still run backward, and streams its new
weights back; `overlap=False` keeps the serial step (`placement.WorkerPool`), the
reference the overlapped one is tested against. Every `validate_every` steps it measures the
validation PSNR; every `checkpoint_every` steps and at the end it writes a checkpoint
(model, optimizer, step, config, RNG state) atomically, into `out`, a local folder or a
URI such as s3://bucket/runs/a (`RunDir`); `resume` continues from the
latest one and gives bit for bit the run that was not interrupted.

Without Ray (`ray=False`) one replica in this process (`LocalPool`, on the first GPU
when there is one) computes each step's whole batch; everything else is the same.
The learning rate of each step is `config.lr_at(step)` (constant, then the ramp-down).

`max_seconds` bounds the step loop by wall-clock time: the run stops after the step
during which that many seconds have passed since its first step began (worker start-up
not counted; a resumed run gets the budget afresh), and ends as a run that reached
`steps` would: validation, a step checkpoint, and `model.n2n` at that step.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from n2n_core import psnr, quantize_8bit, save_checkpoint
from n2n_core.module import Module
from n2n_core.widen import widen_unet
from pipeline.data.noise import parse_noise
from pipeline.training.config import TrainConfig, smoke_overrides
from pipeline.training.flat import FlatParameters
from pipeline.training.replica import make_batches, make_model, make_optimizer
from pipeline.training.preflight import check_run
from pipeline.training.curves import MetricsLog, plot_run
from pipeline.training.run_dir import (
    CHECKPOINT_DIR, FINAL_MODEL, METRICS, PLOT, RunDir, checkpoint_name, read_checkpoint,
)

log = logging.getLogger(__name__)

__all__ = ["CHECKPOINT_DIR", "FINAL_MODEL", "METRICS", "PLOT", "TrainResult", "list_checkpoints", "train"]
# settings that shape the trajectory: a resumed run must keep them
_RESUME_KEYS = ("data", "arch", "arch_args", "noise", "target", "loss", "batch_size", "accumulate", "crop_size", "lr",
                "optimizer", "momentum", "seed", "dtype", "holdout")


@dataclass
class TrainResult:
    """What a run produced. `model` is the driver's final model (CPU); files are local paths, or
    URIs (str) when `out` is one."""

    model: Module
    steps: int
    loss: float | None
    psnr: float | None
    checkpoint: Path | str
    metrics: Path | str
    plot: Path | str | None
    workers: int
    placement: list[dict] = field(default_factory=list)  # where each worker started (node, GPU ids, device)
    final_placement: list[dict] = field(default_factory=list)  # after any replacements
    failures: int = 0
    sigma: float | None = None  # no clean reference (--noise none): the last validation's estimated noise (0..255)


def list_checkpoints(out) -> list[tuple[int, Path | str]]:
    """(step, path or URI) of the step checkpoints in `out` (a local path or a URI), oldest first."""
    run = RunDir(out)
    try:
        return [(step, run.where(name)) for step, name in run.checkpoints()]
    finally:
        run.close()


def _validation_set(config: TrainConfig, multiple: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(noisy, reference) pairs centre-cropped to a multiple of the model's size, each (3, h, w)."""
    if config.validation_images == 0:
        return []
    pairs = make_batches(config).validation_pairs(config.validation_images, seed=config.seed)
    out = []
    for noisy, ref in pairs:
        _, h, w = noisy.shape
        ch = min(h, config.validation_size) // multiple * multiple
        cw = min(w, config.validation_size) // multiple * multiple
        if ch == 0 or cw == 0:
            continue
        y, x = (h - ch) // 2, (w - cw) // 2
        out.append((noisy[:, y:y + ch, x:x + cw].contiguous(), ref[:, y:y + ch, x:x + cw].contiguous()))
    return out


def validate(model: Module, pairs, dtype, *, blind: bool = False) -> tuple[float, float, list]:
    """Mean PSNR (dB) of the 8-bit denoised images and of the noisy inputs; the (noisy, denoised, ref) strip.

    `blind`: the data is noisy already (`--noise none`), so there is no reference: the figures are
    instead the mean no-reference noise estimate (`n2n assess`'s, sigma on the 0..255 scale) of the
    denoised images and of the noisy inputs, and the strip's references are None.
    """
    from pipeline.quality.assess import estimated_sigma

    model.eval()
    denoised, noisy_figure, strip = [], [], []
    for noisy, ref in pairs:
        y = model(noisy.unsqueeze(0).to(dtype))[0].to(torch.float32)  # (3, h, w)
        y8 = quantize_8bit(y)
        if blind:
            denoised.append(estimated_sigma(y8))
            noisy_figure.append(estimated_sigma(noisy))
        else:
            denoised.append(float(psnr(y8, ref)))
            noisy_figure.append(float(psnr(quantize_8bit(noisy), ref)))
        strip.append((noisy, y8, None if blind else ref))
    model.train()
    return sum(denoised) / len(pairs), sum(noisy_figure) / len(pairs), strip


def _blind(config: TrainConfig) -> bool:
    """Whether validation has no clean reference: the data is noisy already (`--noise none`)."""
    from pipeline.data.noise import NoNoise

    return isinstance(parse_noise(config.noise), NoNoise)


def _same_setting(key: str, saved, current) -> bool:
    """Whether a resumed run keeps a setting; noise specs compare by the noise they describe
    (`photo` and its spelled-out mixture are the same noise)."""
    if saved == current:
        return True
    if key != "noise":
        return False
    try:
        return parse_noise(saved) == parse_noise(current)
    except ValueError:
        return False


def _resume(config: TrainConfig, run: RunDir, model, optimizer) -> int:
    """Load the latest checkpoint into model and optimizer; returns its step (0 when none)."""
    found = run.checkpoints()
    if not found:
        log.warning("resume: no checkpoint in %s; starting from step 0", run.where(CHECKPOINT_DIR))
        return 0
    step, name = found[-1]
    where = run.where(name)
    ckpt = run.read_checkpoint(name)
    saved = ckpt.config or {}
    changed = [k for k in _RESUME_KEYS if k in saved and not _same_setting(k, saved[k], getattr(config, k))]
    if changed:
        raise ValueError(f"{where}: cannot resume with changed settings "
                         + ", ".join(f"{k}: {saved[k]!r} -> {getattr(config, k)!r}" for k in changed))
    model.load_state_dict(ckpt.model.state_dict())
    if ckpt.optimizer_state is None:
        raise ValueError(f"{where}: no optimizer state to resume from")
    optimizer.load_state_dict(ckpt.optimizer_state)
    if "torch_rng_state" in ckpt.extra_tensors:
        torch.set_rng_state(ckpt.extra_tensors["torch_rng_state"])
    return ckpt.step


def _init_from(config: TrainConfig, model) -> None:
    """Load the weights of `config.init_from` into the model (fine-tuning a trained model);
    "default" is the built-in default model."""
    source = config.init_from
    if source == "default":
        from pipeline.assets import default_model_path

        source = str(default_model_path())
    ckpt = read_checkpoint(source)
    saved, wanted = ckpt.model_config, model.config  # both with build_model's defaults filled in
    if saved.name != wanted.name or dict(saved.kwargs) != dict(wanted.kwargs):
        if not _widens(saved, wanted):
            raise ValueError(f"{config.init_from}: holds {saved.name} {saved.kwargs}, but this run trains "
                             f"{wanted.name} {wanted.kwargs}; pass the same --arch and --arch-arg (or, for a "
                             f"unet, only a larger width)")
        # the same U-Net but wider: copy it in without changing its output (Net2WiderNet)
        wide = widen_unet(ckpt.model, wanted.kwargs["width"], seed=config.seed)
        model.load_state_dict(wide.state_dict())
        log.info("initialized from %s (its step %d), widened from width %d to %d with the same output",
                 config.init_from, ckpt.step, saved.kwargs["width"], wanted.kwargs["width"])
        return
    model.load_state_dict(ckpt.model.state_dict())
    log.info("initialized from %s (its step %d)", config.init_from, ckpt.step)


def _widens(saved, wanted) -> bool:
    """Whether `wanted` is the U-Net `saved` with a larger width and nothing else changed."""
    if saved.name != "unet" or wanted.name != "unet":
        return False
    others = {k: v for k, v in saved.kwargs.items() if k != "width"}
    return (others == {k: v for k, v in wanted.kwargs.items() if k != "width"}
            and wanted.kwargs["width"] > saved.kwargs["width"])


def _prune(run: RunDir, keep: int) -> None:
    found = run.checkpoints()
    for _, name in found[: max(0, len(found) - keep)] if keep else []:
        run.delete(name)


def train(config: TrainConfig, *, on_step=None, worker_class=None) -> TrainResult:
    """Train data-parallel on Ray (a local Ray when no cluster address is given).

    Args:
        config: the run's TrainConfig.
        on_step: optional callable(step, model, placement) after each optimizer step (tests, hooks);
            placement lists where each worker runs now.
        worker_class: for tests only: a `GradientWorker` subclass for the Ray actors (to inject a
            fault, such as a worker that hangs); None: `GradientWorker`.

    Returns:
        TrainResult with the final model and the paths written under `config.out`.
    """
    if config.smoke_test:
        config = config.replace(**smoke_overrides())
    run = RunDir(config.out)  # a local folder, or a URI with a local staging folder
    try:
        return _train(config, run, on_step=on_step, worker_class=worker_class)
    finally:
        run.close()


@dataclass
class _Run:
    """One training run on the driver: what its steps read (config, where it writes, the
    validation pairs) and change (the model, its flat buffers, the optimizer, the metrics log,
    the progress)."""

    config: TrainConfig
    run: RunDir
    model: Module
    flat: FlatParameters
    optimizer: object
    metrics: MetricsLog
    validation: list
    progress: "_Progress"

    def save(self, name: str) -> None:
        """A checkpoint of the run at its current step, written atomically as `name`."""
        step = self.progress.done

        def write(path):
            save_checkpoint(path, self.model, self.optimizer, step=step, config=self.config.to_dict(),
                            extra_tensors={"torch_rng_state": torch.get_rng_state()},
                            extra={"data_seed": self.config.seed, "next_step": step})

        self.run.write_checkpoint(name, write)


@dataclass
class _Progress:
    """What the step loop has reached: the driver's state between steps."""

    done: int                      # optimizer steps taken (the run's step count)
    loss: float | None = None      # the last step's loss
    psnr: float | None = None      # the last validation PSNR
    sigma: float | None = None     # or, with no clean reference, its estimated residual noise (0..255)
    strip: list = field(default_factory=list)  # the last validation's (noisy, denoised, reference) images


def _train(config: TrainConfig, run: RunDir, *, on_step, worker_class) -> TrainResult:
    """Prepare the run, open the worker pool, take the steps, save and draw the result."""
    check_run(config, run)  # every usage problem, before anything is created (preflight.py)
    run.create()
    if not config.resume and run.checkpoints():
        raise FileExistsError(f"{config.out} already holds checkpoints: pass --resume to continue, or another --out")
    model = make_model(config)  # the driver's model lives on the CPU
    flat = FlatParameters(model)  # its weights and gradients: views into two (P,) buffers
    optimizer = make_optimizer(config, model)
    start = _resume(config, run, model, optimizer) if config.resume else 0
    if start == 0 and config.init_from:
        _init_from(config, model)
    validation = _validation_set(config, model.size_multiple)
    if config.resume and run.remote:
        run.download(METRICS, run.local / METRICS)
    metrics = MetricsLog(run.local / METRICS, config.to_dict(), resume_step=start if config.resume else None)

    progress = _Progress(done=start)
    state = _Run(config, run, model, flat, optimizer, metrics, validation, progress)
    pool, owns_ray = None, False
    try:
        pool, owns_ray, num_workers = _open_pool(config, worker_class)
        placement = list(pool.placement)
        threads = torch.get_num_threads()
        if hasattr(pool, "driver_threads"):  # Ray workers compute: the driver keeps to the cores they leave
            torch.set_num_threads(pool.driver_threads())
        try:
            _take_steps(state, pool, on_step)
        finally:
            torch.set_num_threads(threads)
        if validation and not progress.strip:  # a resumed run that ended without validating
            figure, _, progress.strip = validate(model, validation, config.torch_dtype, blind=_blind(config))
            progress.psnr, progress.sigma = (None, figure) if _blind(config) else (figure, None)
        state.save(FINAL_MODEL)
        final_placement, failures = list(pool.placement), pool.failures
    finally:
        metrics.close()
        _close_pool(pool, owns_ray)
    plot_run(run.local / METRICS, run.local / PLOT, progress.strip)
    run.sync(METRICS, PLOT)
    return TrainResult(model=model, steps=progress.done, loss=progress.loss, psnr=progress.psnr, sigma=progress.sigma,
                       checkpoint=run.where(FINAL_MODEL), metrics=run.where(METRICS), plot=run.where(PLOT),
                       workers=num_workers, placement=placement, final_placement=final_placement,
                       failures=failures)


def _open_pool(config: TrainConfig, worker_class):
    """The gradient workers: Ray actors (connecting to Ray first) or one in-process worker.

    Returns (pool, owns_ray: this call started the Ray it must shut down, number of workers)."""
    owns_ray = False
    if config.ray:
        from pipeline.training.placement import WorkerPool, connect, resolve_workers  # imports ray

        owns_ray = connect(config.address)
        try:
            num_workers, use_gpu = resolve_workers(config)
            pool_class = WorkerPool
            if config.overlap:
                from pipeline.training.overlap import overlap_problem
                from pipeline.training.overlap.pool import OverlapPool

                problem = overlap_problem()
                if problem is None:
                    pool_class = OverlapPool
                else:
                    log.warning("the serial step instead of the overlapped one: %s", problem)
            pool = pool_class(config, num_workers, use_gpu, worker_class=worker_class)
        except BaseException:
            _close_pool(None, owns_ray)
            raise
    else:
        from pipeline.training.local import LocalPool

        pool = LocalPool(config)
        num_workers, use_gpu = 1, pool.worker.device.type == "cuda"
    how = (" (in process, no Ray)" if not config.ray else
           f", overlapped step in {len(pool.plan)} buckets" if hasattr(pool, "plan") else ", serial step")
    nodes: dict = {}
    for worker in pool.placement:  # TrainResult.placement has the whole of it; the log line names nodes
        node = (worker.get("host", "?"), str(worker.get("node_id") or "")[:12])
        nodes[node] = nodes.get(node, 0) + 1
    where = ", ".join(f"{n} on {host}" + (f" (node {node_id})" if node_id else "")
                      for (host, node_id), n in nodes.items())
    log.info("training with %d %s workers%s: %s", num_workers, "GPU" if use_gpu else "CPU", how, where)
    return pool, owns_ray, num_workers


def _close_pool(pool, owns_ray: bool) -> None:
    if pool is not None:
        pool.shutdown()
    if owns_ray:
        import ray

        ray.shutdown()


def _take_steps(state: _Run, pool, on_step) -> None:
    """Steps from `progress.done` to `config.steps` (or until `max_seconds`): gradients from the
    pool, the averaged step, metrics, validation and checkpoints when due."""
    config, model, flat, optimizer, progress = state.config, state.model, state.flat, state.optimizer, state.progress
    bar = tqdm(total=config.steps, initial=progress.done, disable=not config.progress, unit="step",
               dynamic_ncols=True)
    began = time.perf_counter()
    for step in range(progress.done, config.steps):
        t0 = time.perf_counter()
        optimizer.lr = config.lr_at(step)
        spent = []

        def go_on(step=step) -> bool:  # asked once the step's last gradients are in: may the workers go on?
            spent.append(config.max_seconds is not None and time.perf_counter() - began >= config.max_seconds)
            return step + 1 < config.steps and not spent[-1]

        # the full batch's mean gradient (shards weighted by their rows), then the optimizer
        progress.loss = pool.step(step, flat, optimizer, go_on)
        now = time.perf_counter()
        elapsed, progress.done = now - t0, step + 1
        out_of_time = spent[-1]
        _record(state, elapsed, last=progress.done == config.steps or out_of_time)
        shown = ({"sigma": f"{progress.sigma:.2f}"} if progress.sigma is not None else
                 {"psnr": "-" if progress.psnr is None else f"{progress.psnr:.2f}"})
        bar.set_postfix(loss=f"{progress.loss:.4g}", **shown, img_s=f"{config.rows_per_step / elapsed:.1f}")
        bar.update(1)
        if on_step is not None:
            on_step(progress.done, model, list(pool.placement))
        if out_of_time:
            log.info("stopping after step %d: the %.1f s budget is spent", progress.done, config.max_seconds)
            break
    bar.close()


def _record(state: _Run, elapsed: float, *, last: bool) -> None:
    """After a step: its metrics line, then validation and a checkpoint when due (always at the last)."""
    config, model, optimizer, progress = state.config, state.model, state.optimizer, state.progress
    metrics, validation = state.metrics, state.validation
    done = progress.done
    metrics.write(step=done, loss=progress.loss, lr=optimizer.lr, images_per_s=config.rows_per_step / elapsed,
                  time=time.time())
    if validation and (done % config.validate_every == 0 or last):
        if _blind(config):  # no clean reference: the residual noise, estimated as `n2n assess` does
            progress.sigma, noisy_sigma, progress.strip = validate(model, validation, config.torch_dtype, blind=True)
            metrics.write(step=done, sigma=progress.sigma, sigma_noisy=noisy_sigma)
        else:
            progress.psnr, noisy_psnr, progress.strip = validate(model, validation, config.torch_dtype)
            metrics.write(step=done, psnr=progress.psnr, psnr_noisy=noisy_psnr)
    if done % config.checkpoint_every == 0 or last:
        state.save(checkpoint_name(done))
        _prune(state.run, config.keep_checkpoints)
        state.run.sync(METRICS)
