"""The overlapped training step: the driver's work hides behind the workers' backward pass.

The serial step (pipeline.training.placement.WorkerPool) hands the weights out, waits for
every gradient, adds, steps and starts again: the workers sit idle while the driver works.
Here, per step:

    worker backward   [bucket 0][bucket 1] ... [bucket B-1] | next forward ...
    node reducer                 sum 0      sum 1 ...   sum B-1
    driver                          step 0, weights 0 ...   step B-1, weights B-1, GO

- buckets.py: the gradient buckets, in the order backward finishes them;
- frames.py: the binary frames on the sockets (no pickle, a run token on every connection);
- shared.py: anonymous shared memory of a node and the Unix sockets that pass it;
- node.py: the node's service (in its NodeReducer actor): shared weights, one gradient slot
  per worker, the sums;
- member.py: a worker's link to its node and its step loop;
- pool.py: the driver's `OverlapPool`.

Bulk data goes over the nodes' shared memory and one TCP connection per node to the
driver; Ray places and watches the actors, as for the serial step.
"""
from __future__ import annotations


def overlap_problem() -> str | None:
    """Why this process cannot run the overlapped step (None: it can).

    It needs Unix sockets that pass file descriptors (Linux, macOS) and a driver the nodes
    can reach over TCP, which a Ray Client driver (`ray://`) is not.
    """
    from pipeline.training.overlap.shared import FD_PASSING

    if not FD_PASSING:
        return "this platform has no Unix sockets that pass file descriptors"
    try:
        from ray.util.client import ray as client

        if client.is_connected():
            return "a Ray Client driver (ray://) is not reachable from the nodes"
    except ImportError:
        pass
    return None
