"""`n2n evaluate` and `n2n assess` tried as a careless user would (issue 34): a `--strip`
aimed at a photo or any other file, an empty dataset, PSNRs that are infinite."""
import json
import os

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from n2n_core import build_model, save_checkpoint
from pipeline.cli import main


@pytest.fixture()
def two(tmp_path):
    folder = tmp_path / "two"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for name in ("a.png", "b.png"):
        Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(folder / name)
    return folder


@pytest.fixture()
def model(tmp_path):
    path = tmp_path / "a.n2n"
    save_checkpoint(path, build_model("unet", depth=2, width=4, generator=torch.Generator().manual_seed(0)))
    return path


def n2n(*args):
    result = CliRunner().invoke(main, [str(a) for a in args])
    assert "Traceback" not in result.output, result.output
    return result.exit_code, result.output


def one_error_line(output: str) -> str:
    lines = [line for line in output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error: "), output
    return lines[0]


def strict_json(text: str):
    def refuse(constant):
        raise ValueError(f"not JSON: {constant}")

    return json.loads(text, parse_constant=refuse)


@pytest.mark.parametrize("command", ["evaluate", "assess"])
def test_a_strip_never_replaces_a_file_n2n_did_not_write(command, two, model, tmp_path):
    """Row 1: `--strip two/a.png` replaced the input photo with the strip (exit 0), and
    `--strip notes.png` replaced any file."""
    base = ["evaluate", "--data", two] if command == "evaluate" else ["assess", two]
    photo = (two / "a.png").read_bytes()
    (tmp_path / "notes.png").write_bytes(b"the user's notes")
    (tmp_path / "link.png").symlink_to(tmp_path / "notes.png")
    for strip, words in ((two / "a.png", "inside"), (two / "new.png", "inside"), (tmp_path / "notes.png", "exists"),
                         (tmp_path / "link.png", "exists"), (tmp_path, "folder")):
        status, output = n2n(*base, "--model", model, "--strip", strip)
        assert status == 2, (strip, output)
        assert words in one_error_line(output) and "--strip" in output, output
    assert (two / "a.png").read_bytes() == photo and not (two / "new.png").exists()
    assert (tmp_path / "notes.png").read_bytes() == b"the user's notes" and (tmp_path / "link.png").is_symlink()
    # a strip n2n wrote is n2n's: the next run replaces it
    strip = tmp_path / "strips" / "mine.png"
    for _ in range(2):
        status, output = n2n(*base, "--model", model, "--strip", strip)
        assert status == 0, output
    assert Image.open(strip).width > 16
    assert sorted(os.listdir(tmp_path / "strips")) == ["mine.png"]


@pytest.mark.parametrize("command", ["evaluate", "assess"])
def test_an_empty_dataset_is_a_usage_error_not_a_mean_of_nothing(command, model, tmp_path):
    """Row 9: `--data emptydir` exited 0 with "mean nan"."""
    empty = tmp_path / "emptydir"
    empty.mkdir()
    (empty / "notes.txt").write_text("no images here")
    base = ["evaluate", "--data", empty] if command == "evaluate" else ["assess", empty]
    status, output = n2n(*base, "--model", model)
    assert status == 2 and "nan" not in output, output
    assert "emptydir" in one_error_line(output) and "no images" in output


def test_all_images_failing_exits_1(model, tmp_path):
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "x.png").write_bytes(b"not a png")
    status, output = n2n("evaluate", "--data", broken, "--model", model)
    assert status == 1 and "x.png" in output and "nan" not in output, output


def test_json_reports_hold_no_infinity_or_nan(two, model):
    """Row 9: `--noise gaussian:0 --json` printed `Infinity`, which is not JSON."""
    status, output = n2n("evaluate", "--data", two, "--model", model, "--noise", "gaussian:0", "--json")
    assert status == 0, output
    report = strict_json(output)
    assert report["images"][0]["noisy_psnr"] is None  # a noiseless input: infinite PSNR, written as null
    assert report["mean"]["noisy"]["psnr"] is None
    flat = two.parent / "flat"
    flat.mkdir()
    Image.fromarray(np.full((16, 16, 3), 128, np.uint8)).save(flat / "grey.png")
    status, output = n2n("assess", flat, "--model", model, "--json")
    assert status == 0, output
    report = strict_json(output)
    assert report["photos"][0]["kept"] is None and report["median_kept"] is None  # no noise to keep
