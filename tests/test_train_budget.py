"""`max_seconds`: the driver stops after the step that crosses the wall-clock budget and ends the run as usual."""
import json
import time
import types

import pytest

from n2n_core import load_checkpoint
from pipeline.training import TrainConfig, train
from pipeline.training import driver
from pipeline.training.driver import list_checkpoints
from train_support import assert_weights_close, images, reference_weights, tiny_config  # noqa: F401 (fixture)
from ray_support import ray_cpus  # noqa: F401 (fixture)


class FakeClock:
    """perf_counter for the driver: 1 ms per reading, plus whatever the test adds between steps."""

    def __init__(self):
        self.now = 100.0

    def perf_counter(self):
        self.now += 0.001
        return self.now


def test_budget_stops_after_the_crossing_step_and_ends_like_a_full_run(ray_cpus, images, tmp_path, monkeypatch):
    clock = FakeClock()
    monkeypatch.setattr(driver, "time", types.SimpleNamespace(perf_counter=clock.perf_counter, time=time.time))

    def one_second_per_step(step, model, placement):
        clock.now += 1.0

    config = tiny_config(images, tmp_path / "run", workers=1, steps=20, max_seconds=2.5)
    result = train(config, on_step=one_second_per_step)
    # at the end of step k, k - 1 seconds (+ a few ms) have passed: steps 1-3 are inside, step 4 crosses 2.5 s
    assert result.steps == 4
    final = load_checkpoint(tmp_path / "run" / "model.n2n")
    assert final.step == 4 and final.optimizer_state is not None
    assert [s for s, _ in list_checkpoints(tmp_path / "run")] == [4]  # checkpoint_every=5: only the final one
    lines = [json.loads(t) for t in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines[1:] if "loss" in r] == [1, 2, 3, 4]
    assert [r["step"] for r in lines[1:] if "psnr" in r] == [4]  # validated at the last step, as at `steps`
    assert (tmp_path / "run" / "training.png").is_file()
    assert_weights_close(final.model.state_dict(), reference_weights(config, steps=4), 1e-10, "after 4 steps")
    assert_weights_close(result.model.state_dict(), reference_weights(config, steps=4), 1e-10, "result")

    # the stopped run resumes (no budget now) to exactly the uninterrupted run's weights
    monkeypatch.undo()
    resumed = train(config.replace(resume=True, max_seconds=None, steps=8))
    assert resumed.steps == 8
    assert_weights_close(resumed.model.state_dict(), reference_weights(config, steps=8), 1e-10, "resumed to 8")


def test_budget_not_reached_runs_all_steps(ray_cpus, images, tmp_path):
    result = train(tiny_config(images, tmp_path / "run", workers=1, steps=3, max_seconds=3600.0))
    assert result.steps == 3 and load_checkpoint(tmp_path / "run" / "model.n2n").step == 3


@pytest.mark.parametrize("bad", [0, -1.0, "10", True])
def test_budget_must_be_a_positive_number(tmp_path, bad):
    with pytest.raises(ValueError, match="max_seconds"):
        TrainConfig(data=str(tmp_path), out=str(tmp_path / "o"), max_seconds=bad)
