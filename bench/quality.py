"""Quality benchmark: Noise2Noise training against its torch.nn twin and against clean targets.

    PYTHONPATH=. python bench/quality.py                        # 25 minutes per run, all 68 CBSD68 images
    PYTHONPATH=. python bench/quality.py --minutes 3 --json quality.json --png quality.png

Three runs, one after the other, each for the same wall-clock budget of its step loop
(worker start-up is not counted; the driver's `max_seconds` ends a run after the step that
crosses it):
  ours-n2n:   the `unet` trained through the real training path, `pipeline.training.train`
              (Ray in local mode, 1 actor with 2 torch threads), noisy targets (Noise2Noise);
  twin-n2n:   its torch.nn twin (pipeline/export/torch_twins.py) in this process with the same threads: the
              same initial weights (copied), the same batches and noise (pipeline.data.patches
              .TrainingBatches, same seed), torch.optim.Adam with the same lr;
  ours-clean: as ours-n2n with clean targets (noisy-to-clean), through the same real path.
Data: `../shared/data/bsds400`, gaussian:25, batch 16 of 64x64 crops, Adam 1e-3.

Every run keeps its full state every `--checkpoint-every` steps (ours: the driver's own
checkpoints; the twin: model and Adam state in memory), so its weights at any step it
reached are rebuilt exactly (the nearest earlier state and the few remaining steps, run
the same way). A run that stopped short of the other run's step count is continued from
its final state past the budget, and the output says so (`--no-continue` compares only at
the smaller step count, for a machine so loaded that one side is several times slower).

Evaluation follows pipeline.quality.evaluate: the clean images of `../shared/data/cbsd68` plus the
noise of its seeded per-image generators (`add_evaluation_noise`, unclipped), whole-image
denoising (`denoise_image`), PSNR of the 8-bit output (clipped, rounded) against the clean
image; SSIM is left out (it costs as much as the denoising). The twin is evaluated with its
own torch.nn forward. Figures:
  equal steps: ours and the twin at the step count ours reached within the budget, and at
               the one the twin reached;
  equal time:  the three runs at the end of the budget (and, as a cross-check when the
               machine's load made their step counts differ, noisy and clean targets at the
               smaller of their step counts);
  curves:      PSNR against step and against seconds, per run, on the first `--curve-images`
               images at up to `--curve-points` checkpoints (PNG; the final points included).
Acceptance (the quality target): ours within 0.05 dB of the twin at equal steps, and noisy targets
within 0.2 dB of clean targets at equal budget.
"""
from __future__ import annotations

import copy
import json
import logging
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path

import click
import ray
import torch

from pipeline.export.torch_twins import torch_twin
from n2n_core import load_checkpoint, psnr, quantize_8bit
from pipeline.data.datasets import open_dataset
from pipeline.quality.evaluate import add_evaluation_noise
from pipeline.data.images import decode_image
from pipeline.inference.tiling import denoise_image
from pipeline.training import TrainConfig, train
from pipeline.training.driver import CHECKPOINT_DIR, METRICS, list_checkpoints
from pipeline.training.replica import make_batches, make_model
from pipeline.training.curves import read_metrics

EQUAL_STEPS_DB = 0.05  # ours vs the twin at equal steps
EQUAL_BUDGET_DB = 0.2  # noisy vs clean targets at equal budget


# ---------------------------------------------------------------- evaluation


class EvalSet:
    """Clean images and their evaluation noise (pipeline.quality.evaluate's generators), decoded once."""

    def __init__(self, data: str, noise: str, seed: int, count: int | None):
        dataset = open_dataset(data)
        n = len(dataset) if count is None else min(count, len(dataset))
        self.keys, self.clean, self.noisy = [], [], []
        for index in range(n):
            clean = decode_image(dataset.read(index), dataset.keys[index]).pixels  # (C, H, W) in [0, 1]
            self.keys.append(dataset.keys[index])
            self.clean.append(quantize_8bit(clean).double())
            self.noisy.append(add_evaluation_noise(clean, noise, seed, index))
        self.noisy_psnr = [float(psnr(quantize_8bit(x).double(), c)) for x, c in zip(self.noisy, self.clean)]

    def __len__(self) -> int:
        return len(self.keys)

    def psnr(self, model, count: int) -> list[float]:
        """Per-image PSNR (dB) of the model's 8-bit output on the first `count` images."""
        out = []
        with torch.no_grad():
            for noisy, clean in zip(self.noisy[:count], self.clean[:count]):
                out.append(float(psnr(quantize_8bit(denoise_image(model, noisy)).double(), clean)))
        return out


class TorchEval:
    """A torch.nn model as denoise_image expects it (parameter list, size multiple, eval/train)."""

    def __init__(self, module: torch.nn.Module, size_multiple: int, in_channels: int = 3):
        self.module, self.size_multiple, self.in_channels = module, size_multiple, in_channels

    @property
    def training(self) -> bool:
        return self.module.training

    def parameters(self) -> list:
        return list(self.module.parameters())

    def eval(self):
        self.module.eval()
        return self

    def train(self, mode: bool = True):
        self.module.train(mode)
        return self

    def __call__(self, x):
        with torch.no_grad():
            return self.module(x)


class Scores:
    """Per-image PSNR of (run, step), computed once; a prefix serves a smaller request."""

    def __init__(self, evalset: EvalSet):
        self.evalset, self.cache, self.seconds = evalset, {}, 0.0

    def mean(self, key, count: int, build) -> float:
        have = self.cache.get(key, [])
        if len(have) < count:
            t0 = time.perf_counter()
            have = self.evalset.psnr(build(), count)
            self.seconds += time.perf_counter() - t0
            self.cache[key] = have
        return sum(have[:count]) / count


# ---------------------------------------------------------------- the runs


class OursRun:
    """A run through pipeline.training.train; its weights at any step rebuilt from its checkpoints."""

    def __init__(self, name: str, config: TrainConfig):
        self.name, self.config = name, config
        self.out = Path(config.out)

    def run(self) -> None:
        t0 = time.perf_counter()
        result = train(self.config)
        self.wall = time.perf_counter() - t0
        self.steps = result.steps
        _, records = read_metrics(self.out / METRICS)
        losses = [r for r in records if "loss" in r]
        # the loop began when step 1 began: its end time minus its duration
        began = losses[0]["time"] - self.config.batch_size / losses[0]["images_per_s"]
        self.seconds = {r["step"]: r["time"] - began for r in losses}
        self.loss = {r["step"]: r["loss"] for r in losses}
        self.saved = [s for s, _ in list_checkpoints(self.out)]
        self.rebuilt: dict[int, str] = {}

    def model_at(self, step: int):
        """The n2n model after `step` steps: a checkpoint, else the real path resumed from the last one before."""
        found = dict(list_checkpoints(self.out))
        if step in found:
            return load_checkpoint(found[step]).model
        base = max(s for s in found if s <= step)
        folder = self.out.parent / f"{self.out.name}-to-{step}"
        shutil.rmtree(folder, ignore_errors=True)
        (folder / CHECKPOINT_DIR).mkdir(parents=True)
        shutil.copy2(found[base], folder / CHECKPOINT_DIR / found[base].name)
        result = train(self.config.replace(out=str(folder), resume=True, steps=step, max_seconds=None))
        self.rebuilt[step] = "past the budget" if step > self.steps else f"from step {base}"
        return result.model


class TwinRun:
    """The torch.nn twin in this process; its model + Adam state kept every `every` steps."""

    def __init__(self, config: TrainConfig, every: int):
        self.name, self.config, self.every = "twin-n2n", config, every
        self.batches = make_batches(config)
        self.size_multiple = make_model(config).size_multiple

    def _fresh(self):
        twin = torch_twin(make_model(self.config))  # the same initial weights as ours
        return twin, torch.optim.Adam(twin.parameters(), lr=self.config.lr)

    def _step(self, twin, optimizer, step: int) -> float:
        x, y = self.batches.batch(step)
        optimizer.zero_grad()
        loss = torch.nn.functional.mse_loss(twin(x), y)
        loss.backward()
        optimizer.step()
        return float(loss.detach())

    def _keep(self, twin, optimizer, step: int) -> None:
        self.states[step] = (copy.deepcopy(twin.state_dict()), copy.deepcopy(optimizer.state_dict()))

    def run(self) -> None:
        twin, optimizer = self._fresh()
        twin.train()
        self.states, self.seconds, self.loss, self.rebuilt = {}, {}, {}, {}
        budget = self.config.max_seconds
        began = time.perf_counter()
        step = 0
        while True:
            self.loss[step + 1] = self._step(twin, optimizer, step)
            step += 1
            now = time.perf_counter() - began
            self.seconds[step] = now
            out_of_time = budget is not None and now >= budget
            if step % self.every == 0 or out_of_time or step == self.config.steps:
                self._keep(twin, optimizer, step)
            if out_of_time or step == self.config.steps:
                break
        self.wall, self.steps, self.saved = time.perf_counter() - began, step, sorted(self.states)

    def model_at(self, step: int) -> TorchEval:
        base = max(s for s in self.states if s <= step)
        twin, optimizer = self._fresh()
        twin.load_state_dict(self.states[base][0])
        optimizer.load_state_dict(self.states[base][1])
        twin.train()
        for s in range(base, step):
            self._step(twin, optimizer, s)
        if step != base:
            self.rebuilt[step] = "past the budget" if step > self.steps else f"from step {base}"
        return TorchEval(twin.eval(), self.size_multiple)


def curve_steps(saved: list[int], points: int) -> list[int]:
    """Up to `points` of the saved steps, evenly spread, the last one included."""
    if len(saved) <= points:
        return list(saved)
    picks = {saved[round(i * (len(saved) - 1) / (points - 1))] for i in range(points)} if points > 1 else set()
    return sorted(picks | {saved[-1]})


def plot_curves(path: Path, curves: dict, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (by_step, by_time) = plt.subplots(1, 2, figsize=(12, 4.5))
    for name, points in curves.items():
        steps, seconds, values = zip(*points)
        by_step.plot(steps, values, marker="o", label=name)
        by_time.plot(seconds, values, marker="o", label=name)
    by_step.set_xlabel("optimizer steps")
    by_time.set_xlabel("seconds of training")
    for ax in (by_step, by_time):
        ax.set_ylabel("PSNR (dB)")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


@click.command()
@click.option("--minutes", default=25.0, show_default=True, help="Wall-clock budget of each run's step loop.")
@click.option("--data", default="../shared/data/bsds400", show_default=True, help="Clean training images.")
@click.option("--eval-data", default="../shared/data/cbsd68", show_default=True, help="Clean evaluation images.")
@click.option("--eval-images", type=int, default=None, help="Evaluate on the first N images (default: all).")
@click.option("--curve-images", type=int, default=8, show_default=True, help="Images of the curves' points.")
@click.option("--curve-points", type=int, default=6, show_default=True, help="Checkpoints per curve.")
@click.option("--noise", default="gaussian:25", show_default=True)
@click.option("--depth", default=3, show_default=True)
@click.option("--width", default=32, show_default=True)
@click.option("--batch-size", default=16, show_default=True)
@click.option("--crop-size", default=64, show_default=True)
@click.option("--lr", default=1e-3, show_default=True)
@click.option("--seed", default=0, show_default=True, help="Model init and every data/noise draw.")
@click.option("--threads", default=2, show_default=True, help="Torch threads of the Ray actor and of this process.")
@click.option("--checkpoint-every", default=25, show_default=True, help="Steps between kept states.")
@click.option("--continue/--no-continue", "continue_", default=True, show_default=True,
              help="Continue the slower run past the budget to the faster one's step count.")
@click.option("--out", type=click.Path(file_okay=False), help="Keep the runs here (default: a temporary folder).")
@click.option("--png", default="quality.png", show_default=True, help="The curves.")
@click.option("--json", "json_path", type=click.Path(dir_okay=False), help="Also write the results here.")
def main(minutes, data, eval_data, eval_images, curve_images, curve_points, noise, depth, width, batch_size,
         crop_size, lr, seed, threads, checkpoint_every, continue_, out, png, json_path) -> None:
    """Train ours (Noise2Noise), its torch.nn twin and ours on clean targets for one budget; compare PSNR."""
    logging.getLogger("ray").setLevel(logging.WARNING)
    torch.set_num_threads(threads)
    budget = 60.0 * minutes
    evalset = EvalSet(eval_data, noise, seed, eval_images)
    n_eval, n_curve = len(evalset), min(curve_images, len(evalset))
    scores = Scores(evalset)
    tmp = None
    if out is None:
        tmp = tempfile.TemporaryDirectory()
        out = tmp.name
    root = Path(out)
    base = TrainConfig(data=data, out=str(root / "ours-n2n"), arch="unet", arch_args={"depth": depth, "width": width},
                       noise=noise, target="noisy", workers=1, cpus_per_worker=float(threads), steps=10**9,
                       max_seconds=budget, batch_size=batch_size, crop_size=crop_size, lr=lr, seed=seed,
                       checkpoint_every=checkpoint_every, keep_checkpoints=0, validation_images=0,
                       device="cpu", progress=False)
    results = {"machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs",
               "torch": torch.__version__, "ray": ray.__version__, "load_average_before": os.getloadavg(),
               "budget_s": budget, "model": f"unet depth {depth} width {width}",
               "parameters": make_model(base).num_parameters(), "batch_size": batch_size, "crop_size": crop_size,
               "lr": lr, "noise": noise, "seed": seed, "threads": threads, "data": data, "eval_data": eval_data,
               "eval_images": n_eval, "curve_images": n_curve}
    ray.init(address="local", num_cpus=threads, include_dashboard=False, logging_level=logging.WARNING)
    try:
        ours = OursRun("ours-n2n", base)
        twin = TwinRun(base.replace(out=str(root / "twin-n2n")), checkpoint_every)
        clean = OursRun("ours-clean", base.replace(out=str(root / "ours-clean"), target="clean"))
        runs = [ours, twin, clean]
        for run in runs:
            click.echo(f"training {run.name} for {budget:.0f} s ...")
            run.run()
            click.echo(f"  {run.steps} steps in {run.seconds[run.steps]:.1f} s, final loss {run.loss[run.steps]:.5f}")
        results["load_average_after_training"] = os.getloadavg()

        def mean(run, step, count):
            return scores.mean((run.name, step), count, lambda: run.model_at(step))

        # headline figures on all evaluation images
        n, t, c = ours.steps, twin.steps, clean.steps
        equal_steps = []
        for step, whose in ((n, "ours"), (t, "twin")):
            if not continue_ and step > min(n, t) or equal_steps and step == equal_steps[-1]["step"]:
                continue
            a, b = mean(ours, step, n_eval), mean(twin, step, n_eval)
            equal_steps.append({"step": step, "budget_of": "ours'" if whose == "ours" else "the twin's", "ours": a, "twin": b, "diff": a - b,
                                "ours_note": ours.rebuilt.get(step, "within the budget"),
                                "twin_note": twin.rebuilt.get(step, "within the budget")})
        equal_time = {r.name: {"steps": r.steps, "seconds": r.seconds[r.steps], "psnr": mean(r, r.steps, n_eval)}
                      for r in runs}
        both = min(n, c)
        targets_equal_steps = {"step": both, "ours-n2n": mean(ours, both, n_eval), "ours-clean": mean(clean, both, n_eval)}
        # curves on the first images, at checkpoints within the budget, from the common initial weights
        initial = scores.mean(("initial", 0), n_curve, lambda: make_model(base))
        curves = {}
        for run in runs:
            steps = curve_steps([s for s in run.saved if s <= run.steps], curve_points)
            curves[run.name] = [(0, 0.0, initial)] + [(s, run.seconds[s], mean(run, s, n_curve)) for s in steps]
        results["load_average_after"] = os.getloadavg()
    finally:
        ray.shutdown()
        if tmp is not None:
            tmp.cleanup()
    noisy_input = sum(evalset.noisy_psnr) / n_eval
    worst_steps = max(abs(e["diff"]) for e in equal_steps)
    gap = equal_time["ours-clean"]["psnr"] - equal_time["ours-n2n"]["psnr"]
    results.update(runs={r.name: {"steps": r.steps, "seconds": r.seconds[r.steps], "wall_s": r.wall,
                                  "final_loss": r.loss[r.steps]} for r in runs},
                   noisy_input_psnr=noisy_input, equal_steps=equal_steps, equal_time=equal_time,
                   targets_equal_steps=targets_equal_steps,
                   curves={k: [{"step": s, "seconds": sec, "psnr": p} for s, sec, p in v] for k, v in curves.items()},
                   evaluation_s=scores.seconds,
                   acceptance={"ours_vs_twin_equal_steps_max_abs_db": worst_steps,
                               "ours_vs_twin_holds": worst_steps <= EQUAL_STEPS_DB,
                               "clean_minus_noisy_equal_budget_db": gap, "noisy_vs_clean_holds": gap <= EQUAL_BUDGET_DB})

    click.echo(f"\nmachine: {results['machine']}; torch {results['torch']}, ray {results['ray']}; load average "
               f"before {results['load_average_before']}, after training {results['load_average_after_training']}")
    click.echo(f"{results['model']} ({results['parameters']:,} parameters), batch {batch_size} of {crop_size}x{crop_size}"
               f" crops, Adam lr {lr:g}, {noise}, seed {seed}; budget {budget:.0f} s per run; ours: Ray local mode, "
               f"1 actor x {threads} threads; twin: torch.nn in process, {threads} threads")
    click.echo(f"PSNR: mean over {n_eval} images of {eval_data} (noisy input {noisy_input:.2f} dB); "
               f"evaluation took {scores.seconds:.0f} s")
    click.echo(f"\n{'run':<12}{'steps':>7}{'seconds':>9}{'s/step':>8}{'PSNR dB':>9}")
    for name, e in equal_time.items():
        click.echo(f"{name:<12}{e['steps']:>7}{e['seconds']:>9.1f}{e['seconds'] / e['steps']:>8.3f}{e['psnr']:>9.3f}")
    click.echo("\nequal steps (ours - twin):")
    for e in equal_steps:
        click.echo(f"  step {e['step']:>6} ({e['budget_of']} budget): ours {e['ours']:.3f} dB ({e['ours_note']}), "
                   f"twin {e['twin']:.3f} dB ({e['twin_note']}), {e['diff']:+.3f} dB")
    click.echo(f"equal time ({budget:.0f} s): " + ", ".join(
        f"{k} {v['psnr']:.3f} dB at step {v['steps']}" for k, v in equal_time.items()))
    e = targets_equal_steps
    click.echo(f"noisy vs clean targets at equal steps ({e['step']}): ours-n2n {e['ours-n2n']:.3f} dB, ours-clean "
               f"{e['ours-clean']:.3f} dB, clean - noisy {e['ours-clean'] - e['ours-n2n']:+.3f} dB")
    click.echo("\nacceptance:")
    click.echo(f"  ours within {EQUAL_STEPS_DB} dB of the twin at equal steps: max |diff| {worst_steps:.3f} dB -> "
               + ("holds" if worst_steps <= EQUAL_STEPS_DB else "does NOT hold"))
    click.echo(f"  noisy targets within {EQUAL_BUDGET_DB} dB of clean targets at equal budget: clean - noisy "
               f"{gap:+.3f} dB -> " + ("holds" if gap <= EQUAL_BUDGET_DB else "does NOT hold"))
    title = (f"{results['model']}, batch {batch_size}x{crop_size}^2, Adam {lr:g}, {noise}, {budget:.0f} s per run; "
             f"PSNR on the first {n_curve} images of {Path(eval_data).name}")
    plot_curves(Path(png), {f"{k} ({equal_time[k]['steps']} steps)": v for k, v in curves.items()}, title)
    click.echo(f"curves: {png}")
    if json_path:
        Path(json_path).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
