"""Workers in a small local Ray cluster read their own rows of the batch from the files
themselves (the driver ships only the TrainingBatches settings, no pixels) and together
give exactly the single-process batch."""
import io
import pickle

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.data.datasets import open_dataset
from pipeline.data.writers import ParquetWriter
from pipeline.data.noise import parse_noise
from pipeline.data.patches import TrainingBatches, shard_positions

ray = pytest.importorskip("ray")
from ray_support import private_ray  # noqa: E402  (after the skip: it imports ray)


@pytest.fixture
def local_ray():
    yield from private_ray(num_cpus=2, log_to_driver=False)


@pytest.mark.slow
def test_ray_workers_rebuild_the_full_batch(tmp_path, local_ray):
    rng = np.random.default_rng(0)
    with ParquetWriter(tmp_path / "t.parquet", row_group_rows=2) as w:
        for i in range(5):
            out = io.BytesIO()
            Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(out, format="PNG")
            w.write(f"{i}.png", out.getvalue())
    batches = TrainingBatches(open_dataset(tmp_path / "t.parquet"), parse_noise("gaussian:0-50"),
                              crop_size=16, batch_size=10, seed=9)
    assert len(pickle.dumps(batches)) < 4000  # settings and keys only, no pixels

    @ray.remote
    def rows(tb, step, positions):
        return tb.batch(step, positions)

    ref = ray.put(batches)
    for workers in (1, 2, 3):
        parts = ray.get([rows.remote(ref, 4, shard_positions(10, workers, w)) for w in range(workers)])
        x = torch.cat([p[0] for p in parts])
        y = torch.cat([p[1] for p in parts])
        full_x, full_y = batches.batch(4)
        assert torch.equal(x, full_x) and torch.equal(y, full_y), f"{workers} workers differ"
