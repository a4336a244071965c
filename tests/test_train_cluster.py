"""Placement on a multi-node cluster (ray.cluster_utils.Cluster) and losing a node mid-run."""
import pytest

from pipeline.training import train
from ray_support import worker_cluster
from train_support import assert_weights_close, make_images, reference_weights, tiny_config


@pytest.fixture
def cluster():
    # a head without CPUs (only the driver talks to it) and two 2-CPU worker nodes
    yield from worker_cluster(node_cpus=2)


@pytest.mark.slow
def test_actors_spread_over_nodes_and_a_lost_node_is_replaced(cluster, tmp_path):
    c, nodes = cluster
    images = make_images(tmp_path / "images")
    config = tiny_config(images, tmp_path / "run", workers=2, steps=12, batch_size=6, checkpoint_every=100,
                         start_timeout=120)
    victim = {}

    def on_step(step, model, placement):
        if step == 4:  # remove the node of worker 1 after 4 steps
            victim["node_id"] = placement[1]["node_id"]
            c.remove_node(next(n for n in nodes if n.node_id == victim["node_id"]))

    result = train(config, on_step=on_step)

    # the two actors started on the two worker nodes, one each
    assert {p["node_id"] for p in result.placement} == {n.node_id for n in nodes}
    # the removal was noticed, the lost worker replaced on the surviving node
    assert result.failures >= 1, "the node removal went unnoticed"
    survivor = next(n.node_id for n in nodes if n.node_id != victim["node_id"])
    assert [p["node_id"] for p in result.final_placement] == [survivor, survivor]
    # and the run is the uninterrupted one
    assert_weights_close(result.model.state_dict(), reference_weights(config), 1e-10, "after losing a node")
