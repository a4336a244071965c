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
from pipeline.quality.evaluate import EvaluateConfig, add_evaluation_noise, evaluate


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
    assert report.columns == ["model/float", "model/8bit"]
    # recompute the noisy PSNR of image 1 by hand: same seed, same noise
    clean = torch.from_numpy(np.array(Image.open(clean_folder / "img1.png"))).permute(2, 0, 1).float() / 255
    index = sorted(p.name for p in clean_folder.iterdir()).index("img1.png")  # noise follows dataset order
    noisy = add_evaluation_noise(clean, "gaussian:25", 0, index)
    noisy8 = (noisy.double().clamp(0, 1) * 255).round()
    mse = ((noisy8 - (clean.double() * 255).round()) ** 2).mean().item()
    # float32 vs float64 rounding may flip a code at a .5 boundary: agree to 1e-5 relative
    assert report.scores[1].noisy_psnr == pytest.approx(10 * math.log10(255**2 / mse), rel=1e-5)
    # sigma 25 on 0..255: about 20 dB before clipping helps a little
    assert 19.5 < report.mean_psnr() < 22.0
    assert all(0 < s.ssim[c] <= 1 for s in report.scores for c in report.columns)


def test_same_seed_same_noise_other_seed_differs(clean_folder, checkpoint):
    path, _ = checkpoint
    runs = [evaluate(EvaluateConfig(data=str(clean_folder), model=str(path), seed=s), progress=False) for s in (0, 0, 1)]
    assert runs[0].mean_psnr() == runs[1].mean_psnr()
    assert runs[0].mean_psnr() != runs[2].mean_psnr()


def test_cli_json_and_strip(clean_folder, checkpoint, tmp_path):
    path, _ = checkpoint
    strip = tmp_path / "strip.png"
    result = CliRunner().invoke(main, ["evaluate", "--data", str(clean_folder), "--model", str(path),
                                       "--noise", "gaussian:15", "--json", "--strip", str(strip)])
    assert result.exit_code == 1, result.output  # broken.png failed -> non-zero exit
    report = json.loads(result.output)
    assert report["config"]["noise"] == "gaussian:15" and len(report["images"]) == 3
    assert report["failed"][0]["key"] == "broken.png" and report["failed"][0]["reason"]
    assert report["mean"]["noisy"]["psnr"] > 23  # sigma 15 is about 24.6 dB
    assert set(report["mean"]) == {"noisy", "model/float", "model/8bit"}
    with Image.open(strip) as picture:
        assert picture.width > 3 * 17 and picture.height > 3 * 17


def test_self_ensemble_option_changes_the_output_and_is_reported(clean_folder, checkpoint):
    path, _ = checkpoint
    args = ["evaluate", "--data", str(clean_folder), "--model", str(path), "--json", "--limit", "3"]
    plain = json.loads(CliRunner().invoke(main, args).output)
    ensemble = json.loads(CliRunner().invoke(main, args + ["--self-ensemble"]).output)
    assert ensemble["config"]["self_ensemble"] is True and plain["config"]["self_ensemble"] is False
    assert ensemble["mean"]["noisy"] == plain["mean"]["noisy"]  # same noisy inputs
    assert ensemble["mean"]["model/8bit"]["psnr"] != plain["mean"]["model/8bit"]["psnr"]


def test_both_conventions_are_the_float_input_and_its_8bit_storage(clean_folder, checkpoint):
    path, model = checkpoint
    from pipeline.inference import denoise_image
    from n2n_core import psnr, quantize_8bit

    report = evaluate(EvaluateConfig(data=str(clean_folder), model=str(path), noise="gaussian:50"), progress=False)
    clean = torch.from_numpy(np.array(Image.open(clean_folder / "img0.png"))).permute(2, 0, 1).float() / 255
    index = sorted(p.name for p in clean_folder.iterdir()).index("img0.png")
    noisy = add_evaluation_noise(clean, "gaussian:50", 0, index)
    assert noisy.min() < 0 and noisy.max() > 1  # sigma 50: the float input leaves [0, 1]
    for convention, x in (("float", noisy), ("8bit", quantize_8bit(noisy))):
        expected = float(psnr(quantize_8bit(denoise_image(model.eval(), x)).double(), clean.double()))
        assert report.scores[0].psnr[f"model/{convention}"] == pytest.approx(expected, abs=1e-9)
    assert report.scores[0].psnr["model/float"] != report.scores[0].psnr["model/8bit"]
    only = evaluate(EvaluateConfig(data=str(clean_folder), model=str(path), noise="gaussian:50", inputs="8bit"),
                    progress=False)
    assert only.columns == ["model/8bit"] and only.mean_psnr("model/8bit") == report.mean_psnr("model/8bit")


def test_cbm3d_peer_runs_on_the_same_inputs_and_is_cached(clean_folder, checkpoint, tmp_path):
    pytest.importorskip("bm3d")
    import bm3d

    path, _ = checkpoint
    cache = tmp_path / "peer-cache"
    config = EvaluateConfig(data=str(clean_folder), model=str(path), noise="gaussian:25", peer="cbm3d",
                            peer_cache=str(cache), limit=3)  # broken.png, img0, img1
    report = evaluate(config, progress=False)
    assert report.columns == ["model/float", "model/8bit", "cbm3d/float", "cbm3d/8bit"]
    # by hand: CBM3D with the spec's sigma on the 8-bit input of image 0
    clean = torch.from_numpy(np.array(Image.open(clean_folder / "img0.png"))).permute(2, 0, 1).float() / 255
    index = sorted(p.name for p in clean_folder.iterdir()).index("img0.png")
    from n2n_core import psnr, quantize_8bit
    x = quantize_8bit(add_evaluation_noise(clean, "gaussian:25", 0, index))
    out = bm3d.bm3d_rgb(x.double().permute(1, 2, 0).numpy(), 25 / 255)
    expected = float(psnr(quantize_8bit(torch.from_numpy(out).permute(2, 0, 1)).double(), clean.double()))
    by_key = {s.key: s for s in report.scores}
    assert by_key["img0.png"].psnr["cbm3d/8bit"] == pytest.approx(expected, abs=1e-5)  # float32 vs 64 levels
    assert report.mean_psnr("cbm3d/8bit") > report.mean_psnr() + 3  # CBM3D denoises
    assert len(list(cache.glob("*.npy"))) == 4  # 2 readable images x 2 conventions
    again = evaluate(config, progress=False)  # from the cache: the same numbers
    assert [s.psnr for s in again.scores] == [s.psnr for s in report.scores]


def test_user_errors_are_one_line_with_usage_status(clean_folder, checkpoint, tmp_path):
    path, _ = checkpoint
    runner = CliRunner()
    for args, words in ((["--limit", "0"], "--limit"), (["--limit", "-1"], "--limit"),
                        (["--noise", "gaussian:-5"], "gaussian:-5"), (["--noise", "poisson:inf"], "finite"),
                        (["--tile", "-3"], "--tile"), (["--data", str(tmp_path / "missing")], "missing")):
        base = ["evaluate", "--data", str(clean_folder), "--model", str(path)]
        result = runner.invoke(main, base + args)
        assert result.exit_code == 2, (args, result.output)
        assert words in result.output and "Traceback" not in result.output, result.output


def test_images_smaller_than_the_ssim_window_get_psnr_only(tmp_path, checkpoint):
    path, _ = checkpoint
    folder = tmp_path / "tiny"
    folder.mkdir()
    Image.fromarray(np.full((8, 9, 3), 120, np.uint8)).save(folder / "a-small.png")
    Image.fromarray(np.full((16, 16, 3), 90, np.uint8)).save(folder / "b-big.png")
    report = evaluate(EvaluateConfig(data=str(folder), model=str(path)), progress=False)
    assert [s.key for s in report.scores] == ["a-small.png", "b-big.png"] and not report.failed
    assert report.psnr_only == ["a-small.png"]
    assert report.scores[0].ssim["model/8bit"] is None and report.scores[1].ssim["model/8bit"] is not None
    assert report.mean_ssim("model/8bit") == report.scores[1].ssim["model/8bit"]
    assert "PSNR only" in report.table() and "a-small.png" in report.table()


def test_peer_sigma_is_the_specs_or_the_true_noise_rms():
    from pipeline.quality.classical_peers import known_sigma, peer_sigma

    assert known_sigma("gaussian:25") == known_sigma("gaussian:25,8bit") == 25 / 255
    assert known_sigma("gaussian:0-50") is None and known_sigma("camera") is None
    assert known_sigma("gaussian:25,jpeg=80") is None  # JPEG changes the noise: measure it
    clean = torch.full((3, 64, 64), 0.5)
    noisy = clean + torch.randn(clean.shape, generator=torch.Generator().manual_seed(0)) * 10 / 255
    assert peer_sigma("camera", noisy, clean) * 255 == pytest.approx(10, rel=0.03)
    assert peer_sigma("gaussian:25", noisy, clean) == 25 / 255
