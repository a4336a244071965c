"""Data-parallel training on Ray equals one process: 1, 2, 3 workers (unequal shards), 20 steps, float64."""
import pytest

from pipeline.training import train
from train_support import assert_weights_close, images, reference_weights, tiny_config  # noqa: F401 (fixture)
from ray_support import ray_cpus  # noqa: F401 (fixture)


@pytest.fixture(scope="module")
def reference(images, tmp_path_factory):
    return reference_weights(tiny_config(images, tmp_path_factory.mktemp("ref")))


@pytest.mark.parametrize("workers", [pytest.param(1, marks=pytest.mark.slow), 2,
                                     pytest.param(3, marks=pytest.mark.slow)])
def test_workers_give_the_single_process_weights(ray_cpus, images, reference, tmp_path, workers):
    # batch 7: shards (7), (3, 4), (2, 2, 3)
    result = train(tiny_config(images, tmp_path / "run", workers=workers))
    assert result.workers == workers
    assert result.failures == 0
    assert_weights_close(result.model.state_dict(), reference, 1e-10, f"{workers} workers")
    # the run really trained: weights moved from their initial values
    initial = reference_weights(tiny_config(images, tmp_path / "r0"), steps=0)
    moved = max(float((result.model.state_dict()[k] - initial[k]).abs().max()) for k in initial)
    assert moved > 1e-4
