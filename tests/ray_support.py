"""Ray for tests: a private local Ray (never an existing cluster of the machine, no dashboard),
and a `ray start --head` cluster recorded where only the test looks."""
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
import ray


def _stat(pid: int) -> list[str] | None:
    """The fields of /proc/<pid>/stat after the command name (state first, session fourth); None
    when the process has ended."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None  # ended while we looked


def _alive(pid: int) -> bool:
    fields = _stat(pid)
    return fields is not None and fields[0] != "Z"


def session_processes(session: int) -> list[int]:
    """Live (not zombie) processes of session `session`, read from /proc."""
    pids = []
    for entry in Path("/proc").iterdir():
        fields = _stat(int(entry.name)) if entry.name.isdigit() else None
        if fields is not None and fields[0] != "Z" and int(fields[3]) == session:
            pids.append(int(entry.name))
    return pids


def kill_session(leader: subprocess.Popen, timeout: float = 30) -> None:
    """kill -9 every process of the session that `leader` (started with
    `start_new_session=True`) leads, until none is left, then reap the leader.

    `os.killpg` is not enough for a job that started Ray: Ray puts its worker processes
    in process groups of their own (same session), and those finish what they hold for a
    moment after the driver dies; a test that measures "what landed before the kill" must
    not race them."""
    _kill_until_gone(lambda: session_processes(leader.pid), timeout, f"processes of session {leader.pid}")
    leader.wait()


def _kill_until_gone(live_pids, timeout: float, what: str) -> None:
    """kill -9 the pids `live_pids()` returns, again and again, until it returns none."""
    deadline = time.monotonic() + timeout
    while True:
        pids = live_pids()
        if not pids:
            return
        assert time.monotonic() < deadline, f"{what} survive kill -9: {pids}"
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.05)


# Every process the test session starts (Ray's raylets and workers, job subprocesses) inherits this
# variable from conftest.py, so what outlives its test can be found and ended.
SESSION_MARK = "N2N_TEST_SESSION"


def _environment(pid: int) -> dict[str, str]:
    try:
        raw = Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return {}  # ended while we looked, or not ours to read
    return dict(item.split("=", 1) for item in raw.decode(errors="replace").split("\0") if "=" in item)


def marked_processes(orphaned_ray_workers_only: bool = False) -> list[tuple[int, str]]:
    """(pid, command line) of the live processes that carry this test session's mark, other than
    this one; with `orphaned_ray_workers_only`, just the Ray workers whose raylet is gone."""
    mark = os.environ.get(SESSION_MARK)
    if not mark or not sys.platform.startswith("linux"):
        return []
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid() or not _alive(int(entry.name)):
            continue
        env = _environment(int(entry.name))
        if env.get(SESSION_MARK) != mark:
            continue
        if orphaned_ray_workers_only:
            raylet = env.get("RAY_RAYLET_PID", "")
            if not raylet.isdigit() or _alive(int(raylet)):
                continue
        try:
            command = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
        except OSError:
            continue
        found.append((int(entry.name), command))
    return found


def end_processes(processes: list[tuple[int, str]], timeout: float = 30) -> None:
    """kill -9 each of `processes` until none is alive (a Ray worker can take a moment)."""
    pids = [pid for pid, _ in processes]
    _kill_until_gone(lambda: [pid for pid in pids if _alive(pid)], timeout, "processes")


def end_orphaned_ray_workers() -> list[tuple[int, str]]:
    """Kill the Ray workers of this session whose raylet has gone: `ray.shutdown()` ends the raylet,
    and a worker that was still starting (a Ray Data actor of a denoising job, seen once in the
    suite) may miss that and wait for ever. Returns what it ended."""
    orphans = marked_processes(orphaned_ray_workers_only=True)
    end_processes(orphans)
    return orphans


def private_ray(**options):
    """Generator for a pytest fixture: `yield from private_ray(num_cpus=2)`; always shut down,
    with any of its workers that outlive the shutdown.

    Yields the `ray` module. `options` go to `ray.init` (num_cpus, num_gpus, log_to_driver...).
    """
    ray.init(address="local", include_dashboard=False, **options)
    try:
        yield ray
    finally:
        ray.shutdown()
        end_orphaned_ray_workers()


# Fixtures shared by test modules (import them by name: `from ray_support import ray_cluster`).
@pytest.fixture(scope="module")
def ray_cluster():
    """A private Ray of 2 CPUs for one test module, worker logs not forwarded."""
    yield from private_ray(num_cpus=2, log_to_driver=False)


@pytest.fixture(scope="module")
def ray_cpus():
    """A private Ray of 3 CPUs for one test module (up to 3 one-CPU gradient workers)."""
    yield from private_ray(num_cpus=3)


def worker_cluster(*, node_cpus: int, nodes: int = 2, connect: bool = True):
    """Generator for a pytest fixture: a `ray.cluster_utils.Cluster` of a head without CPUs (only
    the driver talks to it) and `nodes` worker nodes of `node_cpus` CPUs each; yields
    (cluster, worker nodes); always shut down.

    `connect`: this process joins it (training); a bulk job connects by itself. Worker nodes
    inherit this process's environment (start an S3 server first to hand them its settings)."""
    from ray.cluster_utils import Cluster

    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False})
    try:
        added = [c.add_node(num_cpus=node_cpus) for _ in range(nodes)]
        c.wait_for_nodes()
        if connect:
            ray.init(address=c.address)
        yield c, added
    finally:
        ray.shutdown()
        c.shutdown()
        end_orphaned_ray_workers()


def stop_head(proc: subprocess.Popen) -> None:
    """Stop a `ray start --head --block` process of a test: SIGTERM, and kill -9 of its whole
    session if it has not ended within a minute. Never `ray stop` (every Ray of the machine)."""
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        kill_session(proc)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass(frozen=True)
class HeadNode:
    """A `ray start --head` cluster of a test: its GCS address and the environment that finds it."""

    address: str  # HOST:PORT of the GCS, as `ray start` recorded it
    env: dict  # os.environ plus RAY_TMPDIR (where the cluster is recorded), without RAY_ADDRESS
    temp_dir: Path  # RAY_TMPDIR: Ray's session folders of the cluster and of any Ray started with env

    def sessions(self) -> list[str]:
        """Names of the Ray sessions started under temp_dir (the cluster's, and any private Ray's)."""
        return sorted(p.name for p in (self.temp_dir / "ray").glob("session_2*"))


@contextmanager
def ray_start_head(log_path: Path, num_cpus: int = 2):
    """A `ray start --head --block` cluster on free ports, recorded in a private RAY_TMPDIR.

    What `ray start` records (the file Ray's discovery reads) lies in a temporary folder of
    its own, so other Ray clusters of the machine neither see it nor overwrite it. Stopped
    with SIGTERM at the end; never `ray stop`, which would stop every Ray on the machine.
    """
    temp_dir = Path(tempfile.mkdtemp(prefix="n2n-ray-", dir="/tmp"))  # short: Ray's socket paths live under it
    bin_dir = Path(sys.executable).parent
    env = dict(os.environ, RAY_TMPDIR=str(temp_dir), RAY_USAGE_STATS_ENABLED="0",
               PATH=f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}")
    env.pop("RAY_ADDRESS", None)
    port = free_port()
    log = open(log_path, "w")
    proc = subprocess.Popen([str(bin_dir / "ray"), "start", "--head", "--block", f"--port={port}",
                             f"--num-cpus={num_cpus}", "--num-gpus=0", "--include-dashboard=false",
                             # every port that has a fixed default, free ones: other Rays run on this machine
                             f"--dashboard-port={free_port()}", f"--dashboard-agent-listen-port={free_port()}",
                             f"--ray-client-server-port={free_port()}", "--disable-usage-stats"], env=env, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    try:
        record = temp_dir / "ray" / "ray_current_cluster"
        deadline = time.time() + 180
        while not record.exists() or not record.read_text().strip():
            assert proc.poll() is None, f"ray start failed:\n{log_path.read_text()[-3000:]}"
            assert time.time() < deadline, f"ray start recorded no cluster:\n{log_path.read_text()[-3000:]}"
            time.sleep(0.5)
        yield HeadNode(address=record.read_text().strip(), env=env, temp_dir=temp_dir)
    finally:
        stop_head(proc)
        log.close()
        shutil.rmtree(temp_dir, ignore_errors=True)
