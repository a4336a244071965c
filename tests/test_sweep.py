"""`n2n sweep` on a private local Ray: trials in their own placement groups, ASHA, the table, kill and resume."""
from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from PIL import Image

from ray_support import kill_session, ray_cluster  # noqa: F401 (fixture)
from train_support import make_images

from pipeline.sweep import SearchSpace, SweepConfig, parse_option, run_sweep
from pipeline.sweep.trial import read_trial
from pipeline.training import TrainConfig

ROOT = Path(__file__).resolve().parents[1]
# a tiny U-Net, a few steps: the lr 3e-3 trials learn, the 1e-7 ones cannot, so ASHA has something to cut
TINY = dict(arch="unet", arch_args={"depth": 2}, steps=8, batch_size=4, crop_size=16, validate_every=2,
            checkpoint_every=2, validation_size=32, holdout=2, validation_images=2, device="cpu", seed=1)


def read_table(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.mark.slow  # 4 trials, 8 processes started: about 2 minutes on the shared 2-core machine
def test_tiny_sweep_writes_table_and_plot(ray_cluster, tmp_path):
    images = make_images(tmp_path / "images", count=6, size=32)
    out = tmp_path / "sweep"
    space = SearchSpace((parse_option("grid", "width=8,16"), parse_option("grid", "lr=3e-3,1e-7")))
    config = SweepConfig(out=str(out), train=TrainConfig(data=str(images), out="", **TINY), space=space,
                         cpus_per_trial=1, grace_steps=2, reduction_factor=2)
    assert config.bundles(False) == [{"CPU": 0.5}, {"CPU": 0.5}]
    result = run_sweep(config)

    rows = read_table(out / "results.csv")
    assert len(rows) == 4 and len(result.rows) == 4
    assert list(rows[0]) == ["trial", "status", "width", "lr", "psnr", "best_psnr", "step", "psnr_noisy",
                             "parameters", "train_s"]
    assert {(int(r["width"]), float(r["lr"])) for r in rows} == {(8, 3e-3), (8, 1e-7), (16, 3e-3), (16, 1e-7)}
    assert all(r["status"] in ("finished", "stopped") for r in rows)
    # every trial was an n2n train run in its own folder, scored on the held-out images
    for r in rows:
        folder = out / "trials" / r["trial"]
        config_line = json.loads((folder / "metrics.jsonl").read_text().splitlines()[0])["config"]
        assert config_line["holdout"] == 2 and config_line["workers"] == 1
        assert config_line["arch_args"] == {"depth": 2, "width": int(r["width"])}
        assert config_line["lr"] == float(r["lr"])
        assert 0 < float(r["psnr"]) < 60 and float(r["psnr_noisy"]) == float(rows[0]["psnr_noisy"])
        if r["status"] == "finished":
            assert int(r["step"]) == 8 and (folder / "model.n2n").exists()
            assert read_trial(folder)["result"]["psnr"] == pytest.approx(float(r["psnr"]))
        else:
            assert int(r["step"]) < 8 and not (folder / "model.n2n").exists()
    # ASHA cut at least one trial that cannot learn, and the choice is a learning one
    assert any(r["status"] == "stopped" and float(r["lr"]) == 1e-7 for r in rows)
    assert result.best is not None and result.best.params["lr"] == 3e-3 and rows[0]["trial"] == result.best.trial
    assert float(rows[0]["psnr"]) == max(float(r["psnr"]) for r in rows)
    markdown = (out / "results.md").read_text()
    assert markdown.count("\n") == 2 + 4 and "| width | lr |" in markdown
    with Image.open(out / "sweep.png") as png:
        assert png.format == "PNG" and png.size[0] > 600
    # nothing of the sweep is left on the cluster: its placement groups are gone, all CPUs free
    deadline = time.monotonic() + 30
    while ray_cluster.available_resources().get("CPU", 0) < 2 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert ray_cluster.available_resources().get("CPU", 0) == 2


def _session_processes(session: int) -> list[str]:
    """Command lines of the live processes of session `session` (the killed sweep and what it started)."""
    out = subprocess.run(["ps", "-eo", "sid=,stat=,args="], capture_output=True, text=True).stdout
    return [line for line in out.splitlines() if line.split()[0] == str(session) and not line.split()[1].startswith("Z")]


@pytest.mark.slow
def test_killed_sweep_resumes_without_redoing_finished_trials(ray_cluster, tmp_path):
    images = make_images(tmp_path / "images", count=6, size=32)
    out = tmp_path / "sweep"
    args = [sys.executable, "-m", "pipeline.cli", "sweep", "--data", str(images), "--out", str(out),
            "--arch", "unet", "--arch-arg", "depth=2", "--steps", "12", "--batch-size", "4", "--crop-size", "16",
            "--validate-every", "3", "--checkpoint-every", "3", "--validation-size", "32", "--holdout", "2",
            "--device", "cpu", "--seed", "1", "--grid", "width=8,12,16,20", "--cpus-per-trial", "2",
            "--no-early-stop", "--address", "local"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("RAY_ADDRESS", None)
    process = subprocess.Popen(args, cwd=ROOT, env=env, start_new_session=True,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def finished():
        return [p for p in (out / "trials").glob("*") if "result" in (read_trial(p) or {})]

    deadline = time.monotonic() + 400
    try:
        # kill once a trial has finished and the next one has a checkpoint of its own
        while time.monotonic() < deadline:
            done = finished()
            started = [p for p in (out / "trials").glob("*") if p not in done and list(p.glob("checkpoints/*.n2n"))]
            if done and started:
                break
            assert process.poll() is None, "the sweep ended before it could be interrupted"
            time.sleep(0.1)
        else:
            pytest.fail("the sweep did not get far enough in time")
    finally:
        kill_session(process)  # the sweep, its trials, the Ray it started and its workers
    done_before = finished()
    assert 1 <= len(done_before) < 4
    before = {p.name: ((p / "metrics.jsonl").read_bytes(), (p / "model.n2n").stat().st_mtime_ns) for p in done_before}
    interrupted = started[0]
    kept_lines = (interrupted / "metrics.jsonl").read_text().splitlines()[:2]  # config + step 1, before any checkpoint
    deadline = time.monotonic() + 30
    while _session_processes(process.pid) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not _session_processes(process.pid), "processes of the killed sweep still run"

    from ray.tune import Tuner

    assert Tuner.can_restore(str(out / "tune"))  # Tune's experiment is restored, not started afresh
    saved = json.loads((out / "sweep.json").read_text())
    config = SweepConfig.from_dict({**saved, "resume": True, "address": None})
    result = run_sweep(config)
    rows = read_table(out / "results.csv")
    assert len(rows) == 4 and all(r["status"] == "finished" and int(r["step"]) == 12 for r in rows)
    assert sorted(int(r["width"]) for r in rows) == [8, 12, 16, 20]
    for name, (metrics, mtime) in before.items():  # finished trials were not run again
        assert (out / "trials" / name / "metrics.jsonl").read_bytes() == metrics
        assert (out / "trials" / name / "model.n2n").stat().st_mtime_ns == mtime
    # the interrupted trial resumed from its own checkpoint: its early lines are the ones written before the kill
    assert (interrupted / "metrics.jsonl").read_text().splitlines()[:2] == kept_lines
    steps = [json.loads(t)["step"] for t in (interrupted / "metrics.jsonl").read_text().splitlines()[1:]
             if "loss" in json.loads(t)]
    assert steps == list(range(1, 13))
    assert result.best is not None
