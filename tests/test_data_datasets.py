"""pipeline.data.datasets: folders and Parquet, lossless round trips, sharding, bad records, atomic writes."""
import pickle

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipeline.data.datasets import open_dataset, open_pairs
from pipeline.data.records import BadRecordError
from pipeline.data.writers import FolderWriter, ParquetWriter
from pipeline.data.images import decode_image

RNG = np.random.default_rng(1)


def make_folder(root):
    """One file per mode the acceptance names, in nested folders; returns {relpath: PIL image}."""
    images = {
        "grey8.png": Image.fromarray(RNG.integers(0, 256, (12, 17), dtype=np.uint8)),
        "grey16.png": Image.fromarray(RNG.integers(0, 65536, (12, 17), dtype=np.uint16)),
        "a/rgb.png": Image.fromarray(RNG.integers(0, 256, (12, 17, 3), dtype=np.uint8)),
        "a/b/rgba.png": Image.fromarray(RNG.integers(0, 256, (12, 17, 4), dtype=np.uint8)),
        "a/palette.png": Image.fromarray(RNG.integers(0, 256, (12, 17, 3), dtype=np.uint8)).quantize(8),
        "z/grey16.tif": Image.fromarray(RNG.integers(0, 65536, (12, 17), dtype=np.uint16)),
        "z/RGB.TIFF": Image.fromarray(RNG.integers(0, 256, (12, 17, 3), dtype=np.uint8)),
    }
    for rel, im in images.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        im.save(path)
    (root / "notes.txt").write_text("not an image, not listed")
    (root / ".hidden").mkdir()
    Image.fromarray(np.zeros((2, 2), dtype=np.uint8)).save(root / ".hidden" / "skip.png")
    return images


def test_folder_is_recursive_sorted_with_relative_paths(tmp_path):
    images = make_folder(tmp_path)
    ds = open_dataset(tmp_path)
    assert ds.kind == "folder"
    assert ds.keys == sorted(images)
    assert len(ds) == len(images)
    assert ds.read(ds.keys.index("a/rgb.png")) == (tmp_path / "a/rgb.png").read_bytes()


def test_folder_parquet_folder_round_trip_is_lossless(tmp_path):
    src, out = tmp_path / "src", tmp_path / "out"
    images = make_folder(src)
    with ParquetWriter(tmp_path / "t.parquet", row_group_rows=3) as w:
        for key, data in open_dataset(src).records():
            w.write(key, data)
    table = open_dataset(tmp_path / "t.parquet")
    assert table.kind == "parquet" and table.keys == sorted(images)
    with FolderWriter(out) as w:
        for key, data in table.records():
            w.write(key, data)
    back = open_dataset(out)
    assert back.keys == sorted(images)
    for rel, im in images.items():
        assert (out / rel).read_bytes() == (src / rel).read_bytes()
        decoded = Image.open(out / rel)
        assert decoded.mode == im.mode
        np.testing.assert_array_equal(np.asarray(decoded), np.asarray(im))
        # and the decoded pixels of both copies agree exactly
        a = decode_image((src / rel).read_bytes(), rel)
        b = decode_image((out / rel).read_bytes(), rel)
        assert (a.pixels == b.pixels).all() and a.bit_depth == b.bit_depth


def test_parquet_schema_and_bounded_row_groups(tmp_path):
    path = tmp_path / "t.parquet"
    with ParquetWriter(path, row_group_bytes=250, row_group_rows=1000) as w:
        for i in range(10):
            w.write(f"k{i}.png", bytes([i]) * 100)
    f = pq.ParquetFile(path)
    assert f.schema_arrow.field("path").type == pa.string()
    assert f.schema_arrow.field("image").type == pa.binary()
    assert f.schema_arrow.metadata[b"n2n.schema"] == b"images/v1"
    sizes = [f.metadata.row_group(i).num_rows for i in range(f.num_row_groups)]
    assert sizes == [3, 3, 3, 1]  # flushed once 250 bytes are buffered
    ds = open_dataset(path)
    assert [ds.read(i) for i in range(10)] == [bytes([i]) * 100 for i in range(10)]
    with ParquetWriter(tmp_path / "r.parquet", row_group_rows=4) as w:
        for i in range(10):
            w.write(f"k{i}", b"x")
    f = pq.ParquetFile(tmp_path / "r.parquet")
    assert [f.metadata.row_group(i).num_rows for i in range(f.num_row_groups)] == [4, 4, 2]


def test_directory_of_parquet_files_in_name_order(tmp_path):
    d = tmp_path / "tables"
    for name, keys in [("b.parquet", ["x", "y"]), ("a.parquet", ["p", "q", "r"])]:
        with ParquetWriter(d / name) as w:
            for k in keys:
                w.write(k, k.encode())
    ds = open_dataset(d)
    assert ds.keys == ["p", "q", "r", "x", "y"]
    assert ds.read(3) == b"x"
    assert open_dataset("file://" + str(d)).keys == ds.keys  # a pyarrow.fs URI


@pytest.mark.parametrize("count", [1, 2, 3, 4])
def test_shards_are_disjoint_contiguous_and_cover_everything(tmp_path, count):
    with ParquetWriter(tmp_path / "t.parquet", row_group_rows=2) as w:
        for i in range(11):
            w.write(f"{i:02d}", str(i).encode())
    ds = open_dataset(tmp_path / "t.parquet")
    shards = [ds.shard(i, count) for i in range(count)]
    assert sum((s.keys for s in shards), []) == ds.keys
    assert max(len(s) for s in shards) - min(len(s) for s in shards) <= 1
    for s in shards:
        assert [d for _, d in s.records()] == [k.lstrip("0").encode() or b"0" for k in s.keys]


def test_a_shard_reads_only_its_row_groups(tmp_path, monkeypatch):
    with ParquetWriter(tmp_path / "t.parquet", row_group_rows=3) as w:
        for i in range(12):
            w.write(f"{i:02d}", bytes([i]))
    shard = open_dataset(tmp_path / "t.parquet").shard(1, 2)  # rows 6..11 = row groups 2, 3
    shard = pickle.loads(pickle.dumps(shard))  # what a Ray worker receives
    read = []
    original = pq.ParquetFile.read_row_group

    def spy(self, i, *args, **kwargs):
        read.append(i)
        return original(self, i, *args, **kwargs)

    monkeypatch.setattr(pq.ParquetFile, "read_row_group", spy)
    assert [d for _, d in shard.records()] == [bytes([i]) for i in range(6, 12)]
    assert sorted(set(read)) == [2, 3]


def test_null_parquet_row_is_named_and_skipped(tmp_path):
    path = tmp_path / "t.parquet"
    table = pa.table({"path": ["a.png", "b.png", "c.png"], "image": pa.array([b"1", None, b"3"], pa.binary())})
    pq.write_table(table, path)
    ds = open_dataset(path)
    with pytest.raises(BadRecordError, match=r"t.parquet row 1 \(b.png"):
        ds.read(1)
    errors = []
    assert list(ds.records(on_error=errors.append)) == [("a.png", b"1"), ("c.png", b"3")]
    assert len(errors) == 1 and "image is null" in errors[0].reason


def test_unreadable_parquet_file_in_a_folder_is_reported_and_skipped(tmp_path):
    d = tmp_path / "tables"
    with ParquetWriter(d / "good.parquet") as w:
        w.write("a", b"A")
    (d / "broken.parquet").write_bytes(b"PAR1 definitely not parquet")
    ds = open_dataset(d)
    assert ds.keys == ["a"]
    assert len(ds.problems) == 1 and ds.problems[0][0].endswith("broken.parquet")
    assert "unreadable Parquet file" in ds.problems[0][1]


def test_pairs_schema(tmp_path):
    with ParquetWriter(tmp_path / "p.parquet", image_columns=("noisy_a", "noisy_b")) as w:
        w.write("s1.png", b"a1", b"b1")
        w.write("s2.png", b"a2", b"b2")
    assert pq.ParquetFile(tmp_path / "p.parquet").schema_arrow.metadata[b"n2n.schema"] == b"pairs/v1"
    pairs = open_pairs(tmp_path / "p.parquet")
    assert pairs.keys == ["s1.png", "s2.png"] and pairs.read_pair(1) == (b"a2", b"b2")
    assert pairs.shard(1, 2).read_pair(0) == (b"a2", b"b2")
    with pytest.raises(ValueError, match="open_pairs"):
        open_dataset(tmp_path / "p.parquet")


def test_writers_are_atomic(tmp_path):
    path = tmp_path / "t.parquet"
    with pytest.raises(RuntimeError):
        with ParquetWriter(path) as w:
            w.write("a", b"1")
            raise RuntimeError("crash mid-write")
    assert list(tmp_path.iterdir()) == []
    with ParquetWriter(path) as w:
        w.write("a", b"1")
        assert not path.exists()  # only the temporary name exists until close
    assert path.exists()
    fw = FolderWriter(tmp_path / "out")
    fw.write("x/y.png", b"data")
    assert [p.name for p in (tmp_path / "out" / "x").iterdir()] == ["y.png"]


@pytest.mark.parametrize("key", ["../evil.png", "/abs.png", "a/../../b.png", "a//b.png", "", "c:/x.png"])
def test_unsafe_keys_are_rejected(tmp_path, key):
    with pytest.raises(ValueError, match="unsafe key"):
        FolderWriter(tmp_path).write(key, b"x")
    with ParquetWriter(tmp_path / "t.parquet") as w, pytest.raises(ValueError, match="unsafe key"):
        w.write(key, b"x")


def test_missing_file_is_a_named_bad_record(tmp_path):
    Image.fromarray(np.zeros((2, 2), dtype=np.uint8)).save(tmp_path / "gone.png")
    ds = open_dataset(tmp_path)
    (tmp_path / "gone.png").unlink()
    with pytest.raises(BadRecordError, match="gone.png"):
        ds.read(0)


def test_dataset_pickles_without_cache(tmp_path):
    with ParquetWriter(tmp_path / "t.parquet") as w:
        w.write("a", b"x" * 100_000)
    ds = open_dataset(tmp_path / "t.parquet")
    ds.read(0)  # fills the row-group cache
    assert ds.keys == ["a"]  # builds the key list
    assert len(pickle.dumps(ds)) < 5000  # metadata only: the 100 kB row group is not shipped
    assert pickle.loads(pickle.dumps(ds)).read(0) == b"x" * 100_000


def test_single_image_file_is_a_dataset_of_one(tmp_path):
    Image.fromarray(np.zeros((2, 3), dtype=np.uint8)).save(tmp_path / "one.png")
    Image.fromarray(np.zeros((2, 3), dtype=np.uint8)).save(tmp_path / "two.png")
    ds = open_dataset(tmp_path / "one.png")
    assert ds.kind == "folder" and ds.keys == ["one.png"]
    assert ds.read(0) == (tmp_path / "one.png").read_bytes()


def test_a_single_unreadable_parquet_file_is_an_error_naming_it(tmp_path):
    (tmp_path / "t.parquet").write_bytes(b"not parquet at all")
    with pytest.raises(ValueError, match="t.parquet: unreadable Parquet file"):
        open_dataset(tmp_path / "t.parquet")


def test_corrupt_row_group_is_named_and_other_row_groups_still_read(tmp_path):
    path = tmp_path / "t.parquet"
    payload = [bytes(RNG.integers(0, 256, 4000, dtype=np.uint8)) for _ in range(3)]
    with ParquetWriter(path, row_group_rows=1) as w:
        for i, data in enumerate(payload):
            w.write(f"{i}.png", data)
    meta = pq.ParquetFile(path).metadata
    col = meta.row_group(1).column(1)  # the image column of row group 1
    start = col.dictionary_page_offset if col.has_dictionary_page else col.data_page_offset
    raw = bytearray(path.read_bytes())
    raw[start:start + 16] = b"\xff" * 16  # break the first page header of that column chunk
    path.write_bytes(bytes(raw))
    ds = open_dataset(path)
    assert ds.read(0) == payload[0] and ds.read(2) == payload[2]
    with pytest.raises(BadRecordError, match=r"t.parquet row 1 \(1.png, column image\): unreadable row group 1"):
        ds.read(1)


def test_mean_row_bytes_from_the_parquet_metadata(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipeline.data.datasets import open_dataset

    images = [bytes(1000 + 500 * i) for i in range(8)]  # mean 2750 bytes
    pq.write_table(pa.table({"path": [f"{i}.png" for i in range(8)], "image": images}), tmp_path / "t.parquet",
                   row_group_size=3, compression="none")
    mean = open_dataset(tmp_path / "t.parquet").mean_row_bytes()
    assert 2750 <= mean <= 2 * 2750  # the image bytes plus the key, page and encoding overhead: an estimate
    (tmp_path / "folder").mkdir()
    assert open_dataset(tmp_path / "folder").mean_row_bytes() is None


def test_symlinked_folders_are_not_followed_unless_asked_and_loops_are_cut(tmp_path):
    root, elsewhere = tmp_path / "in", tmp_path / "elsewhere"
    (root / "a").mkdir(parents=True)
    elsewhere.mkdir()
    Image.fromarray(np.zeros((4, 4), np.uint8)).save(root / "a" / "x.png")
    Image.fromarray(np.zeros((4, 4), np.uint8)).save(elsewhere / "y.png")
    (root / "a" / "loop").symlink_to(root)  # pyarrow's listing went 40 levels deep: 41 inputs
    (root / "ext").symlink_to(elsewhere)
    (root / "again").symlink_to(root / "a")  # a second way into a folder already listed
    (root / "file-link.png").symlink_to(root / "a" / "x.png")  # symlinked files are read through
    assert open_dataset(root).keys == ["a/x.png", "file-link.png"]
    followed = open_dataset(root, follow_symlinks=True)
    assert sorted(followed.keys) in (sorted(["a/x.png", "ext/y.png", "file-link.png"]),
                                     sorted(["again/x.png", "ext/y.png", "file-link.png"]))  # each real folder once
    assert open_dataset(root, follow_symlinks=True, exclude=(str(elsewhere),)).keys.count("ext/y.png") == 0


def test_fifos_devices_and_broken_links_are_named_never_read(tmp_path):
    import os

    Image.fromarray(np.zeros((4, 4), np.uint8)).save(tmp_path / "ok.png")
    os.mkfifo(tmp_path / "pipe.png")  # reading would wait for a writer forever
    (tmp_path / "zero.png").symlink_to("/dev/zero")  # reading would never end
    (tmp_path / "gone.png").symlink_to(tmp_path / "nowhere.png")
    os.mkfifo(tmp_path / "pipe.txt")  # not an image name: not an input at all
    ds = open_dataset(tmp_path)
    assert ds.keys == ["ok.png"]
    assert dict(ds.problems) == {"pipe.png": "not a regular file (a FIFO, device or socket); not read",
                                 "zero.png": "not a regular file (a FIFO, device or socket); not read",
                                 "gone.png": "broken symbolic link"}


def test_null_keys_are_told_apart_from_empty_ones(tmp_path):
    pq.write_table(pa.table({"path": ["a.png", None, ""], "image": [b"1", b"2", b"3"]}), tmp_path / "t.parquet")
    ds = open_dataset(tmp_path / "t.parquet")
    assert ds.keys == ["a.png", "", ""] and [ds.is_null_key(i) for i in range(3)] == [False, True, False]
    assert "row 1 (null key" in ds.name(1) and "row 2 (empty key" in ds.name(2)


def test_folder_writer_never_writes_through_a_symlink_inside_its_root(tmp_path):
    root, outside = tmp_path / "out", tmp_path / "outside"
    root.mkdir()
    outside.mkdir()
    (root / "sub").symlink_to(outside)
    writer = FolderWriter(root)
    with pytest.raises(OSError, match="'sub' is a symbolic link"):
        writer.write("sub/x.png", b"data")
    (root / "deep").mkdir()
    (root / "deep" / "er").symlink_to(outside)
    with pytest.raises(OSError, match="'deep/er' is a symbolic link"):
        writer.write("deep/er/y/x.png", b"data")
    (root / "final.png").symlink_to(outside / "target.png")
    with pytest.raises(OSError, match="'final.png' exists and is a symbolic link"):
        writer.write("final.png", b"data")
    assert not any(outside.iterdir())
    writer.write("ok/x.png", b"data")
    assert (root / "ok" / "x.png").read_bytes() == b"data"
