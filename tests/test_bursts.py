"""Burst shots -> a pairs table that training reads as real Noise2Noise pairs."""
import numpy as np
import pytest
from PIL import Image

from pipeline.data.bursts import burst_pairs, pack_bursts
from pipeline.data.datasets import is_pairs_table, open_pairs
from pipeline.data.noise import parse_noise  # noqa: F401  (the pairs path needs no noise model)
from pipeline.data.patches import TrainingBatches


def test_shots_pair_consecutively_per_scene():
    keys = ["b/2.png", "b/1.png", "a/x.jpg", "a/y.jpg", "a/z.jpg", "loose.png", "c/only.png"]
    pairs, skipped = burst_pairs(keys)
    assert pairs == [("a/x.jpg", "a/y.jpg"), ("b/1.png", "b/2.png")]
    assert dict(skipped) == {"loose.png": "not in a scene folder (bursts/SCENE/shot files)",
                             "a/z.jpg": "odd shot out (shots are paired consecutively)",
                             "c/only.png": "1 shot: a pair needs two"}


def test_pack_bursts_writes_the_files_bytes_and_reports_the_rest(tmp_path):
    rng = np.random.default_rng(0)
    root = tmp_path / "bursts"
    scene = np.full((20, 24, 3), 128, np.uint8)
    for name in ("kitchen", "window"):
        (root / name).mkdir(parents=True)
        for shot in range(2):
            noisy = np.clip(scene + rng.normal(0, 10, scene.shape), 0, 255).astype(np.uint8)
            Image.fromarray(noisy).save(root / name / f"{shot}.png")
    (root / "odd").mkdir()
    Image.fromarray(scene).save(root / "odd" / "0.png")
    Image.fromarray(scene[:10]).save(root / "odd" / "1.png")  # another size: not a pair
    (root / "bad").mkdir()
    (root / "bad" / "0.png").write_bytes(b"nope")
    Image.fromarray(scene).save(root / "bad" / "1.png")
    reported = []
    count = pack_bursts(root, tmp_path / "pairs.parquet", report=lambda n, r: reported.append((n, r)))
    assert count == 2
    assert {n for n, _ in reported} == {"odd/0.png + odd/1.png", "bad/0.png", "bad/1.png"}
    assert dict(reported)["bad/1.png"] == "left out with its pair: bad/0.png cannot be used"
    assert dict(reported)["odd/0.png + odd/1.png"] == "shots differ in size: 20x24 vs 10x24 (H x W)"
    assert is_pairs_table(tmp_path / "pairs.parquet")
    pairs = open_pairs(tmp_path / "pairs.parquet")
    assert pairs.keys == ["kitchen/0.png", "window/0.png"]
    assert pairs.read_pair(0) == ((root / "kitchen/0.png").read_bytes(), (root / "kitchen/1.png").read_bytes())
    batches = TrainingBatches(pairs, None, crop_size=8, batch_size=4, seed=0)
    inputs, targets = batches.batch(0)
    assert inputs.shape == targets.shape == (4, 3, 8, 8) and not (inputs == targets).all()


def test_pack_bursts_refuses_a_parquet_input(tmp_path):
    from pipeline.data.writers import ParquetWriter

    with ParquetWriter(tmp_path / "t.parquet") as w:
        w.write("a.png", b"x")
    with pytest.raises(ValueError, match="scene folders"):
        pack_bursts(tmp_path / "t.parquet", tmp_path / "out.parquet")


def _burst_folder(root, scenes=("kitchen", "window"), shots=3):
    rng = np.random.default_rng(1)
    scene = np.full((16, 16, 3), 100, np.uint8)
    for name in scenes:
        (root / name).mkdir(parents=True)
        for shot in range(shots):
            Image.fromarray(np.clip(scene + rng.normal(0, 8, scene.shape), 0, 255).astype(np.uint8)).save(
                root / name / f"{shot:02d}.png")
    return root


def test_cli_pairs_writes_a_table_that_trains_and_refuses_what_it_should(tmp_path):
    from click.testing import CliRunner

    from pipeline.cli import main

    runner = CliRunner()
    bursts, out = _burst_folder(tmp_path / "bursts"), tmp_path / "pairs.parquet"
    result = runner.invoke(main, ["data", "pairs", str(bursts), str(out), "--no-progress"])
    assert result.exit_code == 1, result.output  # shots were left out
    assert "wrote 2 pairs, left out 2" in result.output  # the third shot of each scene is odd
    assert "kitchen/02.png: odd shot out" in result.output
    assert open_pairs(out).keys == ["kitchen/00.png", "window/00.png"]
    before = out.read_bytes()
    again = runner.invoke(main, ["data", "pairs", str(bursts), str(out), "--no-progress"])
    assert again.exit_code == 2 and "exists; --overwrite replaces it" in again.output and out.read_bytes() == before
    missing = runner.invoke(main, ["data", "pairs", str(tmp_path / "nowhere"), str(tmp_path / "x.parquet")])
    assert missing.exit_code == 2 and "no such folder" in missing.output
    assert not (tmp_path / "x.parquet").exists()
    lonely = tmp_path / "lonely"
    (lonely / "one").mkdir(parents=True)
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(lonely / "one" / "a.png")
    empty = runner.invoke(main, ["data", "pairs", str(lonely), str(tmp_path / "e.parquet"), "--no-progress"])
    assert empty.exit_code == 2 and "no pair of same-size shots" in empty.output
    assert not any(tmp_path.glob("*e.parquet*"))  # nothing written, no temporary left
    assert "Traceback" not in result.output + again.output + missing.output + empty.output

