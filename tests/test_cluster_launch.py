"""A real `ray up` / `ray submit` / `ray down` round trip through Ray's cluster launcher.

The cluster: this machine as the head node of the launcher's `local` provider (head_ip
127.0.0.1, no worker nodes), reached over ssh with a key made here, and set up by
cluster.yaml's own commands, from a copy that differs only in `provider` and `auth` (and
lacks the AWS node types, which the local provider refuses). The head installs the
project with cluster/setup-node.sh, starts Ray with cluster.yaml's start commands, and
the submitted jobs/train.py and jobs/denoise.py must attach to that Ray: their one line
names it, the actors' node ids are its nodes, and no second Ray session appears.

Isolation: cluster.yaml's start commands run `ray stop`, which stops every Ray process it
can see. The head node is a PID + network + mount namespace of its own, with an sshd
started inside (host key, config and authorized key made here): everything started over
ssh lives there, `ray stop` sees only those processes, ports 22, 6379, 8265... clash with
no other Ray of the machine, and /tmp, /dev/shm and the home directory are private. The
client (`ray up`, `ray submit`...) is a second namespace that shares only the head's
network, as a laptop would be another machine. Before anything runs, the test checks that
the head namespace cannot see a process of the machine named `raylet` (a copy of `sleep`
started here), and at the end that this process survived every `ray stop`. Killing each
namespace's first process ends whatever is left inside.

Packages: the namespaces have no network, so the head's pip installs from a wheelhouse the
test downloads first with this environment's pip (PIP_NO_INDEX and PIP_FIND_LINKS, given to
ssh sessions by the sshd config): the stand-in for a cloud node's access to PyPI.

What this cannot show about AWS: instances, AMI, IAM profiles, S3, GPUs and worker nodes
joining (the local provider here has the head only, and no CUDA).
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import tomllib
from pathlib import Path

import pytest
import yaml

from launch_support import Namespace, missing_tools, sshd_binary
from n2n_core import load_checkpoint
from train_support import make_images

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
NODE_PARTS = ("setup.cfg", "pyproject.toml", "README.md", "n2n_core", "pipeline", "jobs", "cluster")
ATTACHED = re.compile(r"n2n: attached to the Ray cluster at 127\.0\.0\.1:6379 \(the cluster of the last `ray start` "
                      r"on this node\): 1 node, \d+ CPUs, 0 GPUs")


def test_cluster_yaml_round_trip():
    if os.geteuid() != 0:
        pytest.skip("needs root: Linux namespaces isolate the launched cluster (CI runs as root)")
    assert not missing_tools(), f"missing {missing_tools()}: apt-get install openssh-server rsync iproute2 (.ci/run does)"
    work = Path(tempfile.mkdtemp(prefix="n2n-launch-", dir="/var/tmp"))  # not under /tmp: the namespaces hide /tmp
    head = client = sentinel = None
    try:
        sentinel = start_sentinel(work)
        keys = make_keys(work)
        home = make_home(work)
        project = copy_project(work)
        yaml_path = project / "cluster.yaml"
        write_test_cluster_yaml(yaml_path, private_key=keys / "id_ed25519")
        python3 = head_python_version()
        t0 = time.time()
        wheels = download_wheelhouse(work, python3)
        download = time.time() - t0
        write_sshd_config(work, keys, wheels)

        head = Namespace("head", work).start(head_setup(work, home))
        names = head.process_names()
        assert "raylet" not in names and len(names) < 10, f"the head namespace sees the machine's processes: {names}"
        assert "sshd" in names
        for name in ("client-tmp", "client-home"):
            (work / name).mkdir()
        client = Namespace("client", work).start(f"mount --bind {work / 'client-tmp'} /tmp", join_net_of=head)

        env = client_env(work)

        def launcher(*args, timeout=600) -> str:
            done = client.run(["ray", *args], env=env, cwd=project, timeout=timeout)
            output = done.stdout + done.stderr
            assert done.returncode == 0, f"ray {' '.join(args)} failed ({done.returncode}):\n{output[-6000:]}"
            return output

        def head_sessions() -> list[str]:
            done = head.run(["bash", "-c", "ls /tmp/ray | grep '^session_2' || true"])
            return done.stdout.split()

        # -- ray up: setup (the project and its pinned packages into ~/n2n-venv), ray start
        t0 = time.time()
        up = launcher("up", "-y", str(yaml_path), timeout=2400)
        first_up = time.time() - t0
        assert "n2n setup: ready (ray 2.60.0, torch 2.13.0" in up
        assert "Ray runtime started." in up
        assert head.process_names().count("gcs_server") == 1
        sessions = head_sessions()
        assert len(sessions) == 1, sessions

        # -- data to the head, as `ray rsync-up` does it (S3 on AWS)
        images = make_images(work / "images", count=3, size=16)
        launcher("exec", str(yaml_path), "mkdir -p ~/data")
        launcher("rsync-up", str(yaml_path), f"{images}/", "~/data/images/")

        # -- ray submit jobs/train.py: it attaches to the cluster, trains, writes checkpoints
        train = launcher("submit", str(yaml_path), "jobs/train.py", "--", "--data", "~/data/images",
                         "--out", "~/runs/a", "--steps", "3", "--workers", "2", "--batch-size", "4",
                         "--crop-size", "8", "--arch-arg", "depth=2", "--arch-arg", "width=8",
                         "--validation-images", "1", "--validation-size", "16", "--checkpoint-every", "1",
                         "--keep-checkpoints", "5", "--no-progress")
        assert ATTACHED.search(train), train[-4000:]
        assert "trained 3 steps on 2 workers" in train
        actor_nodes = set(re.findall(r"\d+ on [^ ,]+ \(node ([0-9a-f]{12})\)", train))  # the driver's line
        (home / "nodes.py").write_text("import ray\nray.init()\nprint('NODES', *[n['NodeID'] for n in ray.nodes()])\n")
        cluster_nodes = set(re.search(r"NODES (.*)", launcher("exec", str(yaml_path), "python ~/nodes.py"))
                            .group(1).split())
        assert actor_nodes and actor_nodes <= {n[:12] for n in cluster_nodes}, (actor_nodes, cluster_nodes)
        assert head_sessions() == sessions, "the training job started a second Ray"
        run = home / "runs" / "a"
        assert sorted(p.name for p in (run / "checkpoints").glob("step-*.n2n")) == [
            "step-00000001.n2n", "step-00000002.n2n", "step-00000003.n2n"]
        assert load_checkpoint(run / "model.n2n").step == 3

        # -- results back to this side with `ray rsync-down`
        (work / "results").mkdir()
        launcher("rsync-down", str(yaml_path), "~/runs/a/", f"{work / 'results' / 'a'}/")
        assert (work / "results" / "a" / "model.n2n").read_bytes() == (run / "model.n2n").read_bytes()

        # -- ray submit jobs/denoise.py with the model just trained
        denoise = launcher("submit", str(yaml_path), "jobs/denoise.py", "--", "~/data/images", "~/denoised",
                           "--model", "~/runs/a/model.n2n", "--workers", "1", "--no-progress")
        assert ATTACHED.search(denoise), denoise[-4000:]
        assert "3 inputs: 3 done, 0 skipped, 0 failed" in denoise
        assert sorted(p.name for p in (home / "denoised").glob("*.png")) == ["img0.png", "img1.png", "img2.png"]
        statuses = [json.loads(line)["status"] for line in (home / "denoised" / "_manifest.jsonl").read_text().splitlines()]
        assert statuses == ["done"] * 3
        assert head_sessions() == sessions, "the denoise job started a second Ray"

        # -- a code change and `ray up` again: the change is copied, setup reruns but skips pip
        marker = "# changed after the first ray up"
        with open(project / "jobs" / "train.py", "a") as f:
            f.write(f"\n{marker}\n")
        t0 = time.time()
        again = launcher("up", "-y", str(yaml_path), timeout=1200)
        second_up = time.time() - t0
        assert "n2n setup: requirements unchanged since the last install, pip skipped" in again
        assert marker in (home / "n2n" / "jobs" / "train.py").read_text()
        assert "NODES" in launcher("exec", str(yaml_path), "python ~/nodes.py")
        print(f"wheelhouse {download:.0f} s; first ray up {first_up:.0f} s (with the install), "
              f"second {second_up:.0f} s (setup without pip)")

        # -- ray down: the head's Ray processes end
        launcher("down", "-y", str(yaml_path))
        deadline = time.time() + 60
        while {"raylet", "gcs_server"} & set(head.process_names()):
            assert time.time() < deadline, f"Ray still runs after ray down: {head.process_names()}"
            time.sleep(2)
    finally:
        for namespace in (client, head):
            if namespace is not None:
                namespace.close()
        if sentinel is not None:
            alive = sentinel.poll() is None
            sentinel.kill()
            sentinel.wait()
            assert alive, "a process of the machine named raylet was killed: the isolation failed"
        shutil.rmtree(work, ignore_errors=True)


def start_sentinel(work: Path) -> subprocess.Popen:
    """A process of the machine that `ray stop` would kill if it could see it: `sleep` named raylet."""
    binary = work / "raylet"
    shutil.copy(shutil.which("sleep"), binary)
    return subprocess.Popen([str(binary), "3600"])


def make_keys(work: Path) -> Path:
    keys = work / "ssh"
    keys.mkdir()
    for name in ("host_ed25519", "id_ed25519"):
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", f"n2n-test-{name}", "-f", str(keys / name)],
                       check=True)
    shutil.copy(keys / "id_ed25519.pub", keys / "authorized_keys")
    return keys


def make_home(work: Path) -> Path:
    """The head's home directory for root, seeded like a new account's (/etc/skel)."""
    home = work / "home"
    home.mkdir()
    for name in (".bashrc", ".profile"):
        if Path("/etc/skel", name).exists():
            shutil.copy(Path("/etc/skel", name), home / name)
    passwd = Path("/etc/passwd").read_text().splitlines()
    root = [line.split(":") for line in passwd if line.startswith("root:")][0]
    root[5] = str(home)
    (work / "passwd").write_text("\n".join(":".join(root) if line.startswith("root:") else line for line in passwd) + "\n")
    return home


def copy_project(work: Path) -> Path:
    """What cluster.yaml's file mounts take from a checkout, and cluster.yaml: a user's project folder."""
    project = work / "project"
    project.mkdir()
    for name in NODE_PARTS:
        source = ROOT / name
        if source.is_dir():
            shutil.copytree(source, project / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy(source, project / name)
    return project


def write_test_cluster_yaml(path: Path, *, private_key: Path) -> dict:
    """cluster.yaml with the local provider (this machine as head, no workers) and our ssh key."""
    config = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    config["provider"] = {"type": "local", "head_ip": "127.0.0.1", "worker_ips": []}
    config["auth"] = {"ssh_user": "root", "ssh_private_key": str(private_key)}
    del config["available_node_types"], config["head_node_type"]  # AWS instance types; `local` refuses them
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    original = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    unchanged = {k: v for k, v in original.items() if k not in ("provider", "auth", "available_node_types",
                                                               "head_node_type")}
    assert {k: config[k] for k in unchanged} == unchanged
    return config


def head_python_version() -> tuple[int, int]:
    """The version of the python3 a login shell of the head finds (the one setup-node.sh uses)."""
    done = subprocess.run(["env", "-i", "HOME=/nonexistent", "bash", "--login", "-c",
                           "python3 -c 'import sys; print(*sys.version_info[:2])'"],
                          capture_output=True, text=True, timeout=60, check=True)
    major, minor = done.stdout.split()
    return int(major), int(minor)


def download_wheelhouse(work: Path, python3: tuple[int, int]) -> Path:
    """Every package the head's setup installs (the project with its 'cluster' extra, build tools)."""
    wheels = work / "wheels"
    build = tomllib.loads((ROOT / "pyproject.toml").read_text())["build-system"]["requires"]
    command = [sys.executable, "-m", "pip", "download", "--quiet", "--dest", str(wheels), f"{ROOT}[cluster]", *build]
    if python3 != sys.version_info[:2]:
        command += ["--only-binary=:all:", "--python-version", f"{python3[0]}.{python3[1]}"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=1800)
    assert done.returncode == 0, f"pip download failed:\n{done.stderr[-3000:]}"
    return wheels


def write_sshd_config(work: Path, keys: Path, wheels: Path) -> None:
    (work / "sshd_config").write_text(f"""\
ListenAddress 127.0.0.1
Port 22
HostKey {keys / 'host_ed25519'}
AuthorizedKeysFile {keys / 'authorized_keys'}
PidFile {work / 'sshd.pid'}
PermitRootLogin prohibit-password
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
StrictModes no
MaxSessions 64
MaxStartups 64:30:128
Subsystem sftp internal-sftp
SetEnv PIP_NO_INDEX=1 PIP_FIND_LINKS={wheels} PIP_DISABLE_PIP_VERSION_CHECK=1 RAY_USAGE_STATS_ENABLED=0
""")


def head_setup(work: Path, home: Path) -> str:
    """The head namespace's first step: loopback up, private /tmp, /dev/shm and /run, root's home, sshd."""
    return f"""
ip link set lo up
mount -t tmpfs tmpfs /tmp
mount -t tmpfs tmpfs /dev/shm
mount -t tmpfs tmpfs /run
mkdir -p /run/sshd
mount --bind {work / 'passwd'} /etc/passwd
{sshd_binary()} -f {work / 'sshd_config'} -E {work / 'sshd.log'}
"""


def client_env(work: Path) -> dict:
    """The environment of the launcher commands: this project's Ray on PATH, a home of their own."""
    env = dict(os.environ, HOME=str(work / "client-home"), RAY_USAGE_STATS_ENABLED="0",
               PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    for name in ("RAY_ADDRESS", "RAY_TMPDIR", "PYTHONPATH"):
        env.pop(name, None)
    return env
