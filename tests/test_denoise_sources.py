"""The bulk job tried as a careless user would (issue 34, rows 3 and 4): the manifest records
what each output was made from, so a rerun redoes what changed and refuses another IN;
file names that are not UTF-8 never stop a run."""
from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner
from PIL import Image

from pipeline.cli import main
from pipeline.inference import DenoiseConfig, read_manifest, run_denoise
from ray_support import ray_cluster  # noqa: F401 (fixture)
from tests.denoise_helpers import checkpoint  # noqa: F401 (fixture)

NOT_UTF8 = os.fsdecode(b"bad\xff\xfeutf8.png")  # a name as a Linux file system may hold it
RAY_LOG = re.compile(r"^\d{4}-\d\d-\d\d [\d:,]+\s+(INFO|WARNING) ")


def photo(path: Path, seed: int, size: int = 16) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)).save(path)
    return path


def denoise(*args):
    result = CliRunner().invoke(main, ["denoise", *map(str, args), "--no-progress"])
    assert "Traceback" not in result.output, result.output
    return result.exit_code, result.output


def error_line(output: str) -> str:
    lines = [line for line in output.splitlines() if line.strip() and not RAY_LOG.match(line)]
    assert len(lines) == 1 and lines[0].startswith("Error: "), output
    return lines[0]


def test_a_run_from_another_in_is_refused_unless_overwrite(tmp_path, ray_cluster, checkpoint):
    """Row 4: batch1 -> outB, then batch2 -> outB, both with IMG_0001.png: "1 skipped",
    exit 0, outB kept batch1's image."""
    photo(tmp_path / "batch1" / "IMG_0001.png", 1)
    photo(tmp_path / "batch1" / "IMG_0002.png", 2)
    photo(tmp_path / "batch2" / "IMG_0001.png", 3)
    out = tmp_path / "outB"
    status, output = denoise(tmp_path / "batch1", out, "--model", checkpoint)
    assert status == 0, output
    first = {p.name: p.read_bytes() for p in out.glob("*.png")}
    status, output = denoise(tmp_path / "batch2", out, "--model", checkpoint)
    assert status == 2, output
    line = error_line(output)
    assert "batch1" in line and "batch2" in line and "--overwrite" in line, output
    assert {p.name: p.read_bytes() for p in out.glob("*.png")} == first
    status, output = denoise(tmp_path / "batch2", out, "--model", checkpoint, "--overwrite")
    assert status == 0 and "1 done" in output, output
    assert (out / "IMG_0001.png").read_bytes() != first["IMG_0001.png"]  # now batch2's
    assert (out / "IMG_0002.png").read_bytes() == first["IMG_0002.png"]  # n2n's, from batch1: kept
    assert read_manifest(out / "_manifest.jsonl")["IMG_0001.png"]["in"] == os.path.realpath(tmp_path / "batch2")


def test_an_input_edited_after_its_run_or_new_settings_are_redone(tmp_path, ray_cluster, checkpoint):
    """Row 4: an input edited after its run was skipped: the manifest did not record what an
    output was made from."""
    src, out = tmp_path / "in", tmp_path / "out"
    for i in range(3):
        photo(src / f"{i}.png", i)
    config = DenoiseConfig(str(src), str(out), model=str(checkpoint), tile=None, progress=False)
    assert run_denoise(config).done == 3
    record = read_manifest(out / "_manifest.jsonl")["1.png"]
    assert record["source"] == {"size": (src / "1.png").stat().st_size, "mtime_ns": (src / "1.png").stat().st_mtime_ns}
    assert record["settings"]["model"] and record["settings"]["strength"] == 1.0
    before = {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in out.glob("*.png")}
    photo(src / "1.png", 99)  # the user edits one photo
    summary = run_denoise(config)
    assert (summary.done, summary.skipped, summary.redone) == (1, 2, 1), summary.format()
    after = {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in out.glob("*.png")}
    assert after["0.png"] == before["0.png"] and after["2.png"] == before["2.png"]
    assert after["1.png"][0] != before["1.png"][0]
    summary = run_denoise(DenoiseConfig(str(src), str(out), model=str(checkpoint), tile=None, progress=False,
                                        strength=0.5))
    assert (summary.done, summary.skipped, summary.redone) == (3, 0, 3), summary.format()
    assert "redone" in summary.format()


def test_parquet_output_redone_from_a_changed_input_holds_each_row_once(tmp_path, ray_cluster, checkpoint):
    src, out = tmp_path / "in", tmp_path / "out.parquet"
    for i in range(3):
        photo(src / f"{i}.png", i)
    config = DenoiseConfig(str(src), str(out), model=str(checkpoint), tile=None, progress=False)
    assert run_denoise(config).done == 3
    photo(src / "2.png", 42)
    summary = run_denoise(config)
    assert summary.failed == 0 and summary.done == 3, summary.format()  # its parts mix rows: all redone
    keys = [k for part in sorted(out.glob("part-*.parquet")) for k in pq.read_table(part).column("path").to_pylist()]
    assert sorted(keys) == ["0.png", "1.png", "2.png"]


def test_file_names_that_are_not_utf8_are_denoised_and_never_stop_a_run(tmp_path, ray_cluster, checkpoint):
    """Row 3: a file named b'bad\\xff\\xfeutf8.png' aborted every run (exit 1, a RayTaskError
    naming no file: UnicodeEncodeError in the manifest writer)."""
    src, out = tmp_path / "in", tmp_path / "out"
    photo(src / "good.png", 1)
    photo(src / NOT_UTF8, 2)
    (src / os.fsdecode(b"broken\xff.png")).write_bytes(b"not an image")
    status, output = denoise(src, out, "--model", checkpoint)
    assert status == 1, output  # the broken one failed, by its name shown readably
    assert "2 done" in output and "failed broken\\xff.png: " in output, output
    assert (out / NOT_UTF8).is_file() and os.fsencode(NOT_UTF8) in os.listdir(os.fsencode(out))
    records = read_manifest(out / "_manifest.jsonl")
    assert records[NOT_UTF8]["status"] == "done" and records[NOT_UTF8]["output"] == NOT_UTF8
    status, output = denoise(src, out, "--model", checkpoint)
    assert status == 1 and "2 skipped" in output, output
    # into Parquet, whose keys are text: that input fails by name, the others are written
    status, output = denoise(src, tmp_path / "out.parquet", "--model", checkpoint)
    assert status == 1 and "1 done" in output and "failed bad\\xff\\xfeutf8.png: " in output, output
    assert "UTF-8" in output
