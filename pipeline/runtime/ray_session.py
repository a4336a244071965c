"""Connecting a job to Ray: attach to a running cluster, or start a private Ray in this process.

One function, `connect(address)`, used by training and by the bulk denoise job. What
`address` means (README, "Decisions"):

- None (the `n2n` CLI's default): RAY_ADDRESS when set (`ray job submit` sets it), else a
  private Ray started in this process.
- "discover" (the default of the cluster entry scripts `jobs/train.py` and
  `jobs/denoise.py`): Ray's own discovery, what `ray.init()` does without an address:
  RAY_ADDRESS, else the cluster that the last `ray start` on this node recorded (so under
  `ray submit cluster.yaml jobs/train.py` the script joins the cluster `ray up` started),
  else a private Ray.
- "auto": Ray's "auto": RAY_ADDRESS, else the recorded cluster, else any Ray found
  running on this node; an error when there is none.
- "local": a private Ray, always (RAY_ADDRESS is ignored).
- anything else: that cluster ("HOST:PORT" of its GCS, or "ray://HOST:PORT").

Either way one line on stderr says what happened: the cluster attached to (address,
nodes, CPUs, GPUs) or that a private Ray was started; under the quiet console of the
`n2n` commands (pipeline.runtime.console) one more, once, says where Ray's logs go. A private Ray can never grow (it
has no autoscaler and no other node joins it), so a job asking it for more than it holds
is refused at once (`check_private_room`, a `UsageError` naming its CPUs and GPUs)
instead of waiting for room that cannot come; on a real cluster the wait stays. An address that does not answer
is a `RayConnectionError` within seconds, naming the address and where it came from
(ray.init itself retries for minutes), e.g. a cluster recorded by a `ray start` whose
processes have since died.
"""
from __future__ import annotations

import logging
import os
import socket
import sys
from dataclasses import dataclass

from pipeline.errors import UsageError

DISCOVER = "discover"
AUTO = "auto"
LOCAL = "local"
PROBE_TIMEOUT_S = 5.0


_private_node: str | None = None  # the node id of the private Ray `connect` started in this process


class RayConnectionError(UsageError):
    """The Ray cluster asked for cannot be reached (or none was found for "auto"): exit status 2."""


@dataclass(frozen=True)
class Target:
    """Where `connect` goes: a cluster at `address` (None: a private Ray) and why (`source`).

    `init_address` is what ray.init gets: None or "auto" wherever Ray's own discovery
    (or RAY_ADDRESS) names the cluster, since only then does ray.init pick up the node's
    authentication token by itself (Ray 2.60's `ray start` turns token authentication
    on when the node holds a token).
    """

    address: str | None
    source: str
    init_address: str | None = None


def resolve(address: str | None) -> Target:
    """The cluster that `connect(address)` attaches to, or Target(None, why) for a private Ray."""
    env = os.environ.get("RAY_ADDRESS") or None
    if env == LOCAL and address in (None, DISCOVER, AUTO):
        return Target(None, "RAY_ADDRESS=local")
    if address is None:
        if env:
            return Target(env, "RAY_ADDRESS", init_address=None)
        return Target(None, "no --address and no RAY_ADDRESS")
    if address == LOCAL:
        return Target(None, "--address local")
    if address in (DISCOVER, AUTO):
        if env:
            return Target(env, "RAY_ADDRESS", init_address=None)
        from ray._private import services  # what ray.init() runs for address None / "auto"

        try:
            found = services.canonicalize_bootstrap_address(None if address == DISCOVER else AUTO)
        except ConnectionError as error:  # "auto" and nothing running here
            raise RayConnectionError(f"--address auto: no Ray cluster is running on this node ({error}); "
                                     f"start one (`ray start --head`, `ray up`) or omit --address") from None
        if found is None:
            return Target(None, "no RAY_ADDRESS and no `ray start` cluster on this node")
        if address == AUTO:
            return Target(found, "--address auto: a Ray running on this node", init_address=AUTO)
        return Target(found, "the cluster of the last `ray start` on this node", init_address=None)
    return Target(address, "--address", init_address=address)


def _host_port(address: str) -> tuple[str, int] | None:
    """(host, port) of "HOST:PORT" or "ray://HOST:PORT"; None for other forms."""
    rest = address[len("ray://"):] if address.startswith("ray://") else address
    if "://" in rest:
        return None
    host, sep, port = rest.rpartition(":")
    if not sep or not port.isdigit():
        return None
    return host.strip("[]") or "127.0.0.1", int(port)


def _probe(target: Target) -> None:
    """Raise RayConnectionError unless something accepts connections at the target's port."""
    where = _host_port(target.address)
    if where is None:
        return
    try:
        with socket.create_connection(where, timeout=PROBE_TIMEOUT_S):
            pass
    except OSError as error:
        raise RayConnectionError(
            f"no Ray cluster answers at {target.address} ({target.source}): {error.strerror or error}; "
            f"start it (`ray start --head`, `ray up`), pass another --address, "
            f"or --address local for a private Ray in this process") from None


def describe_cluster() -> str:
    """'N node(s), C CPUs, G GPUs' of the cluster this process is connected to."""
    import ray

    nodes = sum(1 for n in ray.nodes() if n.get("Alive"))
    resources = ray.cluster_resources()
    return (f"{nodes} node{'s' if nodes != 1 else ''}, {resources.get('CPU', 0):g} CPUs, "
            f"{resources.get('GPU', 0):g} GPUs")


def connect(address: str | None, *, say=None) -> bool:
    """Connect this process to Ray as `address` asks (module docstring); say which in one line.

    An existing connection of this process is used as is. Returns True when this call
    connected (the caller shuts Ray down when done). `say` receives the one line
    (default: printed to stderr).
    """
    import ray

    from pipeline.runtime import console

    if ray.is_initialized():
        return False
    say = say or (lambda line: print(line, file=sys.stderr, flush=True))
    target = resolve(address)
    global _private_node
    _private_node = None
    if target.address is None:
        console.ray_starting()
        ray.init(address=LOCAL, include_dashboard=False, logging_level=logging.WARNING)
        _private_node = ray.get_runtime_context().get_node_id()
        hint = "" if address is not None else "; pass --address auto to use the Ray cluster running on this node"
        say(f"n2n: started a private Ray in this process ({target.source}): {describe_cluster()}{hint}")
        console.ray_started()
        return True
    _probe(target)
    console.ray_starting()
    ray.init(address=target.init_address, logging_level=logging.WARNING)
    gcs = ray.get_runtime_context().gcs_address
    say(f"n2n: attached to the Ray cluster at {gcs} ({target.source}): {describe_cluster()}")
    console.ray_started()
    return True


def is_private() -> bool:
    """Whether this process is connected to a private Ray that `connect` started (one that
    cannot grow), and not to a cluster."""
    import ray

    return (_private_node is not None and ray.is_initialized()
            and ray.get_runtime_context().get_node_id() == _private_node)


def check_private_room(workers: int, *, cpus_each: float, gpus_each: float, option: str = "--workers") -> None:
    """A `UsageError` when a private Ray cannot hold `workers` actors of `cpus_each` CPUs and
    `gpus_each` GPUs: it can never grow, so waiting for room would only wait out the timeout.
    Nothing is checked on a cluster, whose autoscaler may still add nodes."""
    if not is_private():
        return
    import ray

    resources = ray.cluster_resources()
    cpus, gpus = resources.get("CPU", 0), resources.get("GPU", 0)
    fit = min(int(cpus // cpus_each + 1e-9) if cpus_each else workers, int(gpus // gpus_each) if gpus_each else workers)
    if fit >= workers:
        return
    each = f"{cpus_each:g} CPU" + (f" + {gpus_each:g} GPU" if gpus_each else "")
    advice = f"pass {option} {fit} or fewer" if fit else "pass fewer --cpus-per-worker"
    raise UsageError(f"{option} {workers}: the private Ray this process started has {cpus:g} CPUs and {gpus:g} GPUs "
                     f"and cannot grow, so it holds {fit} worker{'s' if fit != 1 else ''} of {each}; {advice}, "
                     f"or --address to train on a cluster")
