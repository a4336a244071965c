"""The real jobs/train.py as a subprocess: local mode, driver killed and resumed, and `ray job submit`."""
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch
from PIL import Image

from n2n_core import load_checkpoint
from pipeline.training.driver import list_checkpoints
from train_support import make_images

ROOT = Path(__file__).resolve().parents[1]
JOB = ROOT / "jobs" / "train.py"
TINY = ["--arch", "unet", "--arch-arg", "depth=2", "--arch-arg", "width=8", "--crop-size", "8",
        "--batch-size", "4", "--validation-images", "2", "--validation-size", "16", "--no-progress",
        "--device", "cpu", "--seed", "5"]


@pytest.fixture(scope="module", autouse=True)
def _no_ray_start_cluster():
    """The job scripts attach to the cluster of the last `ray start` on the node (Ray's record in
    RAY_TMPDIR): a RAY_TMPDIR of our own keeps those of other Rays on this machine out of sight."""
    temp_dir = tempfile.mkdtemp(prefix="n2n-ray-", dir="/tmp")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("RAY_TMPDIR", temp_dir)
        yield
    shutil.rmtree(temp_dir, ignore_errors=True)


def job_env() -> dict:
    env = dict(os.environ)
    env.pop("RAY_ADDRESS", None)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env["RAY_USAGE_STATS_ENABLED"] = "0"
    return env


def run_job(*args, timeout=300) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, str(JOB), *args], env=job_env(), capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode == 0, f"jobs/train.py failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr[-3000:]}"
    return proc


def check_run(out: Path, steps: int):
    ckpt = load_checkpoint(out / "model.n2n")
    assert ckpt.step == steps
    assert ckpt.optimizer_state is not None and "torch_rng_state" in ckpt.extra_tensors
    assert ckpt.config["steps"] == steps and ckpt.model_config.name == "unet"
    lines = [json.loads(t) for t in (out / "metrics.jsonl").read_text().splitlines()]
    assert lines[0]["config"]["out"] == str(out)
    loss_steps = [r["step"] for r in lines[1:] if "loss" in r]
    assert loss_steps == list(range(1, steps + 1))
    psnr = [r for r in lines[1:] if "psnr" in r]
    assert psnr and psnr[-1]["step"] == steps and 0 < psnr[-1]["psnr"] < 100
    with Image.open(out / "training.png") as png:
        assert png.format == "PNG" and png.size[0] > 300 and png.size[1] > 300
    return ckpt


@pytest.mark.slow
def test_job_script_local_mode(tmp_path):
    images = make_images(tmp_path / "images", count=3, size=16)
    out = tmp_path / "run"
    proc = run_job("--data", str(images), "--out", str(out), "--steps", "4", "--workers", "2",
                   "--checkpoint-every", "2", "--validate-every", "2", *TINY)
    assert "trained 4 steps on 2 workers" in proc.stdout
    assert ("n2n: started a private Ray in this process (no RAY_ADDRESS and no `ray start` cluster on this node): "
            "1 node, ") in proc.stderr
    check_run(out, 4)
    assert [s for s, _ in list_checkpoints(out)] == [2, 4]


def write_config(tmp_path) -> Path:
    images = make_images(tmp_path / "images", count=2, size=16)
    config = tmp_path / "train.yaml"
    config.write_text(f"data: {images}\nsteps: 2\nworkers: 1\narch: unet\narch_args: {{depth: 2, width: 8}}\n")
    return config


@pytest.mark.slow
def test_config_file(tmp_path):
    config, out = write_config(tmp_path), tmp_path / "run"
    run_job("--config", str(config), "--out", str(out), "--validate-every", "1", *TINY[6:])
    assert check_run(out, 2).config["workers"] == 1


def test_bad_options_are_named(tmp_path):
    from click.testing import CliRunner

    from pipeline.commands.train import train

    config, out = write_config(tmp_path), tmp_path / "run"
    bad = CliRunner().invoke(train, ["--config", str(config), "--out", str(out), "--optimizer", "rmsprop"])
    assert bad.exit_code != 0 and "rmsprop" in bad.output
    bad = CliRunner().invoke(train, ["--config", str(config), "--out", str(out), "--workers", "9", "--batch-size", "4"])
    assert bad.exit_code != 0 and "workers (9) must not exceed batch_size (4)" in bad.output
    config.write_text(f"data: {tmp_path / 'images'}\nstepz: 2\n")
    bad = CliRunner().invoke(train, ["--config", str(config), "--out", str(tmp_path / "b")])
    assert bad.exit_code != 0 and "stepz" in bad.output and str(config) in bad.output
    config.write_text("data: [unclosed\n")
    bad = CliRunner().invoke(train, ["--config", str(config), "--out", str(tmp_path / "b")])
    assert bad.exit_code != 0 and str(config) in bad.output and "YAML" in bad.output
    assert not out.exists()


@pytest.mark.slow
def test_driver_killed_then_resumed_equals_uninterrupted(tmp_path):
    images = make_images(tmp_path / "images", count=3, size=16)
    common = ["--data", str(images), "--steps", "30", "--workers", "2", "--checkpoint-every", "2",
              "--validate-every", "10", "--dtype", "float64", *TINY]
    run_job(*common, "--out", str(tmp_path / "whole"))

    out = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, str(JOB), *common, "--out", str(out)], env=job_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 240
        while not any(s >= 6 for s, _ in list_checkpoints(out)):
            assert proc.poll() is None, "the run ended before it could be killed"
            assert time.time() < deadline, "no checkpoint appeared"
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert not (out / "model.n2n").exists(), "the run finished before the kill"
    killed_at = list_checkpoints(out)[-1][0]
    assert killed_at < 30

    run_job(*common, "--out", str(out), "--resume")
    whole = load_checkpoint(tmp_path / "whole" / "model.n2n").model.state_dict()
    resumed = check_run(out, 30).model.state_dict()
    for key in whole:
        assert torch.equal(whole[key], resumed[key]), f"{key} differs after resuming from step {killed_at}"
