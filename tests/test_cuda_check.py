"""The CUDA check of GPU actors and of a GPU node's setup (pipeline.runtime.cuda), on a machine without CUDA."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pipeline.runtime.cuda import LOGICAL_GPUS_ENV, cuda_problem
from pipeline.inference.worker import _actor_device

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the behaviour without usable CUDA")


def test_node_setup_check_fails_without_cuda():
    """cluster.yaml's worker setup runs `python -m pipeline.runtime.cuda`: exit 1 and the reason, so the node fails."""
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, "-m", "pipeline.runtime.cuda"], env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 1
    assert proc.stderr.strip() == f"n2n: CUDA is not usable on this node: {cuda_problem()}"
    assert "Traceback" not in proc.stderr


def test_a_denoise_actor_with_a_gpu_but_no_cuda_is_an_error(monkeypatch):
    monkeypatch.delenv(LOGICAL_GPUS_ENV, raising=False)
    assert _actor_device("cpu") == "cpu"
    with pytest.raises(RuntimeError, match=r"holds a Ray GPU on host .* but CUDA is not usable there: "):
        _actor_device("cuda")
    monkeypatch.setenv(LOGICAL_GPUS_ENV, "1")  # the documented switch for tests with logical GPUs
    assert _actor_device("cuda") == "cpu"
