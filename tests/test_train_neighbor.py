"""Training on noisy images alone (`--target neighbor`, Neighbor2Neighbor): it learns to denoise, the
Ray path equals the in-process one (after a lost worker too), resume is bit-exact, the refusals,
and a fine-tune of the built-in model on noisy photos from the command line."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from n2n_core import psnr
from pipeline.training import TrainConfig, train
from ray_support import ray_cpus  # noqa: F401 (fixture)
from train_support import assert_weights_close, images, interrupt_after, tiny_config  # noqa: F401 (fixture)

ROOT = Path(__file__).resolve().parents[1]


def noisy_photos(folder: Path, count: int = 6, size: int = 48, sigma: float = 25.0):
    """Smooth clean images and their noisy 8-bit copies (sigma on 0..255): the noisy folder is all
    training sees; the clean arrays judge the result."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    clean = []
    for i in range(count):
        low = rng.random((6, 6, 3))
        img = np.kron(low, np.ones((-(-size // 6), -(-size // 6), 1)))[:size, :size]
        y, x = np.mgrid[0:size, 0:size] / size
        img = np.clip(0.6 * img + 0.4 * (0.5 + 0.5 * np.sin(6 * x + 4 * y))[..., None], 0, 1)
        noisy = np.clip(img + rng.normal(0, sigma / 255, img.shape), 0, 1)
        Image.fromarray((noisy * 255).round().astype(np.uint8)).save(folder / f"img{i}.png")
        clean.append(torch.from_numpy(img).permute(2, 0, 1).float())
    return folder, clean


def neighbor_config(data, out, **changes) -> TrainConfig:
    values = dict(data=str(data), out=str(out), arch="unet", arch_args={"depth": 2, "width": 16}, target="neighbor",
                  noise="none", steps=120, batch_size=8, crop_size=32, lr=3e-3, seed=1, checkpoint_every=40,
                  validate_every=40, validation_images=2, validation_size=48, progress=False, device="cpu", ray=False)
    values.update(changes)
    return TrainConfig(**values)


@pytest.fixture
def one_thread():
    """This process's torch on one thread: a tiny model's many small operations on two threads wait on
    each other whenever the rest of the machine is busy (15x slower seen under load)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_noisy_images_alone_train_a_denoiser(tmp_path, one_thread):
    folder, clean = noisy_photos(tmp_path / "noisy")
    result = train(neighbor_config(folder, tmp_path / "run", steps=240, checkpoint_every=80, validate_every=80))
    noisy = [torch.from_numpy(np.asarray(Image.open(folder / f"img{i}.png"), dtype=np.float32) / 255).permute(2, 0, 1)
             for i in range(len(clean))]
    model = result.model.eval()
    before = sum(float(psnr(n, c)) for n, c in zip(noisy, clean)) / len(clean)
    after = sum(float(psnr(model(n.unsqueeze(0))[0].clamp(0, 1), c)) for n, c in zip(noisy, clean)) / len(clean)
    assert after > before + 3.0, f"PSNR against the clean images: noisy {before:.2f} dB, denoised {after:.2f} dB"
    # validation had no clean image: it reports the no-reference noise estimate, lower after than before
    records = [line for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines() if '"sigma"' in line]
    assert records and result.psnr is None and result.sigma is not None
    last = json.loads(records[-1])
    assert last["sigma"] < 0.6 * last["sigma_noisy"], last


def test_targets_next_to_white_are_left_out_only_where_the_photos_clip(tmp_path, one_thread):
    def weights_after_two_steps(folder, mask):
        run = train(neighbor_config(folder, tmp_path / f"run-{folder.name}-{mask}", steps=2, checkpoint_every=2,
                                    validate_every=2, validation_images=1, nb_mask_clipped=mask))
        return run.model.state_dict()

    dim, _ = noisy_photos(tmp_path / "dim", count=3, sigma=10.0)  # 0.6 x img + 0.4 x wave: never near white
    for i in range(3):  # noisy values stay well inside 0..1: nothing clips
        pixels = np.asarray(Image.open(dim / f"img{i}.png")).astype(np.float32)
        Image.fromarray((pixels * 0.8 + 20).round().astype(np.uint8)).save(dim / f"img{i}.png")
    kept, masked = weights_after_two_steps(dim, False), weights_after_two_steps(dim, True)
    assert all(torch.equal(kept[k], masked[k]) for k in kept), "a mask where nothing clips changed the run"

    bright, _ = noisy_photos(tmp_path / "bright", count=3, sigma=40.0)  # strong noise: many pixels at 255
    assert max(int((np.asarray(Image.open(bright / f"img{i}.png")) == 255).sum()) for i in range(3)) > 50
    kept, masked = weights_after_two_steps(bright, False), weights_after_two_steps(bright, True)
    assert any(not torch.equal(kept[k], masked[k]) for k in kept), "the clipped targets were not left out"


def test_ray_overlapped_equals_in_process_even_after_a_lost_worker(ray_cpus, images, tmp_path):
    # clean images with synthetic noise: validation PSNR as for Noise2Noise; gamma rises over the 10 steps
    config = tiny_config(images, tmp_path / "ray", target="neighbor", crop_size=16, steps=10, workers=2)
    killed = []

    def on_step(step, model, placement):
        if step == 4:
            killed.append(placement[0]["pid"])
            os.kill(placement[0]["pid"], 9)

    result = train(config, on_step=on_step)
    local = train(config.replace(out=str(tmp_path / "local"), ray=False, workers=0))
    assert killed and result.failures == 1
    assert_weights_close(result.model.state_dict(), local.model.state_dict(), 1e-10, "neighbor, Ray and in process")
    assert result.psnr is not None and result.sigma is None


def test_resume_is_bit_exact(tmp_path, one_thread):
    folder, _ = noisy_photos(tmp_path / "noisy", count=3)
    whole = train(neighbor_config(folder, tmp_path / "whole", steps=8, checkpoint_every=4, validation_images=1))
    cut = neighbor_config(folder, tmp_path / "cut", steps=8, checkpoint_every=4, validation_images=1)
    interrupt_after(cut, 4)  # the same run, broken off after its step-4 checkpoint (gamma's schedule is the run's)
    resumed = train(cut.replace(resume=True))
    for key, value in whole.model.state_dict().items():
        assert torch.equal(value, resumed.model.state_dict()[key]), key


def _n2n(*args, cwd):
    return subprocess.run([sys.executable, "-m", "pipeline.cli", *args], capture_output=True, text=True, cwd=cwd,
                          timeout=300)


@pytest.mark.parametrize("args, message", [
    (["--noise", "none"], "'none' (the data is noisy already) needs target 'neighbor'"),
    (["--target", "neighbor", "--loss", "l1"], "must be 'l2' with target 'neighbor'"),
    (["--target", "neighbor", "--crop-size", "16", "--arch-arg", "depth=4"], "must be a multiple of 32 with --target neighbor"),
])
def test_refusals_are_one_line_usage_errors_before_anything_is_made(tmp_path, images, args, message):
    out = tmp_path / "run"
    done = _n2n("train", "--data", str(images), "--out", str(out), "--no-ray", "--steps", "2", *args, cwd=tmp_path)
    assert done.returncode == 2, done.stderr
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and message in lines[0], done.stderr
    assert not out.exists()


def test_a_sweep_refuses_noise_none(tmp_path, images):
    done = _n2n("sweep", "--data", str(images), "--out", str(tmp_path / "sweep"), "--holdout", "1", "--noise", "none",
                "--target", "neighbor", "--grid", "lr=1e-3,1e-2", cwd=tmp_path)
    assert done.returncode == 2 and "a sweep ranks trials by validation PSNR" in done.stderr, done.stderr


def test_fine_tune_the_default_on_noisy_photos_from_the_command_line(tmp_path):
    """`--init-from default` with no --arch takes the built-in model's own architecture."""
    folder, _ = noisy_photos(tmp_path / "noisy", count=2, size=64)
    done = _n2n("train", "--data", str(folder), "--out", str(tmp_path / "run"), "--init-from", "default",
                "--target", "neighbor", "--noise", "none", "--steps", "1", "--batch-size", "1", "--crop-size", "32",
                "--validation-images", "1", "--no-ray", "--no-progress", cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "validation noise estimate" in done.stdout
    from n2n_core import load_checkpoint
    from pipeline.assets import default_model_path

    tuned, shipped = load_checkpoint(tmp_path / "run" / "model.n2n"), load_checkpoint(default_model_path())
    assert tuned.model_config == shipped.model_config


@pytest.mark.slow  # 2 trials on Ray Tune: about a minute on the 2-core machine
def test_a_sweep_trains_neighbor_trials_on_clean_images_and_ranks_them_by_psnr(tmp_path):
    from pipeline.sweep import SearchSpace, SweepConfig, parse_option, run_sweep
    from ray_support import private_ray
    from train_support import make_images

    data = make_images(tmp_path / "images", count=6, size=32)
    train_config = TrainConfig(data=str(data), out="", arch="unet", arch_args={"depth": 2}, target="neighbor",
                               noise="gaussian:25", steps=6, batch_size=4, crop_size=16, validate_every=3,
                               checkpoint_every=3, validation_size=32, holdout=2, validation_images=2, device="cpu")
    space = SearchSpace((parse_option("grid", "nb_gamma=0,2"),))
    ray = private_ray(num_cpus=2, log_to_driver=False)
    next(ray)
    try:
        result = run_sweep(SweepConfig(out=str(tmp_path / "sweep"), train=train_config, space=space,
                                       cpus_per_trial=1, grace_steps=3, reduction_factor=2))
    finally:
        next(ray, None)
    assert len(result.rows) == 2
    assert {float(row.params["nb_gamma"]) for row in result.rows} == {0.0, 2.0}
    assert all(row.psnr is not None and 0 < row.psnr < 60 for row in result.rows)
