"""The suite's last net (conftest.py, ray_support.py): processes that carry the test session's mark
and outlive their test are found and ended; nothing else is touched."""
import os
import subprocess
import sys
import time

import pytest

from ray_support import SESSION_MARK, _alive, end_orphaned_ray_workers, marked_processes

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")


def _sleeper(**env) -> subprocess.Popen:
    base = {k: v for k, v in os.environ.items() if k not in (SESSION_MARK, "RAY_RAYLET_PID")}
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"], env={**base, **env})
    deadline = time.monotonic() + 10
    while not os.path.exists(f"/proc/{proc.pid}/environ") and time.monotonic() < deadline:
        time.sleep(0.01)
    return proc


def test_an_orphaned_ray_worker_of_this_session_is_ended_and_nothing_else():
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()  # a raylet that has ended: its pid is free
    mark = os.environ[SESSION_MARK]
    orphan = _sleeper(**{SESSION_MARK: mark, "RAY_RAYLET_PID": str(gone.pid)})
    served = _sleeper(**{SESSION_MARK: mark, "RAY_RAYLET_PID": str(os.getpid())})  # its raylet lives
    foreign = _sleeper(RAY_RAYLET_PID=str(gone.pid))  # not this session's
    try:
        assert orphan.pid in [pid for pid, _ in marked_processes(orphaned_ray_workers_only=True)]
        ended = [pid for pid, _ in end_orphaned_ray_workers()]
        orphan.wait(timeout=10)
        assert orphan.pid in ended and served.pid not in ended and foreign.pid not in ended
        assert _alive(served.pid) and _alive(foreign.pid)
        assert served.pid in [pid for pid, _ in marked_processes()]  # the session's end would end it
        assert foreign.pid not in [pid for pid, _ in marked_processes()]
    finally:
        for proc in (orphan, served, foreign):
            proc.kill()
            proc.wait()
