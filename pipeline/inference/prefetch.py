"""`LookAhead`: load items on a background thread, a bounded amount ahead of their consumer.

The denoising actor decodes the next images while the model runs on the current ones
(worker.py); the bound keeps an actor from holding every image of a call decoded at once.
Torch and Pillow release Python's GIL while they compute, so the two threads overlap.
"""
from __future__ import annotations

import threading
from collections import deque


class LookAhead:
    """`load(item)` for each of `items`, in order, on one thread, at most `limit` units of
    `weight(result)` loaded and not yet taken (one result is always allowed ahead).

    `take()` blocks until at least one result is ready and returns every ready one, in order;
    `done` is True once all were taken. An exception in `load` is raised by the `take()` that
    reaches its item. Use as a context manager: leaving it stops the thread.
    """

    def __init__(self, items, load, weight, limit: float):
        self._items = list(items)
        self._load, self._weight, self._limit = load, weight, limit
        self._ready: deque = deque()  # (result, weight, error)
        self._held = 0.0  # weight of the ready results
        self._taken = 0
        self._closed = False
        self._cond = threading.Condition()
        self._thread = threading.Thread(target=self._run, name="n2n-look-ahead", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        for item in self._items:
            with self._cond:
                while not self._closed and self._ready and self._held >= self._limit:
                    self._cond.wait()
                if self._closed:
                    return
            try:
                result, error = self._load(item), None
                weight = self._weight(result)
            except BaseException as caught:  # noqa: BLE001 - handed to the consumer
                result, error, weight = None, caught, 0.0
            with self._cond:
                self._ready.append((result, weight, error))
                self._held += weight
                self._cond.notify_all()

    @property
    def done(self) -> bool:
        return self._taken == len(self._items)

    def take(self) -> list:
        with self._cond:
            while not self._ready:
                self._cond.wait()
            results = []
            while self._ready and (self._ready[0][2] is None or not results):
                result, weight, error = self._ready.popleft()
                self._held -= weight
                self._taken += 1
                self._cond.notify_all()
                if error is not None:
                    raise error
                results.append(result)
            return results

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self._thread.join()

    def __enter__(self) -> "LookAhead":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
