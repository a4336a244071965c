"""`n2n evaluate`: known noise added to clean images, PSNR on 8-bit output, failures listed."""
import json
import math

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from n2n_core import build_model, save_checkpoint
from pipeline.cli import main
from pipeline.evaluate import EvaluateConfig, add_evaluation_noise, evaluate


@pytest.fixture()
def clean_folder(tmp_path):
    rng = np.random.default_rng(0)
    folder = tmp_path / "clean"
    folder.mkdir()
    for i, (h, w) in enumerate([(24, 32), (20, 20), (33, 17)]):
        yy, xx = np.mgrid[0:h, 0:w]
        smooth = np.stack([(yy * 7 + xx * 3 + 40 * c) % 256 for c in range(3)], -1)
        pixels = np.clip(smooth + rng.integers(-10, 10, smooth.shape), 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(folder / f"img{i}.png")
    (folder / "broken.png").write_bytes(b"not a png")
    return folder


@pytest.fixture()
def checkpoint(tmp_path):
    model = build_model("unet", depth=2, width=4, generator=torch.Generator().manual_seed(0))
    path = tmp_path / "tiny.n2n"
    save_checkpoint(path, model)
    return path, model


def test_scores_match_an_independent_psnr(clean_folder, checkpoint):
    path, _ = checkpoint
    report = evaluate(EvaluateConfig(data=str(clean_folder), model=str(path), noise="gaussian:25"), progress=False)
    assert [s.key for s in report.scores] == ["img0.png", "img1.png", "img2.png"]
    assert [k for k, _ in report.failed] == ["broken.png"]
    # recompute the noisy PSNR of image 1 by hand: same seed, same noise
    clean = torch.from_numpy(np.array(Image.open(clean_folder / "img1.png"))).permute(2, 0, 1).float() / 255
    index = sorted(p.name for p in clean_folder.iterdir()).index("img1.png")  # noise follows dataset order
    noisy = add_evaluation_noise(clean, "gaussian:25", 0, index)
    noisy8 = (noisy.double().clamp(0, 1) * 255).round()
    mse = ((noisy8 - (clean.double() * 255).round()) ** 2).mean().item()
    # float32 vs float64 rounding may flip a code at a .5 boundary: agree to 1e-5 relative
    assert report.scores[1].noisy_psnr == pytest.approx(10 * math.log10(255**2 / mse), rel=1e-5)
    # sigma 25 on 0..255: about 20 dB before clipping helps a little
    assert 19.5 < report.mean("noisy_psnr") < 22.0
    assert all(0 < s.denoised_ssim <= 1 for s in report.scores)


def test_same_seed_same_noise_other_seed_differs(clean_folder, checkpoint):
    path, _ = checkpoint
    runs = [evaluate(EvaluateConfig(data=str(clean_folder), model=str(path), seed=s), progress=False) for s in (0, 0, 1)]
    assert runs[0].mean("noisy_psnr") == runs[1].mean("noisy_psnr")
    assert runs[0].mean("noisy_psnr") != runs[2].mean("noisy_psnr")


def test_cli_json_and_strip(clean_folder, checkpoint, tmp_path):
    path, _ = checkpoint
    strip = tmp_path / "strip.png"
    result = CliRunner().invoke(main, ["evaluate", "--data", str(clean_folder), "--model", str(path),
                                       "--noise", "gaussian:15", "--json", "--strip", str(strip)])
    assert result.exit_code == 1, result.output  # broken.png failed -> non-zero exit
    report = json.loads(result.output)
    assert report["config"]["noise"] == "gaussian:15" and len(report["images"]) == 3
    assert report["failed"][0]["key"] == "broken.png" and report["failed"][0]["reason"]
    assert report["mean"]["noisy_psnr"] > 23  # sigma 15 is about 24.6 dB
    with Image.open(strip) as picture:
        assert picture.width > 3 * 17 and picture.height > 3 * 17


def test_self_ensemble_option_changes_the_output_and_is_reported(clean_folder, checkpoint):
    path, _ = checkpoint
    args = ["evaluate", "--data", str(clean_folder), "--model", str(path), "--json", "--limit", "3"]
    plain = json.loads(CliRunner().invoke(main, args).output)
    ensemble = json.loads(CliRunner().invoke(main, args + ["--self-ensemble"]).output)
    assert ensemble["config"]["self_ensemble"] is True and plain["config"]["self_ensemble"] is False
    assert ensemble["mean"]["noisy_psnr"] == plain["mean"]["noisy_psnr"]  # same noisy inputs
    assert ensemble["mean"]["denoised_psnr"] != plain["mean"]["denoised_psnr"]
