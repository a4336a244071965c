"""The bulk job never loses a user's data: what it refuses before starting, the inputs it
fails by name, what it never writes through or over, and a full disk.

Each case of docs/safety.md's table has its test here (or in the data / checkpoint /
listing tests named there)."""
import os
import re
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner
from PIL import Image

from pipeline.cli import main
from pipeline.errors import UsageError
from pipeline.inference import DenoiseConfig, run_denoise
from pipeline.inference import read_manifest
from ray_support import ray_cluster  # noqa: F401 (fixture)
from tests.denoise_helpers import checkpoint  # noqa: F401 (fixture)
from tests.denoise_helpers import make_image, make_tree, run_in_private_mount

ROOT = Path(__file__).resolve().parents[1]


def snapshot(folder: Path) -> dict:
    """Every file under folder: (bytes, mtime); links as their targets."""
    found = {}
    for path in sorted(folder.rglob("*")):
        if path.is_symlink():
            found[str(path.relative_to(folder))] = ("link", os.readlink(path))
        elif path.is_file():
            found[str(path.relative_to(folder))] = (path.read_bytes(), path.stat().st_mtime_ns)
    return found


def refused(config: DenoiseConfig, match: str) -> str:
    with pytest.raises(UsageError, match=match) as info:
        run_denoise(config)
    return str(info.value)


def cli(*args, env=None):
    """`n2n ARGS` in this process; (exit status, stdout and stderr)."""
    result = CliRunner().invoke(main, list(args), env=env)
    return result.exit_code, result.output


def assert_one_line_error(output: str, *fragments: str) -> None:
    lines = [line for line in output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error: "), output
    assert "Traceback" not in output
    for fragment in fragments:
        assert fragment in lines[0], output


# -- refused before anything is created or deleted -------------------------------------------
def test_out_equal_to_in_is_refused_however_spelled(tmp_path, checkpoint, monkeypatch):
    src = tmp_path / "photos"
    make_tree(src, 3)
    (tmp_path / "link").symlink_to(src)
    before = snapshot(src)
    monkeypatch.chdir(tmp_path)
    for out in (str(src), f"{src}/.", "./photos", "photos/../photos", str(tmp_path / "link"), f"file://{src}"):
        refused(DenoiseConfig(str(src), out, model=str(checkpoint)), "is IN .* the outputs would replace the originals")
    assert snapshot(src) == before


def test_parquet_out_equal_to_in_and_foreign_parquet_folders_are_refused(tmp_path, checkpoint):
    """`n2n denoise photos.parquet photos.parquet` and `n2n denoise imgs/ other.parquet` used to
    delete every part file; now nothing is touched, --overwrite or not."""
    photos = tmp_path / "photos.parquet"
    photos.mkdir()
    rng = np.random.default_rng(0)
    for i in range(2):
        pq.write_table(pa.table({"path": [f"{i}.png"], "image": [make_image(rng, "PNG", "RGB", 16, 16)]}),
                       photos / f"part-{i:05d}-3f2a.snappy.parquet")
    other = tmp_path / "other.parquet"  # a Spark-style dataset: parts and a marker, no n2n manifest
    other.mkdir()
    pq.write_table(pa.table({"x": [1, 2]}), other / "part-00000-a1b2c3d4-c000.snappy.parquet")
    (other / "_SUCCESS").write_bytes(b"")
    imgs = tmp_path / "imgs"
    make_tree(imgs, 2)
    before = snapshot(tmp_path)
    for overwrite in (False, True):
        refused(DenoiseConfig(str(photos), str(photos), model=str(checkpoint), overwrite=overwrite), "is IN")
        message = refused(DenoiseConfig(str(imgs), str(other), model=str(checkpoint), overwrite=overwrite),
                          "is not empty and holds no n2n manifest")
        assert "--overwrite is no way around this" in message
    assert snapshot(tmp_path) == before


def test_out_inside_in_and_in_inside_out_are_refused(tmp_path, checkpoint):
    src = tmp_path / "photos"
    make_tree(src, 2)
    refused(DenoiseConfig(str(src), str(src / "denoised"), model=str(checkpoint)), "is inside IN")
    assert not (src / "denoised").exists()
    refused(DenoiseConfig(str(src / "a"), str(src), model=str(checkpoint)), "IN .* is inside OUT")


def test_missing_in_is_refused_and_out_not_created(tmp_path, checkpoint):
    out = tmp_path / "out"
    refused(DenoiseConfig(str(tmp_path / "nope"), str(out), model=str(checkpoint)), "no such file or folder")
    assert not out.exists()
    status, output = cli("denoise", str(tmp_path / "nope"), str(out), "--model", str(checkpoint))
    assert status == 2 and not out.exists()
    assert_one_line_error(output, "IN", "nope", "no such file or folder")


def test_out_that_is_a_file_or_unwritable_is_refused(tmp_path, checkpoint):
    src = tmp_path / "in"
    make_tree(src, 2)
    (tmp_path / "file").write_bytes(b"mine")
    refused(DenoiseConfig(str(src), str(tmp_path / "file"), model=str(checkpoint)), "exists and is not a folder")
    assert (tmp_path / "file").read_bytes() == b"mine"
    # a read-only file system (a mount of this test's own): OUT cannot be created there
    result = run_in_private_mount(
        f"mkdir {tmp_path}/ro && mount -t tmpfs -o ro,size=1m tmpfs {tmp_path}/ro && "
        f"{sys.executable} -m pipeline.cli denoise {src} {tmp_path}/ro/out --model {checkpoint}", cwd=ROOT)
    assert result.returncode == 2, result.stdout + result.stderr
    assert_one_line_error(result.stderr, f"{tmp_path}/ro/out", "cannot be created", "not writable")


def test_bad_option_values_are_refused_not_coerced(tmp_path, checkpoint):
    src = tmp_path / "in"
    make_tree(src, 1)
    for field, value, option in [("workers", 0, "--workers"), ("workers", -2, "--workers"),
                                 ("batch_size", 0, "--batch-size"), ("batch_size", -1, "--batch-size"),
                                 ("tile", -256, "--tile"), ("overlap", -8, "--overlap"), ("compare", -1, "--compare")]:
        with pytest.raises(UsageError, match=option):
            DenoiseConfig(str(src), str(tmp_path / "out"), **{field: value})
        status, output = cli("denoise", str(src), str(tmp_path / "out"), option, str(value))
        assert status == 2 and option in output and "Traceback" not in output, output
    assert not (tmp_path / "out").exists()


def test_unusable_model_files_are_one_line_errors_naming_them(tmp_path):
    src = tmp_path / "in"
    make_tree(src, 1)
    (tmp_path / "garbage.n2n").write_bytes(b"\x07" * 64)
    for model, fragment in (("/dev/zero", "not a regular file"), (str(tmp_path / "garbage.n2n"), "not a checkpoint"),
                            (str(tmp_path / "missing.n2n"), "cannot read file")):
        status, output = cli("denoise", str(src), str(tmp_path / "out"), "--model", model)
        assert status == 2, output
        assert_one_line_error(output, "--model", model, fragment)
    assert not (tmp_path / "out").exists()


def test_parquet_with_a_non_binary_image_column_is_refused(tmp_path, checkpoint):
    table = tmp_path / "t.parquet"
    pq.write_table(pa.table({"path": ["a.png"], "image": ["not bytes but text"]}), table)
    status, output = cli("denoise", str(table), str(tmp_path / "out"), "--model", str(checkpoint))
    assert status == 2
    assert_one_line_error(output, "image column 'image' has type string", "--image-column")
    pq.write_table(pa.table({"path": [1.5], "image": [b"x"]}), table)
    refused(DenoiseConfig(str(table), str(tmp_path / "out"), model=str(checkpoint)), "keys must be strings or integers")
    refused(DenoiseConfig(str(table), str(tmp_path / "out"), model=str(checkpoint), key_column="image"),
            "--key-column and --image-column are both 'image'")
    assert not (tmp_path / "out").exists()


def test_a_second_run_on_the_same_out_is_refused(tmp_path, checkpoint):
    import fcntl

    src, out = tmp_path / "in", tmp_path / "out"
    make_tree(src, 1)
    out.mkdir()
    with open(out / "_manifest.jsonl", "a") as held:  # the lock a running job holds
        fcntl.flock(held, fcntl.LOCK_EX)
        refused(DenoiseConfig(str(src), str(out), model=str(checkpoint)), "another n2n run is writing it")


def test_debug_shows_the_traceback(tmp_path, checkpoint):
    args = ["denoise", str(tmp_path / "nope"), str(tmp_path / "out"), "--model", str(checkpoint)]
    for extra, env in ((["--debug"], None), ([], {"N2N_DEBUG": "1"})):
        result = CliRunner().invoke(main, args + extra, env=env)
        assert isinstance(result.exception, UsageError) and "no such file" in str(result.exception)


def test_unexpected_errors_are_one_line_too():
    import click

    from pipeline.commands.friendly_errors import FriendlyCommand

    @click.command(cls=FriendlyCommand)
    def broken():
        raise RuntimeError("the Ray cluster has no GPU\nand a second line")

    result = CliRunner().invoke(broken, [])
    assert result.exit_code == 1
    assert_one_line_error(result.output, "RuntimeError: the Ray cluster has no GPU", "N2N_DEBUG=1")


def test_unknown_arch_and_bad_arch_args_of_train_are_one_line_usage_errors(tmp_path):
    src = tmp_path / "in"
    make_tree(src, 2)
    base = ["train", "--data", str(src), "--out", str(tmp_path / "run"), "--no-ray", "--steps", "1"]
    for args, fragment in ((["--arch", "resnet"], "unknown architecture 'resnet'"),
                           (["--arch-arg", "depth=three"], "depth must be an int"),
                           (["--arch-arg", "colour=3"], "unknown arguments ['colour']"),
                           (["--arch-arg", "width=6000"], "more than 1,000,000,000 parameters"),
                           (["--arch-arg", "depth"], "expected KEY=VALUE"),
                           (["--noise", "gaussian:inf"], "noise: bad noise spec 'gaussian:inf'"),
                           (["--noise", "gaussian:-5"], "noise: bad noise spec 'gaussian:-5'")):
        status, output = cli(*base, *args)
        assert status == 2 and fragment in output and "Traceback" not in output, output
    assert not (tmp_path / "run").exists()


# -- inputs failed by name, never written through or over -------------------------------------
def hostile_table(path: Path) -> dict:
    """A Parquet table of good rows and hostile keys; returns {key: image bytes} of the good ones."""
    rng = np.random.default_rng(5)
    good = {f"ok/{i}.png": make_image(rng, "PNG", "RGB", 24, 24) for i in range(3)}
    frames = [Image.fromarray((np.random.default_rng(i).random((16, 16, 3)) * 255).astype(np.uint8)) for i in range(3)]
    animated = __import__("io").BytesIO()
    frames[0].save(animated, format="GIF", save_all=True, append_images=frames[1:])
    image = good["ok/0.png"]
    rows = [(k, v) for k, v in good.items()] + [
        ("x/y.png", image), ("x/./y.png", image), ("x//y.png", image),  # alias after normalisation
        ("dup.png", image), ("dup.png", b"a bad second blob"),  # the same key twice
        (None, image),  # a null key
        ("link/escape.png", image),  # OUT/link is a symlink to a folder outside OUT
        ("taken.png", image),  # OUT/taken.png is someone else's file
        ("anim.gif", animated.getvalue()),  # three frames
    ]
    pq.write_table(pa.table({"path": pa.array([k for k, _ in rows], pa.string()),
                             "image": pa.array([v for _, v in rows], pa.binary())}), path)
    return good


def test_hostile_keys_fail_by_name_and_nothing_is_written_outside_or_over(tmp_path, ray_cluster, checkpoint):
    table, out, outside = tmp_path / "t.parquet", tmp_path / "out", tmp_path / "outside"
    good = hostile_table(table)
    out.mkdir()
    outside.mkdir()
    (out / "_manifest.jsonl").write_bytes(b"")  # an n2n OUT (an earlier run's) ...
    (out / "taken.png").write_bytes(b"someone's own file")  # ... into which a user put a file
    (out / "link").symlink_to(outside)
    summary = run_denoise(DenoiseConfig(str(table), str(out), model=str(checkpoint), workers=1, progress=False))
    failures = dict(summary.failures)
    assert summary.done == len(good) and all((out / k).is_file() for k in good)
    for key in ("x/y.png", "x/./y.png", "x//y.png"):
        assert "the same output 'x/y.png'" in failures[key] and "none of them is written" in failures[key]
    assert not (out / "x").exists()
    assert "appears on 2 rows (6, 7)" in failures["dup.png"] and not (out / "dup.png").exists()
    null = [k for k in failures if "null key" in k]
    assert len(null) == 1 and "row 8 (null key" in null[0] and not (out / "None").exists() and not (out / "").is_file()
    assert "'link' is a symbolic link" in failures["link/escape.png"] and not any(outside.iterdir())
    assert "was not written by n2n" in failures["taken.png"]
    assert (out / "taken.png").read_bytes() == b"someone's own file"
    assert "animated GIF with 3 frames" in failures["anim.gif"] and not (out / "anim.gif").exists()
    assert summary.failed == len(failures) + 1 == 9 and summary.total == len(good) + 9  # dup.png: 2 rows
    manifest = read_manifest(out / "_manifest.jsonl")
    assert {k for k, r in manifest.items() if r["status"] == "failed"} == set(failures)
    # --overwrite redoes n2n's own outputs only: someone's file and the link stay as they are
    again = run_denoise(DenoiseConfig(str(table), str(out), model=str(checkpoint), workers=1, overwrite=True,
                                      progress=False))
    assert again.done == len(good) and "was not written by n2n" in dict(again.failures)["taken.png"]
    assert (out / "taken.png").read_bytes() == b"someone's own file" and not any(outside.iterdir())


@pytest.mark.slow
def test_null_and_duplicate_keys_in_parquet_output(tmp_path, ray_cluster, checkpoint):
    table, out = tmp_path / "t.parquet", tmp_path / "out.parquet"
    good = hostile_table(table)
    summary = run_denoise(DenoiseConfig(str(table), str(out), model=str(checkpoint), workers=1, progress=False))
    result = pq.read_table(out)
    keys = result.column("path").to_pylist()
    assert None not in keys and "None" not in keys and "dup.png" not in keys
    # Parquet output has no paths: aliases and links are plain keys there, and are denoised
    assert sorted(keys) == sorted(list(good) + ["x/y.png", "x/./y.png", "x//y.png", "link/escape.png", "taken.png"])
    failures = dict(summary.failures)
    assert set(failures) == {"dup.png", "anim.gif", next(k for k in failures if "null key" in k)}


def test_symlinked_folders_in_in_are_not_followed_unless_asked(tmp_path, ray_cluster, checkpoint):
    src, elsewhere = tmp_path / "in", tmp_path / "elsewhere"
    keys = make_tree(src, 2)
    make_tree(elsewhere, 1, seed=4)
    (src / "loop").symlink_to(src)  # one image used to become 41 inputs, 40 levels deep
    (src / "ext").symlink_to(elsewhere)
    os.mkfifo(src / "pipe.png")  # reading it would wait forever
    plain = run_denoise(DenoiseConfig(str(src), str(tmp_path / "out1"), model=str(checkpoint), workers=1,
                                      progress=False))
    assert plain.done == len(keys) and dict(plain.failures) == {"pipe.png": dict(plain.failures)["pipe.png"]}
    assert "not a regular file" in dict(plain.failures)["pipe.png"]
    followed = run_denoise(DenoiseConfig(str(src), str(tmp_path / "out2"), model=str(checkpoint), workers=1,
                                         follow_symlinks=True, progress=False))
    assert followed.done == len(keys) + 1 and (tmp_path / "out2/ext/img0000.png").is_file()
    assert not (tmp_path / "out2/loop").exists()


# -- a full disk ------------------------------------------------------------------------------
@pytest.mark.slow
def test_disk_full_stops_with_a_summary_and_the_rerun_completes(tmp_path, checkpoint):
    """OUT on a 400 kB file system: the run stops at the first full write with a summary of
    what was and was not done (exit 1, no traceback); with room made, the rerun finishes,
    keeping every output that had landed."""
    src = tmp_path / "in"
    keys = make_tree(src, 30, min_side=90, max_side=110)
    mnt = tmp_path / "small"
    denoise = f"{sys.executable} -m pipeline.cli denoise {src} {mnt}/out --model {checkpoint} --workers 1 " \
              f"--batch-size 2 --no-progress --address local"
    script = (f"mkdir {mnt} && mount -t tmpfs -o size=400k tmpfs {mnt} && "
              f"{{ {denoise} > {tmp_path}/first.out 2> {tmp_path}/first.err; echo $? > {tmp_path}/first.rc; }} && "
              f"cp -a {mnt}/out {tmp_path}/after-first && "
              f"mount -o remount,size=20m {mnt} && "
              f"{{ {denoise} > {tmp_path}/second.out 2> {tmp_path}/second.err; echo $? > {tmp_path}/second.rc; }} && "
              f"cp -a {mnt}/out {tmp_path}/after-second")
    result = run_in_private_mount(script, cwd=ROOT, timeout=900)
    assert result.returncode == 0, result.stdout + result.stderr
    first_out, first_err = (tmp_path / "first.out").read_text(), (tmp_path / "first.err").read_text()
    assert (tmp_path / "first.rc").read_text().strip() == "1", first_out + first_err
    assert "Traceback" not in first_out + first_err
    assert "stopped early: disk full" in first_out and "inputs not processed; rerun" in first_out, first_out
    # the summary's count line; Ray may print its own lines around it (an actor killed at the stop)
    done_first = int(re.search(r"^\d+ inputs: (\d+) done,", first_out, re.M).group(1))
    landed = {p.relative_to(tmp_path / "after-first").as_posix() for p in (tmp_path / "after-first").rglob("*.*")
              if p.is_file() and not p.relative_to(tmp_path / "after-first").parts[0].startswith("_")}  # the job's
    # own files (a shard left in _n2n_tmp/ when the full disk stopped the merge too) are not outputs
    assert 0 < len(landed) < len(keys)
    second = (tmp_path / "second.out").read_text()
    assert (tmp_path / "second.rc").read_text().strip() == "0", second + (tmp_path / "second.err").read_text()
    assert f"{len(keys)} inputs: {len(keys) - len(landed)} done, {len(landed)} skipped, 0 failed" in second, second
    for key in landed:  # kept, not redone
        assert (tmp_path / "after-second" / key).read_bytes() == (tmp_path / "after-first" / key).read_bytes()
    assert all((tmp_path / "after-second" / k).is_file() for k in keys)
    assert done_first == len(landed)
    manifest = read_manifest(tmp_path / "after-second" / "_manifest.jsonl")
    assert {k for k, r in manifest.items() if r["status"] in ("done", "skipped")} == set(keys)


def test_planted_links_in_out_and_an_empty_model_are_refused(tmp_path, checkpoint):
    src, out = tmp_path / "in", tmp_path / "out"
    make_tree(src, 1)
    out.mkdir()
    (out / "_manifest.jsonl").symlink_to("/etc/passwd")
    refused(DenoiseConfig(str(src), str(out), model=str(checkpoint)), "_manifest.jsonl is not a regular file")
    (out / "_manifest.jsonl").unlink()
    (out / "_manifest.jsonl").write_bytes(b"")
    (out / "_n2n_tmp").symlink_to(tmp_path)  # staging (and its deletions) would land there
    refused(DenoiseConfig(str(src), str(out), model=str(checkpoint)), "_n2n_tmp is a symbolic link or a file")
    with pytest.raises(UsageError, match="--model must name a checkpoint"):
        DenoiseConfig(str(src), str(out), model="")  # used to mean the built-in model, silently
