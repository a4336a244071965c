"""Training on a 3-node cluster (ray.cluster_utils.Cluster) from and to S3 (moto's server on loopback).

The workers on the two worker nodes read the training images from s3:// themselves: the
nodes inherit the endpoint and credentials from the environment they were started with
(AWS_ENDPOINT_URL_S3, AWS_ACCESS_KEY_ID, ...), as nodes of a real cluster get them from
their setup or instance profile. The driver writes checkpoints, metrics and the model to
s3://; the run is stopped after a checkpoint and resumed from s3:// to the weights of an
uninterrupted run.
"""
import pytest

from pipeline.training import train
from s3_support import s3_cluster, s3_server
from train_support import assert_weights_close, make_images, reference_weights, tiny_config

pytestmark = pytest.mark.slow


class Stop(Exception):
    pass


@pytest.fixture(scope="module")
def s3():
    yield from s3_server()


@pytest.fixture(scope="module")
def cluster(s3):  # after s3: the nodes start with its environment
    yield from s3_cluster(connect=True)


def test_train_from_s3_to_s3_and_resume_on_three_nodes(s3, cluster, tmp_path):
    c, nodes = cluster
    data = s3.put_folder(make_images(tmp_path / "images"), "data/images")
    config = tiny_config(data, s3.uri("runs/cluster"), workers=4, steps=10, checkpoint_every=4, validate_every=5)

    def stop_after_step_6(step, model, placement):
        if step == 6:
            raise Stop()

    with pytest.raises(Stop):
        train(config, on_step=stop_after_step_6)
    assert s3.keys("runs/cluster") == ["checkpoints/step-00000004.n2n", "metrics.jsonl"]

    result = train(config.replace(resume=True))
    assert {p["node_id"] for p in result.placement} == {n.node_id for n in nodes}, "workers not on both nodes"
    assert result.steps == 10 and result.failures == 0
    assert_weights_close(result.model.state_dict(), reference_weights(config), 1e-10, "resumed from s3")
    assert s3.keys("runs/cluster") == ["checkpoints/step-00000004.n2n", "checkpoints/step-00000008.n2n",
                                       "checkpoints/step-00000010.n2n", "metrics.jsonl", "model.n2n",
                                       "training.png"]
