"""The first-run demo end to end on tiny settings: photos, bulk denoise, Ray training, report."""
import json

import pytest
import torch
from PIL import Image

from n2n_core import build_model, save_checkpoint
from pipeline.demo import DemoConfig, run_demo, sample_photo


def test_sample_photos_ship_with_scikit_image():
    photo = sample_photo("chelsea", 100)
    assert photo.dtype.name == "uint8" and photo.shape[2] == 3 and max(photo.shape[:2]) == 100


@pytest.mark.slow
def test_demo_writes_outputs_report_and_scores(tmp_path):
    model = build_model("unet", depth=2, width=4, generator=torch.Generator().manual_seed(0))
    checkpoint = tmp_path / "tiny.n2n"
    save_checkpoint(checkpoint, model)
    out = tmp_path / "demo"
    report = run_demo(DemoConfig(out=str(out), model=str(checkpoint), photos=("chelsea", "coffee"), max_side=64,
                                 train_steps=2, train_workers=2))
    for folder in ("clean", "noisy", "denoised"):
        assert sorted(p.name for p in (out / folder).glob("*.png")) == ["chelsea.png", "coffee.png"]
    assert set(report["images"]) == {"chelsea.png", "coffee.png"}
    for scores in report["images"].values():
        assert 17 < scores["noisy_psnr"] < 24  # sigma 25, clipped 8-bit
    assert json.loads((out / "summary.json").read_text())["mean_gain"] == pytest.approx(report["mean_gain"])
    with Image.open(out / "report.png") as picture:
        assert picture.width > 300 and picture.height > 300
    assert (out / "train" / "metrics.jsonl").exists()
    # The README's first command run twice: the second run redoes the demo, same figures.
    again = run_demo(DemoConfig(out=str(out), model=str(checkpoint), photos=("chelsea", "coffee"), max_side=64,
                                train_steps=2, train_workers=2))
    assert again["mean_gain"] == pytest.approx(report["mean_gain"])


def test_the_demo_never_writes_into_a_folder_of_someone_elses_files(tmp_path):
    """The demo deletes its own train/ folder and writes clean/, noisy/ and report.png: into a
    folder of the user's files it would have deleted their train/ and replaced their photos."""
    from click.testing import CliRunner

    from pipeline.cli import main

    mine = tmp_path / "project"
    (mine / "train").mkdir(parents=True)
    (mine / "train" / "notes.txt").write_text("my training notes")
    (mine / "report.png").write_bytes(b"my report")
    result = CliRunner().invoke(main, ["demo", "--out", str(mine), "--train-steps", "0"])
    assert result.exit_code == 2 and "n2n-demo.json" in result.output, result.output
    assert (mine / "train" / "notes.txt").read_text() == "my training notes"
    assert (mine / "report.png").read_bytes() == b"my report" and sorted(p.name for p in mine.iterdir()) == [
        "report.png", "train"]
