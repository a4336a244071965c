"""Connecting to Ray (pipeline.runtime.ray_session): the job scripts attach to the cluster of their node.

Against a real `ray start --head` cluster recorded in a private RAY_TMPDIR: Ray's discovery
(`--address discover`, the default of jobs/*.py) attaches to it and says so, the `n2n`
default (no --address) starts a private Ray and says so, and a recorded cluster that no
longer answers is a clear error within seconds instead of ray.init's minutes of retries.
"""
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import ray

from pipeline.runtime.ray_session import DISCOVER, RayConnectionError, Target, connect, resolve
from ray_support import free_port, ray_start_head
from train_support import make_images

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def head(tmp_path_factory):
    with ray_start_head(tmp_path_factory.mktemp("head") / "head.log") as node:
        yield node


@pytest.fixture
def on_head_node(head, monkeypatch):
    """This process sees what a process on the head node sees: the cluster `ray start` recorded."""
    monkeypatch.setenv("RAY_TMPDIR", str(head.temp_dir))
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    yield head
    ray.shutdown()


def test_resolve_without_ray_start(tmp_path, monkeypatch):
    monkeypatch.setenv("RAY_TMPDIR", str(tmp_path))  # nothing recorded here
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert resolve(None) == Target(None, "no --address and no RAY_ADDRESS")
    assert resolve(DISCOVER) == Target(None, "no RAY_ADDRESS and no `ray start` cluster on this node")
    assert resolve("10.0.0.7:6379") == Target("10.0.0.7:6379", "--address", init_address="10.0.0.7:6379")
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.8:6379")
    assert resolve(None) == Target("10.0.0.8:6379", "RAY_ADDRESS", init_address=None)
    assert resolve(DISCOVER) == Target("10.0.0.8:6379", "RAY_ADDRESS", init_address=None)
    assert resolve("local").address is None  # "local" ignores RAY_ADDRESS
    monkeypatch.setenv("RAY_ADDRESS", "local")
    assert resolve(None) == resolve(DISCOVER) == Target(None, "RAY_ADDRESS=local")


def test_discover_attaches_to_the_cluster_of_this_node(on_head_node):
    lines, sessions = [], on_head_node.sessions()
    assert connect(DISCOVER, say=lines.append) is True
    assert ray.get_runtime_context().gcs_address == on_head_node.address
    assert lines == [f"n2n: attached to the Ray cluster at {on_head_node.address} (the cluster of the last "
                     f"`ray start` on this node): 1 node, 2 CPUs, 0 GPUs"]
    assert on_head_node.sessions() == sessions and len(sessions) == 1, "a second Ray was started"


def test_the_cli_default_keeps_a_private_ray_and_says_so(on_head_node):
    lines = []
    assert connect(None, say=lines.append) is True
    assert ray.get_runtime_context().gcs_address != on_head_node.address
    assert len(lines) == 1 and lines[0].startswith(
        "n2n: started a private Ray in this process (no --address and no RAY_ADDRESS): 1 node, ")
    assert "pass --address auto to use the Ray cluster running on this node" in lines[0]


def test_a_recorded_cluster_that_is_gone_is_a_quick_clear_error(tmp_path, monkeypatch):
    (tmp_path / "ray").mkdir()
    gone = f"127.0.0.1:{free_port()}"
    (tmp_path / "ray" / "ray_current_cluster").write_text(gone)
    monkeypatch.setenv("RAY_TMPDIR", str(tmp_path))
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    t0 = time.time()
    with pytest.raises(RayConnectionError, match=r"no Ray cluster answers at .*:\d+ \(the cluster of the last "
                                                 r"`ray start` on this node\).*--address local"):
        connect(DISCOVER)
    with pytest.raises(RayConnectionError, match=rf"no Ray cluster answers at {gone} \(--address\)"):
        connect(gone)
    assert time.time() - t0 < 30
    assert not ray.is_initialized()


def test_cli_names_an_unreachable_address_in_one_line(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    env.pop("RAY_ADDRESS", None)
    gone = f"127.0.0.1:{free_port()}"
    images = make_images(tmp_path / "images", count=2, size=16)
    proc = subprocess.run([sys.executable, "-m", "pipeline.cli", "denoise", str(images), str(tmp_path / "out"),
                           "--address", gone, "--no-progress"], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2  # the command cannot run as given; nothing was written
    assert proc.stderr.strip().splitlines()[-1].startswith(f"Error: no Ray cluster answers at {gone} (--address)")
    assert "Traceback" not in proc.stderr


@pytest.mark.slow
def test_jobs_train_attaches_to_the_cluster_of_its_node(head, tmp_path):
    """jobs/train.py without --address, as `ray submit` runs it on a head node: it joins that cluster."""
    images = make_images(tmp_path / "images", count=2, size=16)
    env, sessions = dict(head.env, PYTHONPATH=str(ROOT)), head.sessions()
    proc = subprocess.run([sys.executable, str(ROOT / "jobs" / "train.py"), "--data", str(images),
                           "--out", str(tmp_path / "run"), "--steps", "2", "--workers", "2", "--batch-size", "4",
                           "--crop-size", "8", "--arch-arg", "depth=2", "--arch-arg", "width=8", "--device", "cpu",
                           "--validation-images", "1", "--validation-size", "16", "--no-progress"],
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (f"n2n: attached to the Ray cluster at {head.address} (the cluster of the last `ray start` on this "
            f"node): 1 node, 2 CPUs, 0 GPUs") in proc.stderr
    assert "trained 2 steps on 2 workers" in proc.stdout
    worker_nodes = set(re.findall(r"\d+ on [^ ,]+ \(node ([0-9a-f]{12})\)", proc.stderr))  # the driver's line
    query = subprocess.run([sys.executable, "-c", "import ray; ray.init(); print(*[n['NodeID'] for n in ray.nodes()])"],
                           env=env, capture_output=True, text=True, timeout=300)
    assert query.returncode == 0, query.stderr[-2000:]
    assert worker_nodes and worker_nodes <= {n[:12] for n in query.stdout.split()}, (worker_nodes, query.stdout)
    assert head.sessions() == sessions, "the job started a second Ray"
