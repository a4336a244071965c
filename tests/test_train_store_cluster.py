"""Training on a 3-node cluster (ray.cluster_utils.Cluster) from and to an object store: S3
(moto's server on loopback) and Google Cloud Storage (gcp-storage-emulator on loopback), see
tests/object_stores.py.

The workers on the two worker nodes read the training images from the bucket themselves:
the nodes inherit the endpoint and credentials from the environment they were started with
(AWS_ENDPOINT_URL_S3, CLOUD_STORAGE_EMULATOR_ENDPOINT, ...), as nodes of a real cluster get
them from their setup, instance profile or service account. The driver writes checkpoints,
metrics and the model to the bucket; the run is stopped after a checkpoint and resumed from
the bucket to the weights of an uninterrupted run.
"""
import pytest

from pipeline.training import train
from object_stores import gcs_server, s3_server, store_cluster
from train_support import assert_weights_close, interrupt_after, make_images, reference_weights, tiny_config

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module", params=["s3", "gs"])
def store(request):
    yield from (s3_server() if request.param == "s3" else gcs_server())


@pytest.fixture(scope="module")
def cluster(store):  # after the store: the nodes start with its environment
    yield from store_cluster(connect=True)


def test_train_from_a_bucket_to_the_bucket_and_resume_on_three_nodes(store, cluster, tmp_path):
    c, nodes = cluster
    data = store.put_folder(make_images(tmp_path / "images"), "data/images")
    config = tiny_config(data, store.uri("runs/cluster"), workers=4, steps=10, checkpoint_every=4, validate_every=5)
    interrupt_after(config, 6)
    assert store.keys("runs/cluster") == ["checkpoints/step-00000004.n2n", "metrics.jsonl", "n2n-run.json"]

    result = train(config.replace(resume=True))
    assert {p["node_id"] for p in result.placement} == {n.node_id for n in nodes}, "workers not on both nodes"
    assert result.steps == 10 and result.failures == 0
    assert_weights_close(result.model.state_dict(), reference_weights(config), 1e-10, "resumed from the bucket")
    assert store.keys("runs/cluster") == ["checkpoints/step-00000004.n2n", "checkpoints/step-00000008.n2n",
                                          "checkpoints/step-00000010.n2n", "metrics.jsonl", "model.n2n",
                                          "n2n-run.json", "training.png"]
