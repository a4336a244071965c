"""Shared pytest settings: float64 oracles, deterministic seeds, run logs kept in a temporary folder."""
import os

import pytest
import torch


@pytest.fixture(autouse=True, scope="session")
def _run_logs_in_a_temporary_folder(tmp_path_factory):
    """The quiet console's run logs (pipeline.runtime.console) go under pytest's temporary folder."""
    os.environ.setdefault("N2N_LOG_DIR", str(tmp_path_factory.mktemp("n2n-logs")))
    yield


@pytest.fixture(autouse=True)
def _deterministic_torch():
    torch.manual_seed(0)
    yield
