"""A worker node that joins after the driver started waiting for it (as an autoscaled node does)."""
import logging
import threading

import pytest
import ray
from ray.cluster_utils import Cluster

from pipeline.training import train
from train_support import assert_weights_close, make_images, reference_weights, tiny_config


class _Saw(logging.Handler):
    """Sets `event` when a log record contains `text`."""

    def __init__(self, text: str):
        super().__init__()
        self.text, self.event = text, threading.Event()

    def emit(self, record):
        if self.text in record.getMessage():
            self.event.set()


@pytest.mark.slow
def test_training_waits_for_a_node_that_joins_late(tmp_path):
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False})
    saw = _Saw("waiting for 2 workers: 1 of 2 not started yet")
    logger = logging.getLogger("pipeline.training.placement")
    logger.addHandler(saw)
    logger.setLevel(logging.INFO)
    joined, outcome = {}, {}

    def run(config):
        try:
            outcome["result"] = train(config)
        except BaseException as e:  # reported below
            outcome["error"] = e

    try:
        first = c.add_node(num_cpus=2)
        c.wait_for_nodes()
        ray.init(address=c.address)
        # two workers of 2 CPUs each: only one fits until a second node arrives
        config = tiny_config(make_images(tmp_path / "images"), tmp_path / "run", workers=2, steps=6,
                             cpus_per_worker=2, start_timeout=300)
        driver = threading.Thread(target=run, args=(config,))  # Cluster.add_node needs the main thread
        driver.start()
        if saw.event.wait(timeout=300):  # the driver is waiting: now the node "boots"
            joined["node"] = c.add_node(num_cpus=2)
        driver.join(timeout=600)
    finally:
        logger.removeHandler(saw)
        ray.shutdown()
        c.shutdown()
    assert saw.event.is_set() and "node" in joined, "the driver never said it was waiting"
    assert "error" not in outcome, f"training failed: {outcome.get('error')!r}"
    result = outcome["result"]
    assert {p["node_id"] for p in result.placement} == {first.node_id, joined["node"].node_id}
    assert result.steps == 6 and result.failures == 0
    assert_weights_close(result.model.state_dict(), reference_weights(config), 1e-10, "after a late node")
