"""pipeline.data.patches: batches are pure functions of (seed, step, position) on any number of workers."""
import io
import pickle

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.data.datasets import open_dataset, open_pairs
from pipeline.data.writers import ParquetWriter
from pipeline.data.noise import parse_noise
from pipeline.data.patches import TrainingBatches, row_seed, shard_positions

RNG = np.random.default_rng(2)


def png(arr) -> bytes:
    out = io.BytesIO()
    Image.fromarray(arr).save(out, format="PNG")
    return out.getvalue()


def make_table(path, bad=()):
    """Parquet of 6 RGB / grey images of assorted sizes; `bad` indices hold broken bytes."""
    arrays = []
    with ParquetWriter(path, row_group_rows=2) as w:
        for i in range(6):
            shape = (40 + 7 * i, 50 + 3 * i) + (() if i % 3 == 0 else (3,))
            arr = RNG.integers(0, 256, shape, dtype=np.uint8)
            arrays.append(arr)
            w.write(f"img{i}.png", b"garbage" if i in bad else png(arr))
    return arrays


@pytest.fixture
def table(tmp_path):
    make_table(tmp_path / "t.parquet")
    return open_dataset(tmp_path / "t.parquet")


def test_shapes_and_determinism(table):
    tb = TrainingBatches(table, parse_noise("gaussian:25"), crop_size=32, batch_size=8, seed=5)
    x, y = tb.batch(3)
    assert x.shape == y.shape == (8, 3, 32, 32) and x.dtype == torch.float32
    again = TrainingBatches(table, parse_noise("gaussian:25"), crop_size=32, batch_size=8, seed=5)
    x2, y2 = again.batch(3)
    assert torch.equal(x, x2) and torch.equal(y, y2)
    assert not torch.equal(x, tb.batch(4)[0])  # another step
    other = TrainingBatches(table, parse_noise("gaussian:25"), crop_size=32, batch_size=8, seed=6)
    assert not torch.equal(x, other.batch(3)[0])  # another seed


@pytest.mark.parametrize("workers", [1, 2, 3])
@pytest.mark.parametrize("spec", ["gaussian:0-50", "poisson:30", "impulse:0.1"])
def test_any_number_of_workers_gives_the_full_batch(table, workers, spec):
    kwargs = dict(crop_size=24, batch_size=7, seed=11)
    full_x, full_y = TrainingBatches(table, parse_noise(spec), **kwargs).batch(2)
    parts_x, parts_y = [], []
    for w in range(workers):
        # each worker gets its own unpickled copy (as a Ray actor would) and only its positions
        tb = pickle.loads(pickle.dumps(TrainingBatches(table.shard(0, 1), parse_noise(spec), **kwargs)))
        x, y = tb.batch(2, shard_positions(7, workers, w))
        parts_x.append(x)
        parts_y.append(y)
    assert torch.equal(torch.cat(parts_x), full_x) and torch.equal(torch.cat(parts_y), full_y)


def test_shard_positions():
    assert [shard_positions(16, 3, w) for w in range(3)] == [range(0, 5), range(5, 10), range(10, 16)]
    assert [len(shard_positions(2, 3, w)) for w in range(3)] == [0, 1, 1]
    with pytest.raises(ValueError):
        shard_positions(16, 2, 2)


def test_row_seed_mixes_all_three():
    seeds = {row_seed(s, t, p) for s in range(4) for t in range(4) for p in range(4)}
    assert len(seeds) == 64 and all(0 <= s < 2**63 for s in seeds)


def _windows(image: torch.Tensor, c: int) -> list[torch.Tensor]:
    """Every c x c window of image (C, H, W) under the 8 flips/rotations."""
    out = []
    for y in range(image.shape[1] - c + 1):
        for x in range(image.shape[2] - c + 1):
            w = image[:, y:y + c, x:x + c]
            for f in (w, w.flip(-1)):
                out.extend(torch.rot90(f, k, dims=(-2, -1)) for k in range(4))
    return out


def test_clean_targets_are_augmented_crops_of_the_images(tmp_path):
    arrays = [RNG.integers(0, 256, (12, 14, 3), dtype=np.uint8) for _ in range(2)]
    with ParquetWriter(tmp_path / "t.parquet") as w:
        for i, a in enumerate(arrays):
            w.write(f"{i}.png", png(a))
    ds = open_dataset(tmp_path / "t.parquet")
    tb = TrainingBatches(ds, parse_noise("gaussian:25"), crop_size=8, batch_size=40, seed=0, target="clean")
    x, y = tb.batch(0)
    images = [torch.from_numpy(a).permute(2, 0, 1).float() / 255 for a in arrays]
    windows = [w for img in images for w in _windows(img, 8)]
    stack = torch.stack(windows)  # (K, 3, 8, 8)
    orientations = set()
    for row in range(40):
        d = (stack - y[row]).abs().flatten(1).amax(1)
        assert d.min() < 1e-6, "target is not a crop of any image"
        orientations.add(int(d.argmin()) % 8)
        noise = x[row] - y[row]
        assert 0.05 < noise.std() < 0.15  # sigma 25/255 ~ 0.098 on the input
    assert len(orientations) >= 5  # flips and rotations are used


def test_noisy_targets_are_two_independent_draws(table):
    tb = TrainingBatches(table, parse_noise("gaussian:25"), crop_size=32, batch_size=16, seed=1)
    clean_tb = TrainingBatches(table, parse_noise("gaussian:25"), crop_size=32, batch_size=16, seed=1,
                               target="clean")
    x, y = tb.batch(0)
    _, clean = clean_tb.batch(0)
    n1, n2 = x - clean, y - clean  # the same crops: noise is drawn after the crop
    assert n1.std().item() == pytest.approx(25 / 255, rel=0.05)
    assert n2.std().item() == pytest.approx(25 / 255, rel=0.05)
    corr = (n1 * n2).mean() / (n1.std() * n2.std())
    assert abs(corr.item()) < 0.02
    assert n1.min() < -3 * 25 / 255 * 0.9  # not clipped: pairs stay unbiased


def test_grey_images_replicated_with_identical_noise(tmp_path):
    with ParquetWriter(tmp_path / "g.parquet") as w:
        w.write("g.png", png(RNG.integers(0, 256, (30, 30), dtype=np.uint8)))
    tb = TrainingBatches(open_dataset(tmp_path / "g.parquet"), parse_noise("gaussian:25"), crop_size=16,
                         batch_size=4)
    x, y = tb.batch(0)
    assert torch.equal(x[:, 0], x[:, 1]) and torch.equal(x[:, 0], x[:, 2])
    assert torch.equal(y[:, 0], y[:, 2]) and not torch.equal(x, y)


def test_images_smaller_than_the_crop_are_padded(tmp_path):
    with ParquetWriter(tmp_path / "s.parquet") as w:
        w.write("s.png", png(np.full((5, 9, 3), 200, dtype=np.uint8)))
    tb = TrainingBatches(open_dataset(tmp_path / "s.parquet"), parse_noise("gaussian:25"), crop_size=16,
                         batch_size=2, target="clean")
    _, y = tb.batch(0)
    assert y.shape == (2, 3, 16, 16) and torch.allclose(y, torch.full_like(y, 200 / 255))


def test_bad_images_reported_once_and_replaced_deterministically(tmp_path, caplog):
    make_table(tmp_path / "t.parquet", bad=(1, 4))
    ds = open_dataset(tmp_path / "t.parquet")
    kwargs = dict(crop_size=16, batch_size=12, seed=3)
    tb = TrainingBatches(ds, parse_noise("gaussian:25"), **kwargs)
    with caplog.at_level("WARNING", logger="pipeline.data.patches"):
        x, _ = tb.batch(0)
        for step in range(1, 6):
            tb.batch(step)
    assert sorted(tb.bad) == [1, 4]
    assert all("not a recognized image format" in r and ("img1.png" in r or "img4.png" in r)
               for r in tb.bad.values())
    logged = [r.getMessage() for r in caplog.records if "skipping bad image" in r.getMessage()]
    assert len(logged) == 2  # once each
    # two workers discover the bad images independently and make the same replacements
    a = TrainingBatches(ds, parse_noise("gaussian:25"), **kwargs).batch(0, range(0, 5))[0]
    b = TrainingBatches(ds, parse_noise("gaussian:25"), **kwargs).batch(0, range(5, 12))[0]
    assert torch.equal(torch.cat([a, b]), x)


def test_all_bad_raises(tmp_path):
    with ParquetWriter(tmp_path / "t.parquet") as w:
        w.write("a.png", b"")
        w.write("b.png", b"nope")
    tb = TrainingBatches(open_dataset(tmp_path / "t.parquet"), parse_noise("gaussian:25"))
    with pytest.raises(RuntimeError, match="no valid image"):
        tb.batch(0)


def test_cache_is_bounded(table):
    tb = TrainingBatches(table, parse_noise("gaussian:25"), crop_size=16, batch_size=16, cache_bytes=20_000)
    for step in range(4):
        tb.batch(step)
    assert 1 <= len(tb._cache) < 6
    assert tb._cached <= 20_000 or len(tb._cache) == 1
    big = TrainingBatches(table, parse_noise("gaussian:25"), crop_size=16, batch_size=16)
    assert torch.equal(big.batch(2)[0], tb.batch(2)[0])  # eviction never changes the data


def test_real_pairs(tmp_path):
    base = RNG.integers(20, 230, (20, 24, 3)).astype(np.int16)
    with ParquetWriter(tmp_path / "p.parquet", image_columns=("noisy_a", "noisy_b")) as w:
        for i in range(3):
            a = (base + RNG.integers(-20, 21, base.shape)).astype(np.uint8)
            b = (base + RNG.integers(-20, 21, base.shape)).astype(np.uint8)
            w.write(f"s{i}.png", png(a), png(b))
        w.write("mismatch.png", png(base.astype(np.uint8)), png(base[:10].astype(np.uint8)))
    pairs = open_pairs(tmp_path / "p.parquet")
    tb = TrainingBatches(pairs, None, crop_size=8, batch_size=24, seed=0)
    x, y = tb.batch(0)
    assert x.shape == (24, 3, 8, 8)
    assert 3 in tb.bad and "pair members differ in size" in tb.bad[3] and "mismatch.png" in tb.bad[3]
    diff = (x - y) * 255
    assert diff.abs().max() <= 40 + 1e-3 and diff.std() > 5  # same crop of two different shots
    split = [TrainingBatches(pairs, None, crop_size=8, batch_size=24, seed=0).batch(0, shard_positions(24, 3, w))
             for w in range(3)]
    assert torch.equal(torch.cat([s[0] for s in split]), x)
    with pytest.raises(ValueError, match="PairDataset"):
        TrainingBatches(pairs, parse_noise("gaussian:25"))


def test_validation_images_and_pairs(tmp_path):
    arrays = make_table(tmp_path / "t.parquet", bad=(0,))
    tb = TrainingBatches(open_dataset(tmp_path / "t.parquet"), parse_noise("gaussian:25"))
    val = tb.validation_images(3)
    assert [tuple(v.shape) for v in val] == [(3,) + arrays[i].shape[:2] for i in (1, 2, 3)]
    expected = torch.from_numpy(arrays[1]).permute(2, 0, 1).float() / 255
    torch.testing.assert_close(val[0], expected)
    assert len(tb.validation_images(100)) == 5
    pairs = tb.validation_pairs(2, seed=4)
    assert len(pairs) == 2 and torch.equal(pairs[0][1], val[0])
    noisy = pairs[0][0]
    assert noisy.min() >= 0 and noisy.max() <= 1  # evaluation inputs are clipped measurements
    assert torch.equal(noisy, tb.validation_pairs(2, seed=4)[0][0])


def test_held_out_images_never_reach_training_and_are_the_validation_set(tmp_path):
    from pipeline.data.patches import holdout_indices

    assert holdout_indices(400, 40) == frozenset(range(5, 400, 10))
    assert holdout_indices(7, 0) == frozenset()
    folder = tmp_path / "flat"
    folder.mkdir()
    for i in range(10):  # image i is the constant grey level 20 i: a crop tells its image
        Image.fromarray(np.full((12, 12, 3), 20 * i, np.uint8)).save(folder / f"img{i}.png")
    ds = open_dataset(folder)
    tb = TrainingBatches(ds, parse_noise("gaussian:25"), crop_size=8, batch_size=50, seed=0, target="clean", holdout=3)
    held = sorted(holdout_indices(10, 3))
    assert held == [1, 5, 8]
    seen = set()
    for step in range(8):
        _, targets = tb.batch(step)
        seen |= {round(float(t.mean()) * 255 / 20) for t in targets}
    assert seen == set(range(10)) - set(held)
    refs = [round(float(ref.mean()) * 255 / 20) for _, ref in tb.validation_pairs(10)]
    assert refs == held
    with pytest.raises(ValueError, match="holdout"):
        TrainingBatches(ds, parse_noise("gaussian:25"), holdout=10)
