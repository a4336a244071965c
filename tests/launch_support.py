"""Linux namespaces for a real `ray up` on this machine (tests/test_cluster_launch.py).

`Namespace.start(setup)` runs `setup` (bash) as the first step of a new PID + mount (+
network) namespace whose first process then only reaps orphans (so processes that
`ray stop` ends do not linger as zombies); `run` executes a command inside it with
nsenter; `close` kills its first process, which makes the kernel end every process of the
namespace, and its mounts go with it. Needs root (unshare, nsenter).
"""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

TOOLS = ("unshare", "nsenter", "ip", "sshd", "ssh", "ssh-keygen", "rsync")

# The namespace's first process: run the setup, report its status, then reap orphans forever.
INIT = r"""
import os, subprocess, sys, time
status = subprocess.run(["bash", "-euc", sys.argv[1]]).returncode
with open(sys.argv[2], "w") as f:
    f.write(str(status))
if status:
    sys.exit(status)
while True:
    try:
        os.wait()
    except ChildProcessError:
        time.sleep(0.5)
"""


def missing_tools() -> list[str]:
    path = os.environ.get("PATH", "") + os.pathsep + "/usr/sbin" + os.pathsep + "/sbin"
    return [tool for tool in TOOLS if shutil.which(tool, path=path) is None]


def sshd_binary() -> str:
    return shutil.which("sshd", path=os.environ.get("PATH", "") + ":/usr/sbin:/sbin")


class Namespace:
    """A PID + mount namespace (+ a network namespace, or that of `join_net_of`)."""

    def __init__(self, name: str, workdir: Path):
        self.name, self.workdir = name, workdir
        self.proc: subprocess.Popen | None = None
        self.pid: int | None = None  # the host pid of the namespace's first process
        self.log = workdir / f"{name}-init.log"

    def start(self, setup: str, *, join_net_of: "Namespace | None" = None, timeout: float = 60) -> "Namespace":
        ready = self.workdir / f"{self.name}.ready"
        unshare = ["unshare", "--pid", "--fork", "--mount-proc", "--mount", "--propagation", "private"]
        if join_net_of is None:
            unshare.append("--net")
            command = unshare
        else:  # the network of another namespace: nsenter execs unshare inside it
            command = ["nsenter", "-t", str(join_net_of.pid), "--net", "--"] + unshare
        with open(self.log, "w") as log:
            self.proc = subprocess.Popen(command + [sys.executable, "-c", INIT, setup, str(ready)],
                                         stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.time() + timeout
        while not ready.exists():
            if self.proc.poll() is not None or time.time() > deadline:
                raise RuntimeError(f"namespace {self.name} did not start:\n{self.log.read_text()[-3000:]}")
            time.sleep(0.1)
        status = ready.read_text().strip()
        if status != "0":
            raise RuntimeError(f"namespace {self.name}: setup failed ({status}):\n{self.log.read_text()[-3000:]}")
        children = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children").read_text().split()
        assert len(children) == 1, f"unshare of {self.name} has children {children}"
        self.pid = int(children[0])
        return self

    def run(self, args: list[str], *, env: dict | None = None, cwd: Path | None = None,
            timeout: float = 600) -> subprocess.CompletedProcess:
        """`args` inside the namespace (its processes, mounts and network), output captured as text."""
        command = ["nsenter", "-t", str(self.pid), "--pid", "--mount", "--net"]
        if cwd is not None:
            command.append(f"--wd={cwd}")
        return subprocess.run(command + ["--"] + args, env=env, capture_output=True, text=True, timeout=timeout)

    def process_names(self) -> list[str]:
        """Names of the processes inside, as psutil (what `ray stop` uses) lists them there."""
        probe = "import json, ray, psutil; print(json.dumps([p.name() for p in psutil.process_iter()]))"
        done = self.run([sys.executable, "-c", probe], timeout=120)
        assert done.returncode == 0, done.stderr[-2000:]
        import json

        return json.loads(done.stdout.strip().splitlines()[-1])

    def close(self) -> None:
        """Kill the first process: the kernel then ends every process of the namespace."""
        if self.pid is not None:
            try:
                os.kill(self.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if self.proc is not None:
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
