"""WorkerPool inside a placement group that captures its children (a Ray Tune trial of `n2n sweep`)."""
from __future__ import annotations

import pytest

from ray_support import ray_cluster  # noqa: F401 (fixture)
from train_support import make_images

from pipeline.training import TrainConfig


def test_worker_pool_joins_the_enclosing_placement_group(ray_cluster, tmp_path):
    """A driver running in a placement group that captures its children (a Tune trial) starts its
    gradient actors in that group: with both CPUs of the cluster in the group, an actor outside it
    could not start at all."""
    ray = ray_cluster
    from ray.util.placement_group import placement_group, remove_placement_group
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    from pipeline.training.placement import WorkerPool, enclosing_placement_group

    images = make_images(tmp_path / "images", count=3, size=16)
    config = TrainConfig(data=str(images), out=str(tmp_path / "run"), arch="unet", arch_args={"depth": 2, "width": 8},
                         batch_size=2, crop_size=8, workers=1, device="cpu", start_timeout=20.0)
    assert enclosing_placement_group() is None  # the test's own driver: no group

    @ray.remote(num_cpus=1)
    def driver_in_group(pg_hex):
        from pipeline.training.flat import FlatParameters
        from pipeline.training.replica import make_model

        pool = WorkerPool(config, 1, False)
        try:
            # the actor's own view of where it runs (the cluster's free-resource view lags behind)
            actor_group = ray.get(pool.actors[0].__ray_call__.remote(
                lambda _self: ray.get_runtime_context().get_placement_group_id()))
            gradients = pool.gradients(FlatParameters(make_model(config)).weights, 0)
            return (enclosing_placement_group().id.hex() == pg_hex, actor_group, gradients.count)
        finally:
            pool.shutdown()

    pg = placement_group([{"CPU": 1}, {"CPU": 1}], strategy="PACK")
    ray.get(pg.ready(), timeout=60)
    try:
        strategy = PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=0,
                                                    placement_group_capture_child_tasks=True)
        same_group, actor_group, shards = ray.get(
            driver_in_group.options(scheduling_strategy=strategy).remote(pg.id.hex()), timeout=120)
    finally:
        remove_placement_group(pg)
    assert same_group
    assert actor_group == pg.id.hex(), "the gradient actor is not in the trial's placement group"
    assert shards == 2  # the whole batch of 2 rows, computed in the group
