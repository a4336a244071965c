"""The next step's batch, drawn on a thread while the current step computes.

A batch depends only on (seed, step, positions), never on the weights, so drawing the
batch of step t + 1 while step t computes changes no number; a GPU (or a simulated one)
would otherwise wait for the CPU's crops and noise at every step.

The drawing thread runs at a lower priority (niceness + 5, on Linux, where niceness is per
thread; raising it needs no privilege): it has a whole step to finish, while the threads
that feed the device and hand gradients on are the step's critical path.
"""
from __future__ import annotations

import os
import sys
import threading
from concurrent.futures import Future, ThreadPoolExecutor

BACKGROUND_NICENESS = 5


def _lower_priority() -> None:
    """Make the calling thread `BACKGROUND_NICENESS` nicer (Linux: per thread; elsewhere nothing)."""
    if not sys.platform.startswith("linux"):
        return
    try:
        tid = threading.get_native_id()
        os.setpriority(os.PRIO_PROCESS, tid, min(19, os.getpriority(os.PRIO_PROCESS, tid) + BACKGROUND_NICENESS))
    except OSError:
        pass


class BatchPrefetcher:
    """`get(step, positions)`: that batch (drawn ahead when it was the one expected), then draws the next."""

    def __init__(self, draw):
        self.draw = draw  # (step, positions) -> (inputs, targets)
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="n2n-batches", initializer=_lower_priority)
        self.ahead: dict[tuple, Future] = {}

    def _submit(self, step: int, positions: range) -> Future:
        key = (step, positions.start, positions.stop)
        if key not in self.ahead:
            self.ahead[key] = self.pool.submit(self.draw, step, positions)
        return self.ahead[key]

    def get(self, step: int, positions: range):
        future = self._submit(step, positions)
        for key in [k for k in self.ahead if k[0] < step]:  # earlier steps are not asked for again
            self.ahead.pop(key).cancel()
        self._submit(step + 1, positions)
        return future.result()

    def close(self) -> None:
        for future in self.ahead.values():
            future.cancel()
        self.ahead.clear()
        self.pool.shutdown(wait=True)
