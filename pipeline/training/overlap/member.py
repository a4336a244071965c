"""The worker's side of the overlapped step: its link to the node reducer and its step loop.

`WorkerLink(worker, address, token, index)` connects a `GradientWorker` to the service of
its node (pipeline.training.overlap.node): HELLO with the run's token, then WELCOME brings
the file descriptors of the node's shared weights and of this worker's gradient slot. A
worker on the CPU re-binds its parameters to views of them (`FlatParameters.over`): it
reads the weights the driver streamed in and its backward pass writes its gradients where
the reducer sums them, with no copy. A GPU worker keeps its own buffers and copies each
bucket in (at a WEIGHTS notice) and out (when backward has finished it).

A thread then serves the node: on GO it computes the step's shard (the batch was drawn
ahead, while the previous step computed), sends LOSS after the forward pass and READY as
each bucket's gradients are complete. If the computation raises, it sends FAULT with the
error, which ends the run. When the node's connection closes (the reducer died, or the
run is over) the thread ends; the driver joins the worker to a new reducer if needed.
"""
from __future__ import annotations

import json
import logging
import os
import socket
import threading
import traceback

from pipeline.training.overlap import frames
from pipeline.training.overlap.buckets import BucketPlan
from pipeline.training.overlap.frames import Kind, LinkClosed
from pipeline.training.overlap.node import TORCH_DTYPES
from pipeline.training.overlap.shared import SharedTensor, unix_connect

log = logging.getLogger(__name__)


def _recv_welcome(sock: socket.socket):
    """The WELCOME frame and the two file descriptors that come with it (weights, slot)."""
    data, fds, _, _ = socket.recv_fds(sock, frames.HEADER.size, 2)
    try:
        if not data:
            raise LinkClosed("the node's reducer closed the connection (a wrong token?)")
        head = bytearray(data)
        if len(head) < frames.HEADER.size:
            head += frames.recv_exactly(sock, frames.HEADER.size - len(head))
        magic, kind, epoch, step, bucket, meta_len, _ = frames.HEADER.unpack(bytes(head))
        if magic != frames.MAGIC or kind != Kind.WELCOME or len(fds) != 2:
            raise LinkClosed("the node's reducer did not answer with WELCOME and two buffers")
        meta = json.loads(frames.recv_exactly(sock, meta_len))
        return meta, fds
    except BaseException:
        for fd in fds:
            os.close(fd)
        raise


class WorkerLink:
    """A worker's connection to its node's reducer, and the thread that computes its steps."""

    def __init__(self, worker, address: str, token: str, index: int):
        self.worker, self.index = worker, index
        self.sock = unix_connect(address)
        frames.send(self.sock, Kind.HELLO, meta={"token": token, "worker": index, "staging": worker.stages()})
        meta, (weights_fd, slot_fd) = _recv_welcome(self.sock)
        dtype = TORCH_DTYPES[meta["dtype"]]
        self.weights = SharedTensor(weights_fd, meta["size"], dtype)  # (P,) the node's weights
        self.slot = SharedTensor(slot_fd, meta["size"], dtype)        # (P,) this worker's gradients
        self.plan = BucketPlan.from_list(meta["plan"], meta["size"])
        worker.attach_shared(self.weights.tensor, self.slot.tensor, self.plan)
        self.thread = threading.Thread(target=self._serve, name=f"n2n-worker-{index}", daemon=True)
        self.thread.start()

    def close(self) -> None:
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        if self.thread is not threading.current_thread():
            self.thread.join(timeout=60)
        self.sock.close()
        self.worker.detach_shared()
        self.weights.close()
        self.slot.close()

    def _serve(self) -> None:
        try:
            while True:
                frame = frames.recv(self.sock)
                if frame.kind == Kind.WEIGHTS:
                    self.worker.stage_weights(self.plan.buckets[frame.bucket])
                elif frame.kind == Kind.GO:
                    self._step(frame.epoch, frame.step)
                elif frame.kind == Kind.STOP:
                    return
        except (LinkClosed, OSError):
            return  # the reducer went away or the run ended: the driver decides what comes next

    def _step(self, epoch: int, step: int) -> None:
        def on_loss(loss_sum: float, count: int) -> None:
            frames.send(self.sock, Kind.LOSS, epoch, step, meta={"loss_sum": loss_sum, "count": count})

        def on_bucket(b: int) -> None:
            frames.send(self.sock, Kind.READY, epoch, step, b)

        try:
            self.worker.compute(step, self.worker.positions, on_bucket=on_bucket, on_loss=on_loss)
        except (LinkClosed, OSError):
            raise
        except Exception as e:  # a bug, an out-of-memory: the run stops with it
            # the traceback travels to the driver, which shows it under --debug; printing it here
            # would put it on the user's console through Ray's log forwarding
            frames.send(self.sock, Kind.FAULT, epoch, step,
                        meta={"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()})
