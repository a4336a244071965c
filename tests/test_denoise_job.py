"""The bulk denoising job end to end on a small local Ray: mirrored outputs equal to
single-image inference, bad files listed, Parquet in and out, refused paths, resume."""
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from n2n_core import load_checkpoint
from pipeline.errors import UsageError
from pipeline.data.images import decode_image, encode_image
from pipeline.inference import DenoiseConfig, denoise_image, run_denoise
from pipeline.inference import read_manifest
from tests.denoise_helpers import checkpoint  # noqa: F401 (fixture)
from tests.denoise_helpers import make_image, make_tree, pixel_bomb_png, plant_bad_files
from ray_support import kill_session, ray_cluster  # noqa: F401 (fixture)

ROOT = Path(__file__).resolve().parents[1]


def expected_pixels(model, data: bytes, name: str, tile, overlap, self_ensemble=False, strength=1.0):
    """Single-image inference: decode, denoise_image, encode, decode again."""
    decoded = decode_image(data, name)
    out = denoise_image(model, decoded.pixels, tile=tile, overlap=overlap, self_ensemble=self_ensemble,
                        strength=strength)
    return decode_image(encode_image(decoded, out), name)


def assert_same_image(actual, expected, name):
    assert actual.format == expected.format and actual.mode == expected.mode, name
    assert actual.bit_depth == expected.bit_depth, name
    assert actual.pixels.shape == expected.pixels.shape, name
    # Float differences between thread counts may flip a rounding: allow one level (JPEG: two).
    tol = (2.5 if expected.format == "JPEG" else 1.01) / (255 if expected.bit_depth == 8 else 65535)
    diff = (actual.pixels - expected.pixels).abs().max().item()
    assert diff <= tol, f"{name}: max difference {diff} > {tol}"
    if expected.alpha is not None:
        torch.testing.assert_close(actual.alpha, expected.alpha, atol=1e-6, rtol=0)
    else:
        assert actual.alpha is None, name


def statuses(manifest_path):
    return {k: r["status"] for k, r in read_manifest(manifest_path).items()}


@pytest.mark.slow
def test_folder_tree_mirrored_bad_files_listed(tmp_path, ray_cluster, checkpoint):
    src, out = tmp_path / "in", tmp_path / "out"
    good = make_tree(src, 240, max_side=72)
    good += [f"big/{k}" for k in make_tree(src / "big", 2, seed=1, min_side=300, max_side=340)]  # tiled
    bad = plant_bad_files(src)
    config = DenoiseConfig(input=str(src), output=str(out), model=str(checkpoint), tile=128, overlap=32,
                           workers=2, batch_size=8, compare=3, progress=False)
    summary = run_denoise(config)
    assert (summary.total, summary.done, summary.failed, summary.skipped) == (len(good) + len(bad), len(good), len(bad), 0)
    manifest = read_manifest(out / "_manifest.jsonl")
    assert {k for k, r in manifest.items() if r["status"] == "failed"} == set(bad)
    assert all(r["reason"] for k, r in manifest.items() if k in bad)
    assert {k for k, r in manifest.items() if r["status"] == "done"} == set(good)
    model = load_checkpoint(checkpoint).model
    for key in good:
        data = (src / key).read_bytes()
        actual = decode_image((out / key).read_bytes(), key)
        assert_same_image(actual, expected_pixels(model, data, key, 128, 32), key)
    assert not any(p.name.endswith(".tmp") for p in out.rglob("*")) and not (out / "_n2n_tmp").exists()
    assert not any((out / k).exists() for k in bad)
    strips = list((out / "_compare").glob("*.png"))
    assert len(strips) == 3 and all(Image.open(s).mode == "RGB" for s in strips)


def test_self_ensemble_and_strength_reach_the_workers(tmp_path, ray_cluster, checkpoint):
    src, out = tmp_path / "in", tmp_path / "out"
    keys = make_tree(src, 3, max_side=60) + [f"big/{k}" for k in make_tree(src / "big", 1, seed=2, min_side=150, max_side=170)]
    config = DenoiseConfig(input=str(src), output=str(out), model=str(checkpoint), tile=64, overlap=32,
                           self_ensemble=True, strength=0.4, workers=1, progress=False)
    summary = run_denoise(config)
    assert summary.done == len(keys) and summary.failed == 0
    model = load_checkpoint(checkpoint).model
    not_ensembled = not_blended = 0
    for key in keys:
        data = (src / key).read_bytes()
        actual = decode_image((out / key).read_bytes(), key)
        assert_same_image(actual, expected_pixels(model, data, key, 64, 32, self_ensemble=True, strength=0.4), key)
        plain = expected_pixels(model, data, key, 64, 32, strength=0.4)
        not_ensembled += int((actual.pixels - plain.pixels).abs().max() > 1.5 / 255)
        full = expected_pixels(model, data, key, 64, 32, self_ensemble=True)
        not_blended += int((actual.pixels - full.pixels).abs().max() > 1.5 / 255)
    # the untrained model is not rotation-invariant, and its correction is far from zero: both show
    assert not_ensembled == len(keys) and not_blended == len(keys)


@pytest.mark.parametrize("strength", [-0.1, 1.5, float("nan"), "0.5", True])
def test_strength_outside_0_to_1_is_refused(tmp_path, strength):
    with pytest.raises(UsageError, match=r"--strength must be a number from 0 to 1"):
        DenoiseConfig(input=str(tmp_path), output=str(tmp_path / "out"), strength=strength)


def test_rerun_skips_done_and_overwrite_redoes(tmp_path, ray_cluster, checkpoint):
    src, out = tmp_path / "in", tmp_path / "out"
    keys = make_tree(src, 12)
    first = run_denoise(DenoiseConfig(str(src), str(out), model=str(checkpoint), workers=1, progress=False))
    assert first.done == 12
    mtimes = {k: (out / k).stat().st_mtime_ns for k in keys}
    (out / keys[0]).unlink()  # a lost output is redone
    second = run_denoise(DenoiseConfig(str(src), str(out), model=str(checkpoint), workers=1, progress=False))
    assert (second.done, second.skipped, second.failed) == (1, 11, 0)
    assert all((out / k).stat().st_mtime_ns == mtimes[k] for k in keys[1:])
    third = run_denoise(DenoiseConfig(str(src), str(out), model=str(checkpoint), workers=1, overwrite=True,
                                      progress=False))
    assert (third.done, third.skipped) == (12, 0)
    assert all((out / k).stat().st_mtime_ns != mtimes[k] for k in keys[1:])


BAD_ROWS = {"p/bad.png", "p/empty.png", "p/truncated.png", "p/bomb.png", "p/null.png"}


def parquet_table(tmp_path):
    rng = np.random.default_rng(3)
    rows = []
    for i in range(16):
        fmt, mode = [("PNG", "RGB"), ("JPEG", "L"), ("TIFF", "RGBA"), ("PNG", "I;16")][i % 4]
        rows.append({"path": f"p/{i:02d}.{fmt.lower()}", "image": make_image(rng, fmt, mode, 20 + i, 30),
                     "label": i, "note": f"row {i}", "score": float(i) / 3})
    rows.append({"path": "p/bad.png", "image": b"not an image", "label": 99, "note": "bad", "score": 0.0})
    good = rows[0]["image"]
    for i, (key, data) in enumerate([("p/empty.png", b""), ("p/truncated.png", good[: len(good) // 2]),
                                     ("p/bomb.png", pixel_bomb_png()), ("p/null.png", None)]):
        rows.append({"path": key, "image": data, "label": 90 + i, "note": "bad", "score": 0.0})
    rows.append({"path": "../escape.png", "image": rows[0]["image"], "label": 100, "note": "up", "score": 0.0})
    rows.append({"path": "/abs/escape.png", "image": rows[0]["image"], "label": 101, "note": "abs", "score": 0.0})
    table = pa.Table.from_pylist(rows, schema=pa.schema([
        ("path", pa.string()), ("image", pa.binary()), ("label", pa.int64()), ("note", pa.string()),
        ("score", pa.float64())]))
    path = tmp_path / "table.parquet"
    pq.write_table(table, path, row_group_size=5)
    return path, table


@pytest.mark.slow
def test_parquet_in_parquet_out_keeps_columns(tmp_path, ray_cluster, checkpoint):
    path, table = parquet_table(tmp_path)
    out = tmp_path / "out.parquet"
    summary = run_denoise(DenoiseConfig(str(path), str(out), model=str(checkpoint), workers=2, batch_size=3,
                                        progress=False))
    assert (summary.done, summary.failed) == (18, len(BAD_ROWS))  # escaping keys are plain keys in Parquet output
    assert dict(summary.failures).keys() == BAD_ROWS and all(dict(summary.failures).values())
    result = pq.read_table(out)
    assert result.num_rows == 18 and result.column_names == table.column_names + ["denoised"]
    assert result.schema.remove(result.schema.get_field_index("denoised")) == table.schema
    model = load_checkpoint(checkpoint).model
    by_key = {r["path"]: r for r in table.to_pylist()}
    for row in result.to_pylist():
        original = by_key[row["path"]]
        assert {k: row[k] for k in original} == original  # other columns untouched
        expected = expected_pixels(model, original["image"], row["path"], 512, 32)
        assert_same_image(decode_image(row["denoised"], row["path"]), expected, row["path"])
    # A batch Ray ran twice (its first actor died after the rename): both parts are named by
    # manifest lines, the later lines win, and the part no finished row uses is deleted.
    first = next(out.glob("part-*.parquet"))
    again = out / "part-0123456789abcdef0123456789abcdef.parquet"
    shutil.copy(first, again)
    rows_of_first = [k for k, r in read_manifest(out / "_manifest.jsonl").items() if r["output"] == first.name]
    with open(out / "_manifest.jsonl", "a") as manifest:
        for key in rows_of_first:
            manifest.write(json.dumps({"key": key, "status": "done", "output": again.name}) + "\n")
    foreign = out / "part-00000-from-spark.parquet"  # not n2n's, named by no line: never deleted
    shutil.copy(first, foreign)
    rerun = run_denoise(DenoiseConfig(str(path), str(out), model=str(checkpoint), workers=1, progress=False))
    assert (rerun.done, rerun.skipped, rerun.failed) == (0, 18, len(BAD_ROWS))
    assert not first.exists() and again.exists() and foreign.exists()
    foreign.unlink()
    assert pq.read_table(out).num_rows == 18


def test_parquet_to_folder_refuses_escaping_paths(tmp_path, ray_cluster, checkpoint):
    path, table = parquet_table(tmp_path)
    out = tmp_path / "nested" / "out"
    summary = run_denoise(DenoiseConfig(str(path), str(out), model=str(checkpoint), workers=1, progress=False))
    failures = dict(summary.failures)
    assert set(failures) == BAD_ROWS | {"../escape.png", "/abs/escape.png"}
    assert "refused" in failures["../escape.png"] and "refused" in failures["/abs/escape.png"]
    assert not (tmp_path / "nested" / "escape.png").exists() and not Path("/abs/escape.png").exists()
    assert summary.done == 16 and all((out / f"p/{i:02d}.{f}").is_file() for i, f in
                                      zip(range(16), ["png", "jpeg", "tiff", "png"] * 4))


def test_cli_exit_code_and_summary(tmp_path, checkpoint):
    src, out = tmp_path / "in", tmp_path / "out"
    make_tree(src, 3)
    (src / "broken.png").write_bytes(b"")
    result = subprocess.run(
        [sys.executable, "-m", "pipeline.cli", "denoise", str(src), str(out), "--model", str(checkpoint),
         "--workers", "1", "--no-progress", "--address", "local"],
        cwd=ROOT, capture_output=True, text=True, timeout=180, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert result.returncode == 1, result.stderr[-2000:]
    assert "3 done" in result.stdout and "1 failed" in result.stdout and "broken.png" in result.stdout


def landed_outputs(out) -> dict[str, tuple[bytes, int]]:
    """Every output file at its final name under out (not the manifest or staging): bytes, mtime."""
    found = {}
    for path in out.rglob("*"):
        relative = path.relative_to(out).as_posix()
        if path.is_file() and not relative.startswith(("_manifest", "_n2n_tmp", "_compare")):
            found[relative] = (path.read_bytes(), path.stat().st_mtime_ns)
    return found


def landed_rows(out) -> int:
    """Rows in the Parquet parts at their final names."""
    return sum(pq.read_metadata(p).num_rows for p in out.glob("part-*.parquet"))


def kill_after(source, out, checkpoint, landed, count: int, workers: int = 2, batch_size: int = 2):
    """Run `n2n denoise source out` in a subprocess and kill -9 its whole session (the driver,
    the Ray it started and that Ray's workers) once `landed(out)` reaches `count` outputs."""
    process = subprocess.Popen(
        [sys.executable, "-m", "pipeline.cli", "denoise", str(source), str(out), "--model", str(checkpoint),
         "--workers", str(workers), "--batch-size", str(batch_size), "--no-progress", "--address", "local"],
        cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, start_new_session=True,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 150
    try:
        while time.monotonic() < deadline:
            try:
                if out.exists() and landed(out) >= count:
                    break
            except (OSError, pa.ArrowInvalid):
                pass  # a part renamed in while we looked
            assert process.poll() is None, "the job ended before it could be interrupted"
            time.sleep(0.02)
        else:
            pytest.fail(f"the job did not land {count} outputs in time")
    finally:
        kill_session(process)  # the driver, the Ray it started and its workers


@pytest.mark.slow
def test_killed_run_resumes_without_redoing_any_landed_output(tmp_path, ray_cluster, checkpoint):
    """kill -9 of the job's process group after at least 5 outputs landed (2 actors, 2 images
    per call): the rerun redoes none of them, and each keeps its bytes and mtime."""
    src, out = tmp_path / "in", tmp_path / "out"
    keys = make_tree(src, 60, min_side=150, max_side=200)
    kill_after(src, out, checkpoint, lambda o: len(landed_outputs(o)), 5)
    before = landed_outputs(out)
    assert 5 <= len(before) < len(keys)
    logged = {k for k, s in statuses(out / "_manifest.jsonl").items() if s == "done"}  # main file and shards
    assert set(before) <= logged  # the manifest kept up: every landed output has its line
    assert len(logged - set(before)) <= 2  # at most the image each of the 2 actors was renaming
    summary = run_denoise(DenoiseConfig(str(src), str(out), model=str(checkpoint), workers=2, progress=False))
    assert summary.failed == 0 and summary.skipped == len(before)  # every landed output was accepted as done
    assert summary.done == len(keys) - len(before)  # only what had not landed is processed
    assert all(landed_outputs(out)[k] == before[k] for k in before)  # same bytes, same mtime
    assert all(decode_image((out / k).read_bytes(), k).pixels.numel() > 0 for k in keys)
    assert set(landed_outputs(out)) == set(keys) and not (out / "_n2n_tmp").exists()
    assert {k for k, s in statuses(out / "_manifest.jsonl").items() if s in ("done", "skipped")} == set(keys)


@pytest.mark.slow
def test_killed_parquet_run_resumes_without_duplicate_or_lost_rows(tmp_path, ray_cluster, checkpoint):
    rng = np.random.default_rng(3)
    rows = [{"path": f"r/{i:02d}.png", "image": make_image(rng, "PNG", "RGB", 150 + i, 190), "label": i}
            for i in range(60)]
    source = tmp_path / "table"  # a folder of ten files: Ray Data streams them as separate blocks
    source.mkdir()
    for part in range(10):
        pq.write_table(pa.Table.from_pylist(rows[part * 6:(part + 1) * 6]), source / f"part-{part}.parquet")
    out = tmp_path / "out.parquet"
    kill_after(source, out, checkpoint, landed_rows, 5)
    parts_before = landed_outputs(out)
    rows_before = landed_rows(out)
    assert 5 <= rows_before < len(rows)
    logged = {k for k, s in statuses(out / "_manifest.jsonl").items() if s == "done"}  # main file and shards
    landed_keys = set(pq.read_table([str(out / name) for name in parts_before]).column("path").to_pylist())
    assert landed_keys <= logged and len(logged - landed_keys) <= 2 * 2  # one batch per actor in flight
    summary = run_denoise(DenoiseConfig(str(source), str(out), model=str(checkpoint), workers=2, progress=False))
    assert summary.failed == 0 and summary.skipped == rows_before  # every landed row accepted as done
    assert summary.done == len(rows) - rows_before
    result = pq.read_table(out).to_pylist()
    assert sorted(r["path"] for r in result) == [r["path"] for r in rows]  # every row once: none lost, none twice
    assert all(landed_outputs(out)[name] == parts_before[name] for name in parts_before)  # not rewritten
    model = load_checkpoint(checkpoint).model
    by_key = {r["path"]: r for r in rows}
    for row in result[::7]:
        assert row["label"] == by_key[row["path"]]["label"]
        expected = expected_pixels(model, by_key[row["path"]]["image"], row["path"], 512, 32)
        assert_same_image(decode_image(row["denoised"], row["path"]), expected, row["path"])
    assert not any(p.name.endswith(".tmp") for p in out.rglob("*")) and not (out / "_n2n_tmp").exists()


def test_without_model_the_default_model_is_used(tmp_path, ray_cluster, checkpoint, monkeypatch):
    import pipeline.assets

    monkeypatch.setattr(pipeline.assets, "default_model_path", lambda: checkpoint)
    src, out = tmp_path / "in", tmp_path / "out"
    keys = make_tree(src, 2)
    summary = run_denoise(DenoiseConfig(str(src), str(out), workers=1, progress=False))
    assert summary.done == 2
    model = load_checkpoint(checkpoint).model
    for key in keys:
        data = (src / key).read_bytes()
        assert_same_image(decode_image((out / key).read_bytes(), key), expected_pixels(model, data, key, 512, 32), key)


def test_a_straggler_cannot_publish_after_a_rerun_fenced_its_staging(tmp_path):
    """An actor of a killed run works on for seconds; a rerun's start fences it off."""
    from pipeline.inference.outputs import create_staging, fence_staging, open_staging, write_file, write_part

    create_staging(tmp_path, "killed-run")
    staging = open_staging(tmp_path, "killed-run")
    write_file(tmp_path, "a.png", b"first", staging)
    assert (tmp_path / "a.png").read_bytes() == b"first"
    fence_staging(tmp_path)  # what a rerun does first
    with pytest.raises(FileNotFoundError):
        write_file(tmp_path, "b.png", b"late", staging)
    with pytest.raises(FileNotFoundError):
        write_part(tmp_path, pa.table({"x": [1]}), staging)
    with pytest.raises(FileNotFoundError):
        open_staging(tmp_path, "killed-run")  # an actor starting late cannot start at all
    # staged before the fence, renamed after it: the rename fails, nothing lands
    create_staging(tmp_path, "second-run")
    with pytest.raises(FileNotFoundError):
        write_file(tmp_path, "c.png", b"staged", open_staging(tmp_path, "second-run"),
                   before_publish=lambda record: fence_staging(tmp_path))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["_n2n_tmp", "a.png"]
