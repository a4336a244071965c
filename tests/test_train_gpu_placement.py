"""GPU placement without a GPU: a Ray instance with logical GPUs (num_gpus=2).

Its actors run with N2N_LOGICAL_GPUS=1, the documented switch that lets a GPU actor
compute on the CPU (pipeline.runtime.cuda); without it such an actor is an error. Skipped where
torch sees a real GPU: there an actor's CUDA works (it does not fall back to the CPU,
nor fail as these tests expect), and two logical GPUs on a one-GPU machine would point
an actor at a device that does not exist. tests/test_cuda_paths.py and bench/gpu_check.sh
cover such a machine.
"""
import logging
import threading
import time

import pytest
import ray
import torch

from pipeline.runtime.cuda import LOGICAL_GPUS_ENV
from pipeline.training import train
from pipeline.training.placement import PlacementError
from pipeline.training.worker import GradientWorker
from train_support import make_images, tiny_config
from ray_support import private_ray

pytestmark = pytest.mark.skipif(torch.cuda.is_available(),
                                reason="placement on logical GPUs needs a machine without a real one")


@pytest.fixture(scope="module")
def ray_gpus():
    yield from private_ray(num_cpus=2, num_gpus=2, runtime_env={"env_vars": {LOGICAL_GPUS_ENV: "1"}})


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    return make_images(tmp_path_factory.mktemp("images"), count=2, size=16)


def test_one_gpu_per_worker(ray_gpus, images, tmp_path):
    result = train(tiny_config(images, tmp_path / "run", device="auto", steps=2, batch_size=4, workers=0))
    assert result.workers == 2  # default: one worker per GPU
    gpu_ids = [tuple(p["gpu_ids"]) for p in result.placement]
    visible = [p["cuda_visible_devices"] for p in result.placement]
    assert all(len(ids) == 1 for ids in gpu_ids), gpu_ids
    assert len(set(gpu_ids)) == 2, f"workers share a GPU: {gpu_ids}"
    assert sorted(visible) == sorted(ids[0] for ids in gpu_ids), (visible, gpu_ids)
    # the placement group and actors are gone after the run: all GPUs free again
    deadline = time.time() + 10
    while ray.available_resources().get("GPU", 0) < 2 and time.time() < deadline:
        time.sleep(0.2)
    assert ray.available_resources().get("GPU", 0) == 2


def test_more_gpus_than_the_cluster_has_waits_for_the_autoscaler_then_says_why(ray_gpus, images, tmp_path, caplog):
    # the cluster may still grow (an autoscaler adds nodes): the driver waits up to start_timeout, then stops
    t0 = time.time()
    with caplog.at_level(logging.WARNING, logger="pipeline.training.placement"):
        with pytest.raises(PlacementError, match=r"could not reserve 3 bundles .* within 2 s: the cluster has 2 GPUs"):
            train(tiny_config(images, tmp_path / "run", device="auto", steps=2, batch_size=4, workers=3,
                              start_timeout=2.0))
    assert 2 <= time.time() - t0 < 30
    assert "asked for 3 GPU workers but the Ray cluster has 2 GPUs now: waiting up to 2 s" in caplog.text
    # nothing is left reserved, and the standing request to the autoscaler is withdrawn
    deadline = time.time() + 10
    while ray.available_resources().get("GPU", 0) < 2 and time.time() < deadline:
        time.sleep(0.2)
    assert ray.available_resources().get("GPU", 0) == 2


def test_busy_gpus_time_out_with_a_clear_error(ray_gpus, images, tmp_path):
    hog = ray.util.placement_group([{"GPU": 1}])  # one of the two GPUs taken by someone else
    ray.get(hog.ready())
    try:
        with pytest.raises(PlacementError, match=r"within 1 s: the cluster has 2 GPUs, 1 free"):
            train(tiny_config(images, tmp_path / "run", device="auto", steps=2, batch_size=4, workers=2,
                              start_timeout=1.0))
    finally:
        ray.util.remove_placement_group(hog)


def test_a_gpu_actor_without_usable_cuda_is_an_error(ray_gpus, images, tmp_path):
    """No quiet CPU fallback: the actor holds a Ray GPU, CUDA does not work, the switch is off."""
    config = tiny_config(images, tmp_path / "run", device="auto")
    strict = ray.remote(GradientWorker).options(num_gpus=1, num_cpus=0, runtime_env={"env_vars": {LOGICAL_GPUS_ENV: "0"}})
    actor = strict.remote(config)
    try:
        with pytest.raises(ray.exceptions.RayActorError, match=r"holds Ray GPU \['?\d'?\] on host .* but CUDA is not usable"):
            ray.get(actor.describe.remote(), timeout=120)
    finally:
        ray.kill(actor)
    # the switch on (the module's Ray): the same actor computes on the CPU
    allowed = ray.remote(GradientWorker).options(num_gpus=1, num_cpus=0).remote(config)
    try:
        assert ray.get(allowed.describe.remote(), timeout=120)["device"] == "cpu"
    finally:
        ray.kill(allowed)


def test_a_gpu_freed_while_waiting_is_taken(ray_gpus, images, tmp_path):
    hog = ray.util.placement_group([{"GPU": 1}])
    ray.get(hog.ready())
    release = threading.Timer(3.0, ray.util.remove_placement_group, args=(hog,))
    release.start()
    try:
        result = train(tiny_config(images, tmp_path / "run", device="auto", steps=2, batch_size=4, workers=2,
                                   start_timeout=120.0))
    finally:
        release.join()
    assert result.steps == 2 and len({tuple(p["gpu_ids"]) for p in result.placement}) == 2
