"""Shared pytest settings: float64 oracles, deterministic seeds, run logs kept in a temporary folder,
and nothing left running after the session."""
import contextlib
import os
import sys
import uuid

import pytest
import torch

from ray_support import SESSION_MARK, end_processes, marked_processes


@pytest.fixture(autouse=True, scope="session")
def _nothing_left_running(pytestconfig):
    """Mark this session's environment, which every process it starts inherits (Ray's raylets and
    workers, job subprocesses); at its end, kill -9 whatever carries the mark and still runs, and
    say so on the terminal (the fixtures shut their own Ray down; this is the last net)."""
    os.environ[SESSION_MARK] = uuid.uuid4().hex
    yield
    left = marked_processes()
    if left:
        end_processes(left)
        line = (f"tests: ended {len(left)} process(es) left running: "
                + "; ".join(f"{pid} {command[:80]}" for pid, command in left))
        capture = pytestconfig.pluginmanager.get_plugin("capturemanager")  # past pytest's capture
        with capture.global_and_fixture_disabled() if capture is not None else contextlib.nullcontext():
            print("\n" + line, file=sys.stderr, flush=True)


@pytest.fixture(autouse=True, scope="session")
def _run_logs_in_a_temporary_folder(tmp_path_factory):
    """The quiet console's run logs (pipeline.runtime.console) go under pytest's temporary folder."""
    os.environ.setdefault("N2N_LOG_DIR", str(tmp_path_factory.mktemp("n2n-logs")))
    yield


@pytest.fixture(autouse=True)
def _deterministic_torch():
    torch.manual_seed(0)
    yield
