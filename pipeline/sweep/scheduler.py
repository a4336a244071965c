"""Early stopping: Ray Tune's ASHA on the validation PSNR, over training steps, that survives a restore.

ASHA (Li et al. 2020, asynchronous successive halving) records each trial's PSNR when it
first reaches a rung (grace, grace x rf, grace x rf^2, ... steps) and stops it there
when it is below the best 1/rf of the PSNRs recorded at that rung so far.

Ray Tune does not keep the scheduler's rungs when an experiment is restored, so a
resumed sweep would cut against the trials that happen to run after the restart only.
`ReplayedASHA` fills the rungs again: when Tune adds a restored trial, the validations
in that trial's own metrics.jsonl go through the rungs as they did the first time
(what a rung records does not depend on the order the trials report in). A new trial
has no metrics yet, so nothing changes for a sweep that was never interrupted.
"""
from __future__ import annotations

from pathlib import Path

from ray.tune.schedulers import ASHAScheduler

from pipeline.training.driver import METRICS
from pipeline.training.curves import read_metrics


def validation_history(trial_folder: Path) -> list[tuple[int, float]]:
    """(step, PSNR) of every validation a trial's run recorded, in step order."""
    path = Path(trial_folder) / METRICS
    if not path.exists():
        return []
    _, records = read_metrics(path)
    return sorted((r["step"], r["psnr"]) for r in records if "psnr" in r and r["psnr"] is not None)


class ReplayedASHA(ASHAScheduler):
    """ASHA over the `step` attribute, whose rungs are refilled from the trial folders.

    The metric and mode come from the TuneConfig (`psnr`, `max`).
    """

    def __init__(self, trials_dir: str, *, max_t: int, grace_period: int, reduction_factor: int):
        super().__init__(time_attr="step", max_t=max_t, grace_period=grace_period,
                         reduction_factor=reduction_factor, stop_last_trials=False)
        self.trials_dir = str(trials_dir)

    def on_trial_add(self, tune_controller, trial) -> None:
        super().on_trial_add(tune_controller, trial)
        bracket = self._trial_info[trial.trial_id]
        for step, psnr in validation_history(Path(self.trials_dir) / trial.trial_id):
            bracket.on_result(trial, step, self._metric_op * psnr)  # records the rung; the action was taken then
