"""Is a local OUT shared by every node that runs actors?

Actors write their outputs themselves. When OUT is a local path and an actor can run on
a node other than the driver's, OUT must be on storage that node sees at the same path (a
shared mount); otherwise outputs would land on that node's own disk and vanish with it,
while the driver's manifest says nothing of them. So before any actor starts the driver
writes a marker with a fresh random token into its run's staging folder,
`OUT/_n2n_tmp/<run>/shared-check`, and one task pinned to each node that can hold an actor
reads it back (`check_nodes`); every actor reads it again when it starts (`check_marker`),
which covers nodes the autoscaler adds later. A node that cannot read the marker, or reads
another token (its own disk holding an old folder of that name), makes the job refuse
with one line, before any input is touched.

Test hook: a node whose environment has `N2N_TEST_NODE_ROOT=/some/folder` reads local OUT
paths under that folder, as a node with its own disk at the same path would (a cluster
of nodes on one machine shares one disk, so only this lets a test see a node that does
not share OUT). Nothing else reads it.
"""
from __future__ import annotations

import os
import secrets
from pathlib import Path

MARKER_NAME = "shared-check"
TEST_NODE_ROOT = "N2N_TEST_NODE_ROOT"
CHECK_TIMEOUT_S = 120.0


class NotSharedError(RuntimeError):
    """OUT is a local path that a node running actors does not see."""


def not_shared_message(output: str, node: str, why: str) -> str:
    return (f"OUT {output!r} is not on shared storage: node {node} {why}; use a URI such as s3://BUCKET/PREFIX "
            f"or a folder on a mount every node shares")


def marker_path(root: str, run: str) -> Path:
    from pipeline.inference.outputs import staging_dir

    return staging_dir(root, run) / MARKER_NAME


def write_marker(root: str, run: str) -> str:
    """Write a fresh token into the run's staging folder (which must exist); returns it."""
    token = secrets.token_hex(16)
    path = marker_path(root, run)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
    with open(fd, "w") as f:
        f.write(token)
        f.flush()
        os.fsync(f.fileno())
    return token


def read_marker(root: str, run: str) -> str | None:
    """The token this process sees at the marker's path; None if it cannot read one."""
    path = marker_path(root, run)
    alias = os.environ.get(TEST_NODE_ROOT)
    if alias:
        path = Path(alias) / path.relative_to(path.anchor)
    try:
        return path.read_text()[:64]
    except (OSError, UnicodeDecodeError):
        return None


def check_marker(root: str, run: str, token: str, node: str | None = None) -> None:
    """Raise NotSharedError unless this process reads `token` at the marker's path."""
    seen = read_marker(root, run)
    if seen == token:
        return
    if node is None:
        import socket

        node = socket.gethostname()
    why = "cannot read the marker the driver wrote there" if seen is None else \
        "sees another folder there (the marker holds another token)"
    raise NotSharedError(not_shared_message(root, node, why))


def actor_nodes(device: str) -> list[dict]:
    """The alive nodes of the Ray cluster where an actor of `device` can run."""
    import ray

    resource = "GPU" if device == "cuda" else "CPU"
    return [n for n in ray.nodes() if n.get("Alive") and n.get("Resources", {}).get(resource, 0) > 0]


def needs_check(device: str) -> bool:
    """Whether an actor may run on a node other than the driver's."""
    import ray

    here = ray.get_runtime_context().get_node_id()
    return any(n["NodeID"] != here for n in actor_nodes(device))


def check_nodes(root: str, run: str, token: str, device: str, timeout_s: float = CHECK_TIMEOUT_S) -> None:
    """Read the marker on every node that can hold an actor (one pinned task each).

    Raises NotSharedError naming the first node that does not see it (or does not answer
    within `timeout_s`).
    """
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    @ray.remote(num_cpus=0, max_retries=0)
    def read(root, run):
        return read_marker(root, run)

    nodes = actor_nodes(device)
    refs = {n["NodeID"]: read.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False))
            .remote(root, run) for n in nodes}
    address = {n["NodeID"]: n.get("NodeManagerAddress", "?") for n in nodes}
    ready, _ = ray.wait(list(refs.values()), num_returns=len(refs), timeout=timeout_s)
    ready = set(ready)
    for node_id, ref in refs.items():
        name = f"{address[node_id]} ({node_id[:8]})"
        if ref not in ready:
            raise NotSharedError(not_shared_message(root, name, f"did not answer within {timeout_s:.0f} s"))
        seen = ray.get(ref)
        if seen != token:
            why = "cannot read the marker the driver wrote there" if seen is None else \
                "sees another folder there (the marker holds another token)"
            raise NotSharedError(not_shared_message(root, name, why))
