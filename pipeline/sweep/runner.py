"""run_sweep: a Ray Tune experiment whose trials are `n2n train` runs, each in its own placement group.

Each trial reserves a placement group (Tune's `PlacementGroupFactory`): bundle 0 for
the trial's driver (the Tune function that runs `pipeline.training.train`), then one
bundle per gradient worker, which the trial's `WorkerPool` fills. Trials run as many
at once as the cluster's CPUs (and GPUs) hold, or `max_concurrent`. ASHA stops the
weaker ones on their validation PSNR (`pipeline.sweep.scheduler`).

Interrupted (killed, a lost head node, Ctrl-C), a sweep resumes with `resume=True`:
Ray Tune restores its experiment from `out/tune` (finished and stopped trials are kept,
unfinished and failed ones are run again) and every rerun trial resumes its own
`n2n train` run from its newest checkpoint. Tune saves its experiment state every ten
seconds or so; a trial that finished after the last save finds its result in its
trial.json and reports it again without training.

On a multi-node cluster `out` must be a folder every node sees at the same path (a
shared file system): trials write their runs there from whichever node runs them.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from functools import partial
from pathlib import Path

from pipeline.errors import UsageError
from pipeline.storage.locations import is_uri
from pipeline.sweep.config import SWEEP_FILE, TRIALS_DIR, SweepConfig, changed_settings, read_saved, write_json
from pipeline.sweep.results import CSV_FILE, MARKDOWN_FILE, PLOT_FILE, TrialRow, best_row, write_results
from pipeline.sweep.trial import run_trial

log = logging.getLogger(__name__)


@dataclass
class SweepResult:
    """What a sweep produced: its rows (best first) and the files written into its folder."""

    rows: list[TrialRow]
    best: TrialRow | None
    table: Path
    markdown: Path
    plot: Path | None


def _absolute(path: str | None) -> str | None:
    """A local path made absolute (trials run in other working directories); URIs as given."""
    if path is None or is_uri(path):
        return path
    return str(Path(path).expanduser().resolve())


def resolve(config: SweepConfig) -> SweepConfig:
    """The config as trials get it: absolute paths, smoke-test settings applied, each trial's workers and CPUs."""
    from pipeline.training.config import smoke_overrides

    out = Path(config.out).expanduser().resolve()
    train = config.train
    if train.smoke_test:
        train = train.replace(**smoke_overrides(), smoke_test=False)
    train = train.replace(data=_absolute(train.data), init_from=_absolute(train.init_from), out=str(out / TRIALS_DIR),
                          progress=False, workers=config.workers_per_trial, cpus_per_worker=config.worker_cpus)
    return config.replace(out=str(out), train=train)


def _prepare_folder(config: SweepConfig) -> bool:
    """Check `out` and record the config; returns True when Tune's experiment is restored."""
    from ray.tune import Tuner

    out = Path(config.out)
    saved = read_saved(out)
    if saved is None and out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out} is not empty and holds no {SWEEP_FILE}: pass another --out")
    if saved is not None and not config.resume:
        raise FileExistsError(f"{out} already holds a sweep: pass --resume to continue it, or another --out")
    if saved is not None:
        changes = changed_settings(saved, config)
        if changes:
            raise ValueError(f"{out / SWEEP_FILE}: cannot resume with changed settings: " + "; ".join(changes))
    out.mkdir(parents=True, exist_ok=True)
    config.trials_dir.mkdir(exist_ok=True)
    if saved is None:
        write_json(out / SWEEP_FILE, config.to_dict())
    restore = config.resume and Tuner.can_restore(str(config.tune_dir))
    if config.resume and not restore:
        log.warning("resume: no Ray Tune experiment in %s yet; starting the sweep", config.tune_dir)
    return restore


def trial_dirname(trial) -> str:
    """Tune's folder of a trial is named by its id, like the trial's run in `trials/`."""
    return trial.trial_id


def _tune_callbacks(config: SweepConfig):
    """A Tune callback that rewrites the results after every trial that ends (and at the very end)."""
    from ray.tune import Callback

    out, keys, log_keys = config.out, config.space.keys, config.space.log_keys

    class WriteResults(Callback):
        def _write(self, trials):
            try:
                write_results(out, [(t.trial_id, t.config, t.status) for t in trials], keys, log_keys=log_keys)
            except Exception as e:  # a table is not worth stopping the sweep for
                log.warning("could not write the sweep's results: %s", e)

        def on_trial_complete(self, iteration, trials, trial, **info):
            self._write(trials)

        def on_trial_error(self, iteration, trials, trial, **info):
            self._write(trials)

    return [WriteResults()]


def run_sweep(config: SweepConfig) -> SweepResult:
    """Run (or, with `config.resume`, continue) a sweep; write its table and plot into `config.out`.

    Returns:
        SweepResult: the rows, best first; `best` is the finished trial with the highest
        validation PSNR (its model: `out/trials/<trial>/model.n2n`).
    """
    from ray import tune
    from ray.tune.search.basic_variant import BasicVariantGenerator

    from pipeline.runtime.ray_session import is_private
    from pipeline.sweep.scheduler import ReplayedASHA
    from pipeline.training.placement import connect, resolve_workers
    from pipeline.training.preflight import check_trials

    config = resolve(config)
    config.space.check(config.train)
    check_trials(config.train)  # --data, --holdout, --init-from: usage errors before any trial
    restore = _prepare_folder(config)

    owns_ray = connect(config.address)
    try:
        import ray

        _, use_gpu = resolve_workers(config.train)
        bundles = config.bundles(use_gpu)
        need = sum(b["CPU"] for b in bundles)
        have = ray.cluster_resources().get("CPU", 0)
        if need > have and is_private():  # it can never grow: no trial would ever start
            raise UsageError(f"a trial needs {need:g} CPUs (its driver and {config.workers_per_trial} workers) but "
                             f"the private Ray this process started has {have:g} and cannot grow; pass a smaller "
                             f"--cpus-per-trial or --workers-per-trial, or --address to run on a cluster")
        if need > have:
            log.warning("a trial needs %g CPUs (driver + %d workers) but the Ray cluster has %g: trials wait "
                        "until the cluster grows (pass a smaller --cpus-per-trial)", need, config.workers_per_trial,
                        have)
        spec = {"train": config.train.to_dict(), "trials": str(config.trials_dir)}
        trainable = tune.with_resources(partial(run_trial, spec=spec),
                                        tune.PlacementGroupFactory(bundles, strategy="PACK"))
        if restore:
            tuner = tune.Tuner.restore(str(config.tune_dir), trainable, resume_unfinished=True, resume_errored=True)
        else:
            scheduler = None
            if config.early_stop:
                scheduler = ReplayedASHA(str(config.trials_dir), max_t=config.train.steps, grace_period=config.grace,
                                         reduction_factor=config.reduction_factor)
            tuner = tune.Tuner(
                trainable,
                param_space=config.space.to_tune(),
                tune_config=tune.TuneConfig(
                    metric="psnr", mode="max", num_samples=config.samples, scheduler=scheduler,
                    search_alg=BasicVariantGenerator(random_state=config.search_seed),
                    max_concurrent_trials=config.max_concurrent or None, reuse_actors=False,
                    trial_dirname_creator=trial_dirname),
                run_config=tune.RunConfig(
                    name=config.tune_dir.name, storage_path=str(config.tune_dir.parent),
                    failure_config=tune.FailureConfig(max_failures=config.trial_retries),
                    callbacks=_tune_callbacks(config), verbose=1),
            )
        grid = tuner.fit()
        trials = [(Path(r.path).name, r.config, "ERROR" if r.error else "TERMINATED") for r in grid]
        for r in grid:
            if r.error:
                last_line = (str(r.error).strip().splitlines() or ["?"])[-1]
                log.warning("trial %s failed: %s", Path(r.path).name, last_line)
    finally:
        if owns_ray:
            import ray

            ray.shutdown()
    rows = write_results(config.out, trials, config.space.keys, log_keys=config.space.log_keys)
    out = Path(config.out)
    return SweepResult(rows=rows, best=best_row(rows), table=out / CSV_FILE, markdown=out / MARKDOWN_FILE,
                       plot=out / PLOT_FILE if rows else None)
