"""The node reduce on a multi-node cluster (ray.cluster_utils.Cluster): equal to one process, with
the overlapped step (the default) and the serial one, and a lost node whose workers were summed by
its reducer.

A head without CPUs (only the driver talks to it) and two 4-CPU worker nodes: 4 workers
spread 2 + 2 (two reducers, one per node), 5 workers 3 + 2 (three summed on one node).
"""
from collections import Counter

import pytest

from pipeline.training import train
from ray_support import worker_cluster
from train_support import assert_weights_close, images, reference_weights, tiny_config  # noqa: F401 (fixture)

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def cluster():
    yield from worker_cluster(node_cpus=4)


@pytest.mark.parametrize("overlap", [True, False], ids=["overlapped", "serial"])
@pytest.mark.parametrize("workers", [4, 5])
def test_node_reduce_equals_one_process(cluster, images, tmp_path, workers, overlap):
    c, nodes = cluster
    config = tiny_config(images, tmp_path / "run", workers=workers, steps=10, batch_size=7, overlap=overlap)
    result = train(config)
    per_node = Counter(p["node_id"] for p in result.placement)
    assert set(per_node) == {n.node_id for n in nodes}, f"not spread over both nodes: {per_node}"
    assert max(per_node.values()) >= 2, "no node had workers to sum"
    assert result.failures == 0
    assert_weights_close(result.model.state_dict(), reference_weights(config), 1e-10, f"{workers} workers")


def test_lost_node_with_its_reducer_is_replaced(cluster, images, tmp_path):
    # last in this module: it removes a node
    c, nodes = cluster
    config = tiny_config(images, tmp_path / "run", workers=4, steps=10, batch_size=8, max_failures=1)
    lost = {}

    def on_step(step, model, placement):
        if step == 4:  # the node of worker 0, with its second worker and its reducer, goes away
            lost["node_id"] = placement[0]["node_id"]
            lost["workers"] = [i for i, p in enumerate(placement) if p["node_id"] == lost["node_id"]]
            c.remove_node(next(n for n in nodes if n.node_id == lost["node_id"]))

    result = train(config, on_step=on_step)
    assert len(lost["workers"]) == 2, f"expected 2 workers on the lost node, got {lost['workers']}"
    assert result.failures == 1, "a lost node counts as one failure, whatever it held"
    survivor = next(n.node_id for n in nodes if n.node_id != lost["node_id"])
    assert [p["node_id"] for p in result.final_placement] == [survivor] * 4
    assert_weights_close(result.model.state_dict(), reference_weights(config), 1e-10, "after losing a node")
