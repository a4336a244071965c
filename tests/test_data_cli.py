"""`n2n data` commands and the course .pkl import: bad files named and skipped, lossless, safe loading."""
import io
import json
import struct
import zlib

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from pipeline.cli import main
from pipeline.data.datasets import open_dataset, open_pairs
from pipeline.data.writers import ParquetWriter
from pipeline.data.noise import parse_noise
from pipeline.data.patches import TrainingBatches
from pipeline.data.pkl_import import PklFormatError, import_pkl, load_pkl_pairs

RNG = np.random.default_rng(3)


def png(arr) -> bytes:
    out = io.BytesIO()
    Image.fromarray(arr).save(out, format="PNG")
    return out.getvalue()


def bomb_png(width=100_000, height=100_000) -> bytes:
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 10)) + chunk(b"IEND", b"")


GOOD = {
    "grey8.png": lambda: Image.fromarray(RNG.integers(0, 256, (10, 12), dtype=np.uint8)),
    "grey16.png": lambda: Image.fromarray(RNG.integers(0, 65536, (10, 12), dtype=np.uint16)),
    "d/rgb.png": lambda: Image.fromarray(RNG.integers(0, 256, (10, 12, 3), dtype=np.uint8)),
    "d/rgba.png": lambda: Image.fromarray(RNG.integers(0, 256, (10, 12, 4), dtype=np.uint8)),
    "d/e/palette.png": lambda: Image.fromarray(RNG.integers(0, 256, (10, 12, 3), dtype=np.uint8)).quantize(5),
}
BAD = {
    "bad/empty.png": "empty file",
    "bad/truncated.png": "truncated",
    "bad/text.png": "not a recognized image format",
    "bad/bomb.png": "decompression bomb",
}


def make_folder(root):
    for rel, make in GOOD.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        make().save(root / rel)
    (root / "bad").mkdir()
    (root / "bad/empty.png").write_bytes(b"")
    full = png(RNG.integers(0, 256, (64, 64, 3), dtype=np.uint8))
    (root / "bad/truncated.png").write_bytes(full[: len(full) // 2])
    (root / "bad/text.png").write_text("hello, I am text\n")
    (root / "bad/bomb.png").write_bytes(bomb_png())


def run(*args, status=0):
    result = CliRunner().invoke(main, ["data", *args, "--no-progress"], catch_exceptions=False)
    assert result.exit_code == status, result.output
    return result


def test_help_lists_the_subcommands():
    out = CliRunner().invoke(main, ["data", "--help"]).output
    for name in ("pack", "unpack", "info", "import-pkl", "pairs"):
        assert name in out
    assert "FOLDER OUT" in CliRunner().invoke(main, ["data", "pack", "--help"]).output


def test_pack_reports_bad_files_by_name_and_unpack_is_lossless(tmp_path):
    src = tmp_path / "src"
    make_folder(src)
    result = run("pack", str(src), str(tmp_path / "t.parquet"), status=1)  # files were left out
    for rel, reason in BAD.items():
        assert f"bad: {rel}: " in result.output and reason in result.output.split(f"bad: {rel}: ")[1].split("\n")[0]
    assert f"packed {len(GOOD)} images" in result.output and f"skipped {len(BAD)} bad" in result.output
    assert open_dataset(tmp_path / "t.parquet").keys == sorted(GOOD)
    result = run("unpack", str(tmp_path / "t.parquet"), str(tmp_path / "out"))
    assert f"unpacked {len(GOOD)} files" in result.output and "skipped 0 bad" in result.output
    for rel in GOOD:
        assert (tmp_path / "out" / rel).read_bytes() == (src / rel).read_bytes()
        a, b = Image.open(src / rel), Image.open(tmp_path / "out" / rel)
        assert a.mode == b.mode and np.array_equal(np.asarray(a), np.asarray(b))
    assert not (tmp_path / "out" / "bad").exists()


def test_info_on_folder_counts_modes_and_bad_files(tmp_path):
    make_folder(tmp_path)
    result = run("info", str(tmp_path), "--json")
    s = json.loads(result.output)
    assert s["count"] == len(GOOD) and len(s["bad"]) == len(BAD)
    assert {b["name"] for b in s["bad"]} == set(BAD)
    assert s["modes"] == {"L": 1, "I;16": 1, "RGB": 1, "RGBA": 1, "P": 1}
    assert s["bit_depths"] == {"8": 4, "16": 1}
    assert s["min_size"] == [10, 12] and s["max_size"] == [10, 12]


def test_unreadable_parquet_row_is_named_and_the_rest_used(tmp_path):
    good = [png(RNG.integers(0, 256, (20, 20, 3), dtype=np.uint8)) for _ in range(3)]
    table = pa.table({"path": ["a.png", "b.png", "c.png", "d.png"],
                      "image": pa.array([good[0], None, good[1], good[2]], pa.binary())})
    pq.write_table(table, tmp_path / "t.parquet")
    result = run("info", str(tmp_path / "t.parquet"))
    assert "t.parquet row 1 (b.png, column image): image is null" in result.output
    assert "3 good images, 1 bad" in result.output
    result = run("unpack", str(tmp_path / "t.parquet"), str(tmp_path / "out"), status=1)  # a row is missing
    assert "unpacked 3 files" in result.output and "skipped 1 bad" in result.output
    tb = TrainingBatches(open_dataset(tmp_path / "t.parquet"), parse_noise("gaussian:25"), crop_size=8,
                         batch_size=16)
    tb.batch(0)
    assert list(tb.bad) == [1] and "image is null" in tb.bad[1]


def test_pairs_of_different_sizes_are_reported(tmp_path):
    with ParquetWriter(tmp_path / "p.parquet", image_columns=("noisy_a", "noisy_b")) as w:
        w.write("ok.png", png(np.zeros((8, 8, 3), np.uint8)), png(np.ones((8, 8, 3), np.uint8)))
        w.write("odd.png", png(np.zeros((8, 8, 3), np.uint8)), png(np.ones((8, 9, 3), np.uint8)))
    s = json.loads(run("info", str(tmp_path / "p.parquet"), "--json").output)
    assert s["kind"] == "parquet pairs" and s["count"] == 1
    assert len(s["bad"]) == 1 and "odd.png" in s["bad"][0]["name"]
    assert "pair members differ in size: [8, 8] vs [8, 9]" in s["bad"][0]["reason"].replace("(", "[").replace(")", "]")
    run("unpack", str(tmp_path / "p.parquet"), str(tmp_path / "out"))
    assert (tmp_path / "out/noisy_a/ok.png").exists() and (tmp_path / "out/noisy_b/odd.png").exists()


def test_import_pkl_course_format(tmp_path):
    a = torch.randint(0, 256, (5, 3, 8, 10), dtype=torch.uint8)
    b = torch.randint(0, 256, (5, 3, 8, 10), dtype=torch.uint8)
    torch.save((a, b), tmp_path / "train_data.pkl")
    result = run("import-pkl", str(tmp_path / "train_data.pkl"), str(tmp_path / "pairs.parquet"))
    assert "imported 5 pairs" in result.output
    pairs = open_pairs(tmp_path / "pairs.parquet")
    assert pairs.keys == [f"{i:06d}.png" for i in range(5)]
    for i in range(5):
        pa_, pb_ = pairs.read_pair(i)
        np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(pa_))), a[i].permute(1, 2, 0).numpy())
        np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(pb_))), b[i].permute(1, 2, 0).numpy())
    x, y = TrainingBatches(pairs, None, crop_size=8, batch_size=4).batch(0)
    assert x.shape == (4, 3, 8, 8)
    assert import_pkl(tmp_path / "train_data.pkl", tmp_path / "v.parquet", columns=("noisy", "clean")) == 5
    assert pq.ParquetFile(tmp_path / "v.parquet").schema_arrow.names == ["path", "noisy", "clean"]


class _Payload:
    """Unpickling this would create a file: the restricted loader must refuse it."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_import_pkl_never_runs_pickled_code(tmp_path):
    marker = tmp_path / "pwned"
    torch.save((_Payload(str(marker)), torch.zeros(1)), tmp_path / "evil.pkl")
    with pytest.raises(PklFormatError, match="evil.pkl: refused"):
        load_pkl_pairs(tmp_path / "evil.pkl")
    assert not marker.exists()


@pytest.mark.parametrize("obj, match", [
    ((torch.zeros(2, 3, 4, 4),), "tuple of two tensors"),
    ((torch.zeros(2, 3, 4, 4), torch.zeros(2, 3, 4, 4)), "uint8"),
    ((torch.zeros(2, 1, 4, 4, dtype=torch.uint8),) * 2, "N x 3 x H x W"),
    ((torch.zeros(2, 3, 4, 4, dtype=torch.uint8), torch.zeros(2, 3, 4, 5, dtype=torch.uint8)), "differ in shape"),
])
def test_import_pkl_rejects_wrong_contents(tmp_path, obj, match):
    torch.save(obj, tmp_path / "x.pkl")
    with pytest.raises(PklFormatError, match=match):
        load_pkl_pairs(tmp_path / "x.pkl")
    assert not (tmp_path / "out.parquet").exists()


def test_bench_data_runs_on_generated_images(capsys):
    import importlib.util
    import pathlib

    path = pathlib.Path(__file__).resolve().parents[1] / "bench" / "data.py"
    spec = importlib.util.spec_from_file_location("bench_data", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    threads = torch.get_num_threads()
    try:
        assert bench.main(["--images", "4", "--image-size", "64", "--batches", "1", "--batch-size", "4",
                           "--skip-unet", "--json"]) == 0
    finally:
        torch.set_num_threads(threads)  # the bench measures on one thread
    out = json.loads(capsys.readouterr().out)
    for source in ("folder", "parquet"):
        assert out[source]["images"] == 4 and out[source]["bad"] == 0
        assert out[source]["cold"] > 0 and out[source]["uncached"] > 0


def test_training_batches_skip_each_bad_file_of_a_folder_and_use_the_rest(tmp_path):
    make_folder(tmp_path)
    ds = open_dataset(tmp_path)
    tb = TrainingBatches(ds, parse_noise("gaussian:25"), crop_size=8, batch_size=64, seed=0, target="clean")
    _, clean = tb.batch(0)
    assert sorted(ds.key(i) for i in tb.bad) == sorted(BAD)
    for i, reason in tb.bad.items():
        assert BAD[ds.key(i)] in reason and ds.key(i) in reason
    # every row is a crop of a good image: a bomb or a broken file never reaches the batch
    assert clean.shape == (64, 3, 8, 8) and torch.isfinite(clean).all()
    assert len(tb.validation_images(100)) == len(GOOD)


def test_unpack_gives_every_row_its_own_outcome(tmp_path):
    """Duplicates, null keys, symlinks inside the target and OS errors are reported by row;
    later rows are still written, and nothing lands outside the target."""
    good = [png(RNG.integers(0, 256, (8, 8, 3), dtype=np.uint8)) for _ in range(4)]
    rows = [("a.png", good[0]),
            ("dup.png", good[1]), ("dup.png", b"a bad second blob"),  # overwrote the first silently
            (None, good[2]),  # used to be refused as "unsafe key ''"
            ("f.png", good[0]), ("f.png/inner.png", good[1]),  # a file where a folder is needed
            ("x" * 300 + ".png", good[2]),  # a name over 255 bytes: used to stop the whole unpack
            ("link/escape.png", good[3]),  # target/link is a symlink to a folder outside the target
            ("z/last.png", good[3])]
    pq.write_table(pa.table({"path": pa.array([k for k, _ in rows], pa.string()),
                             "image": pa.array([v for _, v in rows], pa.binary())}), tmp_path / "t.parquet")
    target, outside = tmp_path / "out", tmp_path / "outside"
    target.mkdir()
    outside.mkdir()
    (target / "link").symlink_to(outside)
    result = run("unpack", str(tmp_path / "t.parquet"), str(target), status=1)
    bad = {line.split(": ", 1)[1] for line in result.output.splitlines() if line.startswith("bad: ")}
    assert any("row 1 (dup.png" in b and "appears 2 times" in b for b in bad)
    assert any("row 2 (dup.png" in b and "appears 2 times" in b for b in bad)
    assert any("row 3 (null key" in b and "null key: no file name" in b for b in bad)
    assert any("row 5 (f.png/inner.png" in b and "cannot write" in b for b in bad)
    assert any("row 6 (xxx" in b and "cannot write: File name too long" in b for b in bad)
    assert any("row 7 (link/escape.png" in b and "'link' is a symbolic link" in b for b in bad)
    assert len(bad) == 6 and "unpacked 3 files" in result.output
    assert (target / "a.png").read_bytes() == good[0] and (target / "f.png").read_bytes() == good[0]
    assert (target / "z/last.png").read_bytes() == good[3]  # rows after the errors are written
    assert not (target / "dup.png").exists() and not (target / "None").exists() and not any(outside.iterdir())


def test_unpack_keeps_existing_files_unless_overwrite(tmp_path):
    data = png(RNG.integers(0, 256, (8, 8, 3), dtype=np.uint8))
    pq.write_table(pa.table({"path": ["same.png", "mine.png"], "image": [data, data]}), tmp_path / "t.parquet")
    target = tmp_path / "out"
    target.mkdir()
    (target / "same.png").write_bytes(data)
    (target / "mine.png").write_bytes(b"the user's own file")
    result = run("unpack", str(tmp_path / "t.parquet"), str(target), status=1)
    assert "mine.png, column image): cannot write: exists with other content; not replaced" in result.output
    assert "unpacked 1 files" in result.output and (target / "mine.png").read_bytes() == b"the user's own file"
    run("unpack", str(tmp_path / "t.parquet"), str(target), "--overwrite")
    assert (target / "mine.png").read_bytes() == data


def test_data_commands_refuse_missing_inputs_and_pack_never_replaces_a_file(tmp_path):
    for args in (["info", str(tmp_path / "nope")], ["unpack", str(tmp_path / "nope.parquet"), str(tmp_path / "x")],
                 ["pack", str(tmp_path / "nope"), str(tmp_path / "x.parquet")]):
        result = run(*args, status=2)
        assert "no such file or folder" in result.output and "Traceback" not in result.output
    src = tmp_path / "src"
    make_folder(src)
    (tmp_path / "mine.parquet").write_bytes(b"someone's file")
    result = run("pack", str(src), str(tmp_path / "mine.parquet"), status=2)
    assert "exists; --overwrite replaces it" in result.output
    assert (tmp_path / "mine.parquet").read_bytes() == b"someone's file"
    result = run("pack", str(src), str(src), "--overwrite", status=2)  # used to fail after packing, leaving a .tmp
    assert "is a folder" in result.output
    run("pack", str(src), str(tmp_path / "mine.parquet"), "--overwrite", status=1)  # its bad files left out
    assert open_dataset(tmp_path / "mine.parquet").keys == sorted(GOOD)
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_a_parquet_writer_whose_rename_fails_leaves_no_temporary_file(tmp_path):
    (tmp_path / "taken").mkdir()
    writer = ParquetWriter(tmp_path / "taken")
    writer.write("a.png", b"x")
    with pytest.raises(OSError):
        writer.close()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taken"]
