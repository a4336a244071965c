"""`n2n train` tried as a careless user would (issue 34, rows 2, 5 and 10): it writes only
into a folder that is new, empty or its own run, and every usage problem is exit 2 with
one line, found before anything is created."""
from __future__ import annotations

import re
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from pipeline.cli import main
MARKER = "n2n-run.json"  # pipeline.training.run_dir.MARKER
from train_support import make_images

TINY = ["--arch-arg", "depth=2", "--arch-arg", "width=8", "--steps", "2", "--batch-size", "2", "--crop-size", "8",
        "--checkpoint-every", "1", "--validate-every", "1", "--validation-images", "1", "--validation-size", "16",
        "--no-progress"]


def train(*args, ray: bool = False):
    result = CliRunner().invoke(main, ["train", *TINY, *map(str, args), *([] if ray else ["--no-ray"])])
    assert "Traceback" not in result.output, result.output
    return result.exit_code, result.output


RAY_LOG = re.compile(r"^\d{4}-\d\d-\d\d [\d:,]+\s+(INFO|WARNING) ")  # Ray's own log lines (token authentication...)


def one_error_line(output: str) -> str:
    lines = [line for line in output.splitlines()
             if line.strip() and not line.startswith(("n2n: started", "n2n: Ray's logs")) and not RAY_LOG.match(line)]
    assert len(lines) == 1 and lines[0].startswith("Error: "), output
    return lines[0]


def snapshot(folder: Path) -> dict:
    return {str(p.relative_to(folder)): (p.read_bytes(), p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def imgs(tmp_path_factory):
    return make_images(tmp_path_factory.mktemp("imgs"), count=3, size=24)


def test_a_folder_of_someone_elses_files_is_never_a_run_folder(imgs, tmp_path):
    """Row 2: an --out holding the user's model.n2n, metrics.jsonl and training.png (no
    checkpoints/) was trained into, all three replaced; --out photos --data photos turned
    a photo named training.png into the loss plot and then trained on it."""
    mine = tmp_path / "dir"
    mine.mkdir()
    for name, data in (("model.n2n", b"my model"), ("metrics.jsonl", b'{"mine": 1}\n'), ("training.png", b"png")):
        (mine / name).write_bytes(data)
    before = snapshot(mine)
    status, output = train("--data", imgs, "--out", mine)
    assert status == 2 and "no n2n run" in one_error_line(output) and "--out" in output, output
    assert snapshot(mine) == before

    photos = make_images(tmp_path / "photos", count=3, size=24)
    (photos / "img0.png").rename(photos / "training.png")
    before = snapshot(photos)
    status, output = train("--data", photos, "--out", photos)
    assert status == 2, output
    one_error_line(output)
    assert snapshot(photos) == before
    status, output = train("--data", photos, "--out", photos / "run")  # OUT inside DATA: read as data later
    assert status == 2 and "inside" in one_error_line(output), output
    assert snapshot(photos) == before and not (photos / "run").exists()


def test_a_run_folder_is_n2ns_by_its_marker_and_a_rerun_resumes_it(imgs, tmp_path):
    out = tmp_path / "run"
    assert train("--data", imgs, "--out", out)[0] == 0
    assert (out / MARKER).is_file() and (out / "model.n2n").is_file()
    status, output = train("--data", imgs, "--out", out)  # without --resume: its checkpoints are kept
    assert status == 2 and "--resume" in one_error_line(output), output
    status, output = train("--data", imgs, "--out", out, "--resume", "--steps", "3")
    assert status == 0, output
    # a run of an older n2n (checkpoints/, no marker) is still recognized and resumed
    (out / MARKER).unlink()
    status, output = train("--data", imgs, "--out", out, "--resume", "--steps", "4")
    assert status == 0 and (out / MARKER).is_file(), output
    empty = tmp_path / "empty"
    empty.mkdir()
    assert train("--data", imgs, "--out", empty)[0] == 0  # an empty folder is fine too


def _usage_case(case: str, imgs: Path, tmp_path: Path) -> tuple[list, str]:
    if case == "missing":
        return ["--data", tmp_path / "missing"], "missing"
    if case == "empty":
        empty = tmp_path / "empty-data"
        empty.mkdir()
        (empty / "notes.txt").write_text("no images")
        return ["--data", empty], "no images"
    if case == "no-image-column":
        pq.write_table(pa.table({"path": ["a.png"], "pixels": [b"x"]}), tmp_path / "no-image-column.parquet")
        return ["--data", tmp_path / "no-image-column.parquet"], "image"
    if case == "corrupt-init-from":
        (tmp_path / "corrupt.n2n").write_bytes(b"not a checkpoint")
        return ["--data", imgs, "--init-from", tmp_path / "corrupt.n2n"], "corrupt.n2n"
    if case == "holdout-all":
        return ["--data", imgs, "--holdout", "3"], "--holdout"
    return ["--data", imgs, "--crop-size", "3"], "--crop-size"


@pytest.mark.parametrize("case", ["missing", "empty", "no-image-column", "corrupt-init-from", "holdout-all",
                                  "crop-3"])
def test_usage_problems_are_exit_2_before_anything_is_created(case, imgs, tmp_path):
    """Row 10: these exited 1 and left OUT/checkpoints/ behind; --crop-size 3 was refused
    only once training had started."""
    args, words = _usage_case(case, imgs, tmp_path)
    out = tmp_path / "out"
    status, output = train(*args, "--out", out)
    assert status == 2, (args, output)
    assert words in one_error_line(output), (args, output)
    assert not out.exists(), args


def test_resuming_with_another_architecture_is_refused_before_anything_changes(imgs, tmp_path):
    out = tmp_path / "run"
    assert train("--data", imgs, "--out", out)[0] == 0
    before = snapshot(out)
    status, output = train("--data", imgs, "--out", out, "--resume", "--arch-arg", "width=16", "--steps", "4")
    assert status == 2 and "width" in one_error_line(output), output
    assert snapshot(out) == before


def test_a_private_ray_that_cannot_hold_the_workers_is_a_usage_error_at_once(imgs, tmp_path):
    """Row 5: on a private Ray (it can never grow) the run waited the whole --start-timeout."""
    import time

    started = time.monotonic()
    status, output = train("--data", imgs, "--out", tmp_path / "run", "--workers", "2", "--cpus-per-worker", "512",
                           "--address", "local", "--start-timeout", "900", ray=True)
    assert status == 2, output
    line = one_error_line(output)
    assert "private Ray" in line and "CPUs" in line and "GPUs" in line and "--workers" in line, output
    assert time.monotonic() - started < 120
    import ray

    assert not ray.is_initialized()
