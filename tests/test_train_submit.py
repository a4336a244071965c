"""`ray job submit --working-dir . -- python jobs/train.py ...` against a local `ray start --head` cluster."""
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from n2n_core import load_checkpoint
from ray_support import free_port, stop_head
from train_support import make_images

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


@pytest.fixture
def head(tmp_path):
    """A `ray start --head --block` cluster of our own, on free ports; stopped (SIGTERM) at the end.

    Free ports for the dashboard, its agent and the client server: other Rays may run here.

    Never `ray stop`: that would stop every Ray on the machine.
    """
    port, dashboard, agent, client = free_port(), free_port(), free_port(), free_port()
    # Ray starts clusters with token authentication: the head and the job client share the token
    env = dict(os.environ, PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", RAY_USAGE_STATS_ENABLED="0",
               RAY_AUTH_MODE="token")
    env.pop("RAY_ADDRESS", None)
    env.pop("PYTHONPATH", None)  # the job must find the project through its uploaded working dir
    # where `ray start` records the cluster: our own folder, not the machine's /tmp/ray (whose record
    # the job scripts of this machine would otherwise find after this cluster is gone)
    ray_tmp = tempfile.mkdtemp(prefix="n2n-ray-", dir="/tmp")  # short: Ray's socket paths live under it
    env["RAY_TMPDIR"] = ray_tmp
    # the cluster's token, made here (as `ray get-auth-token --generate` would) in a file of this
    # test's own: a fresh machine has no ~/.ray/auth_token, and the user's must not be touched
    token_path = Path(ray_tmp) / "auth_token"
    token_path.touch(mode=0o600)
    token_path.write_text(secrets.token_hex(32))
    env["RAY_AUTH_TOKEN_PATH"] = str(token_path)
    env.pop("RAY_AUTH_TOKEN", None)
    log = open(tmp_path / "head.log", "w")
    proc = subprocess.Popen([str(BIN / "ray"), "start", "--head", "--block", f"--port={port}", "--num-cpus=2",
                             "--include-dashboard=true", "--dashboard-host=127.0.0.1",
                             f"--dashboard-port={dashboard}", f"--dashboard-agent-listen-port={agent}",
                             f"--ray-client-server-port={client}", "--disable-usage-stats"],
                            env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    address = f"http://127.0.0.1:{dashboard}"
    try:
        deadline = time.time() + 180
        while True:
            assert proc.poll() is None, f"ray start failed:\n{(tmp_path / 'head.log').read_text()[-3000:]}"
            ok = subprocess.run([str(BIN / "ray"), "job", "list", "--address", address], env=env,
                                capture_output=True, text=True)
            if ok.returncode == 0:
                break
            assert time.time() < deadline, f"the job API did not come up:\n{ok.stderr[-2000:]}"
            time.sleep(2)
        yield address, env
    finally:
        stop_head(proc)
        log.close()
        shutil.rmtree(ray_tmp, ignore_errors=True)


@pytest.mark.slow
def test_ray_job_submit(head, tmp_path):
    address, env = head
    images = make_images(tmp_path / "images", count=2, size=16)
    out = tmp_path / "run"
    command = [str(BIN / "ray"), "job", "submit", "--address", address, "--working-dir", str(ROOT), "--",
               "python", "jobs/train.py", "--data", str(images), "--out", str(out), "--steps", "3", "--workers", "2",
               "--batch-size", "4", "--crop-size", "8", "--arch-arg", "depth=2", "--arch-arg", "width=8",
               "--validation-images", "1", "--validation-size", "16", "--no-progress"]
    deadline = time.time() + 120
    while True:  # the node's job agent starts a little after the job API answers
        proc = subprocess.run(command, env=env, capture_output=True, text=True, timeout=400, cwd=ROOT)
        if "No available agent" not in proc.stderr or time.time() > deadline:
            break
        time.sleep(3)
    assert proc.returncode == 0, f"ray job submit failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    assert "trained 3 steps on 2 workers" in proc.stdout
    assert "n2n: attached to the Ray cluster at " in proc.stdout and "(RAY_ADDRESS): 1 node, 2 CPUs" in proc.stdout
    assert load_checkpoint(out / "model.n2n").step == 3
    assert (out / "training.png").stat().st_size > 0
