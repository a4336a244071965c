"""The overlapped step (pipeline.training.overlap): the same numbers as the serial step, its parts,
and what it does with a worker that fails.

- on one node, the overlapped and the serial step give bit-identical weights and losses;
- `--accumulate K` gives the run of a K-times larger batch, in every step and without Ray;
- a worker process killed mid-run is replaced, the run unchanged; a worker whose computation
  raises stops the run with its error;
- the bucket plan, the frames' token check, and nothing left in /dev/shm or /tmp.
"""
import os
import socket
import sys
import time
from pathlib import Path

import pytest
import ray
import torch

from pipeline.training import train
from pipeline.training.curves import read_metrics
from pipeline.training.overlap import frames
from pipeline.training.overlap.buckets import plan_buckets
from pipeline.training.overlap.frames import Kind
from pipeline.training.prefetch import BatchPrefetcher
from pipeline.training.worker import GradientWorker
from ray_support import ray_cpus  # noqa: F401 (fixture)
from train_support import assert_weights_close, images, reference_weights, tiny_config  # noqa: F401 (fixture)


def _losses(out: Path) -> list[float]:
    _, records = read_metrics(out / "metrics.jsonl")
    return [r["loss"] for r in records if "loss" in r]


@pytest.mark.parametrize("workers", [1, 3])  # a node's slot sent as it is; three slots summed on the node
def test_overlapped_step_equals_the_serial_step_bit_for_bit(ray_cpus, images, tmp_path, workers):
    runs = {}
    for overlap in (False, True):
        config = tiny_config(images, tmp_path / f"overlap-{overlap}", workers=workers, steps=12, overlap=overlap,
                             buckets=4)
        result = train(config)
        assert result.failures == 0
        runs[overlap] = (result.model.state_dict(), _losses(tmp_path / f"overlap-{overlap}"))
    (serial, serial_loss), (overlapped, overlapped_loss) = runs[False], runs[True]
    for key in serial:  # the same sums in the same order, and Adam bucket by bucket: no rounding apart
        assert torch.equal(serial[key], overlapped[key]), f"{key} differs between the serial and overlapped step"
    assert serial_loss == overlapped_loss and len(serial_loss) == 12
    assert_weights_close(overlapped, reference_weights(config), 1e-10, "overlapped step")


def staging_worker():
    """A GradientWorker that copies each bucket in and out as a GPU replica does, on the CPU."""

    class StagingWorker(GradientWorker):
        def stages(self):
            return True

    return StagingWorker


def test_replicas_that_copy_buckets_in_and_out_give_the_same_weights(ray_cpus, images, tmp_path):
    """The GPU replicas' path (weights copied in at each WEIGHTS notice, gradients copied out as each
    bucket finishes), run on the CPU: bit-identical to replicas computing on the shared memory."""
    runs = {}
    for name, worker_class in (("shared", None), ("staging", staging_worker())):
        config = tiny_config(images, tmp_path / name, workers=2, steps=8, buckets=3)
        runs[name] = train(config, worker_class=worker_class).model.state_dict()
    for key in runs["shared"]:
        assert torch.equal(runs["shared"][key], runs["staging"][key]), key


@pytest.mark.parametrize("how", ["overlap", "serial", "no-ray"])
def test_accumulate_equals_a_batch_that_many_times_larger(ray_cpus, images, tmp_path, how):
    # 3 micro-batches of 5 rows on 2 workers: shards of 7 and 8 rows, each in parts of 3/2/2 and 3/3/2
    options = {"overlap": dict(workers=2), "serial": dict(workers=2, overlap=False), "no-ray": dict(ray=False)}[how]
    config = tiny_config(images, tmp_path / "run", steps=8, batch_size=5, accumulate=3, **options)
    result = train(config)
    larger = tiny_config(images, tmp_path / "ref", steps=8, batch_size=15)
    assert_weights_close(result.model.state_dict(), reference_weights(larger), 1e-10, f"accumulate 3 ({how})")
    records = read_metrics(tmp_path / "run" / "metrics.jsonl")[1]
    assert all(r["images_per_s"] > 0 for r in records if "images_per_s" in r)


def test_a_killed_worker_process_is_replaced_and_the_run_is_unchanged(ray_cpus, images, tmp_path):
    config = tiny_config(images, tmp_path / "run", workers=3, steps=10, buckets=3)
    killed = []

    def on_step(step, model, placement):
        if step == 4:  # the workers compute step 5 already: its pid dies in the middle of it
            killed.append(placement[1]["pid"])
            os.kill(placement[1]["pid"], 9)

    result = train(config, on_step=on_step)
    assert killed and result.failures == 1
    assert result.final_placement[1]["pid"] != killed[0]
    assert_weights_close(result.model.state_dict(), reference_weights(config), 1e-10, "after a killed worker")


def fails_at_step_3():
    """A GradientWorker class whose computation raises at step 3 (defined here: Ray ships it by value)."""

    class FailsAtStep3(GradientWorker):
        def compute(self, step, positions, *args, **kwargs):
            if step == 3:
                raise ValueError("a broken batch at step 3")
            return super().compute(step, positions, *args, **kwargs)

    return FailsAtStep3


def test_a_worker_that_raises_stops_the_run_with_its_error(ray_cpus, images, tmp_path):
    config = tiny_config(images, tmp_path / "run", workers=2, steps=10)
    started = time.monotonic()
    failed = r"worker \d failed at step 3: ValueError: a broken batch at step 3"
    with pytest.raises(RuntimeError, match=failed) as info:
        train(config, worker_class=fails_at_step_3())
    assert time.monotonic() - started < 60, "the error was not reported at once"
    # the message is one line; the worker's own traceback comes with it as a note (shown under --debug)
    # instead of being printed by the worker onto the user's console
    assert "\n" not in str(info.value)
    notes = "\n".join(getattr(info.value, "__notes__", []))
    if sys.version_info >= (3, 11):  # BaseException.add_note
        assert "the worker's traceback" in notes and 'raise ValueError("a broken batch at step 3")' in notes


def test_nothing_is_left_in_shared_memory_or_temp_folders(ray_cpus, images, tmp_path):
    def ours():
        found = set()
        for folder in ("/dev/shm", "/tmp"):
            if os.path.isdir(folder):
                found |= {f"{folder}/{name}" for name in os.listdir(folder) if name.startswith("n2n-")}
        return found

    before = ours()
    train(tiny_config(images, tmp_path / "run", workers=2, steps=3))
    assert ours() == before


def test_bucket_plan_covers_the_buffer_in_backward_order():
    sizes = [10, 3, 40, 5, 30, 2, 20]
    for count in (1, 2, 3, 4, 7, 50):
        plan = plan_buckets(sizes, count)
        assert 1 <= len(plan) <= min(count, len(sizes))
        assert plan.buckets[0].hi == sum(sizes) and plan.buckets[-1].lo == 0  # last parameters first
        for later, earlier in zip(plan.buckets, plan.buckets[1:]):
            assert earlier.hi == later.lo and earlier.params.stop == later.params.start
        assert sorted(i for b in plan.buckets for i in b.params) == list(range(len(sizes)))
        assert plan.bucket_of(0) == len(plan) - 1 and plan.bucket_of(6) == 0
    assert [b.size for b in plan_buckets(sizes, 1).buckets] == [110]
    with pytest.raises(ValueError):
        plan_buckets(sizes, 0)


def test_frames_round_trip_and_a_foreign_peer_is_refused():
    a, b = socket.socketpair()
    with a, b:
        frames.send(a, Kind.SUM, 3, 17, 2, {"workers": [0, 1], "loss_sum": 1.5}, payload=torch.arange(5.0).numpy())
        frame = frames.recv(b)
        assert (frame.kind, frame.epoch, frame.step, frame.bucket) == (Kind.SUM, 3, 17, 2)
        assert frame.meta == {"workers": [0, 1], "loss_sum": 1.5} and frame.payload_len == 20
        out = torch.empty(5)
        frames.recv_into(b, memoryview(out.numpy()))
        assert torch.equal(out, torch.arange(5.0))
        a.sendall(b"GET / HTTP/1.1\r\n\r\n" + bytes(40))  # not ours: refused, never interpreted
        with pytest.raises(frames.LinkClosed, match="not an n2n frame"):
            frames.recv(b)


def test_the_driver_refuses_a_connection_without_the_run_token(caplog):
    from pipeline.training.overlap.pool import _Listener

    listener = _Listener("right-token")
    try:
        with socket.create_connection(listener.address) as bad:
            frames.send(bad, Kind.HELLO, meta={"token": "wrong", "link": "x"})
            bad.settimeout(10)
            assert bad.recv(1) == b"", "a connection without the token was kept open"
        with socket.create_connection(listener.address) as good:
            frames.send(good, Kind.HELLO, meta={"token": "right-token", "link": "y", "address": "a"})
            sock, meta = listener.take("y", timeout=10)
            sock.close()
            assert meta["address"] == "a"
        assert "x" not in listener.arrived
    finally:
        listener.close()


def test_prefetched_batches_are_the_batches():
    draws = []

    def draw(step, positions):
        draws.append(step)
        return step * 10 + positions.start, step

    ahead = BatchPrefetcher(draw)
    try:
        assert ahead.get(4, range(2, 5)) == (42, 4)
        time.sleep(0.2)
        assert ahead.get(5, range(2, 5)) == (52, 5)  # drawn ahead: no second draw of step 5
        assert ahead.get(5, range(2, 5)) == (52, 5)  # a step asked again (a restarted step)
        time.sleep(0.2)
        assert draws == [4, 5, 6], "each step drawn once, one ahead"
    finally:
        ahead.close()


def test_a_node_refuses_foreign_connections_and_welcomes_its_workers(one_thread_node):
    """A node's service (no Ray): junk and a wrong token are refused, a worker with the token gets the
    node's weights and its own gradient slot as two file descriptors; STOP ends the service."""
    from pipeline.training.overlap.member import _recv_welcome
    from pipeline.training.overlap.node import LinkSpec, NodeService
    from pipeline.training.overlap.shared import SharedTensor, unix_connect

    driver = socket.create_server(("127.0.0.1", 0))
    spec = LinkSpec(token="t0k3n", driver=driver.getsockname(), node_id="n", link_id="l", size=10,
                    plan=plan_buckets([4, 6], 2).to_list(), dtype="float32", wire="same", step_timeout=30)
    service = NodeService(spec)
    link, _ = driver.accept()
    hello = frames.recv(link)
    assert hello.kind == Kind.HELLO and hello.meta["token"] == "t0k3n" and hello.meta["link"] == "l"
    service.start()
    try:
        with unix_connect(service.address) as junk:
            junk.sendall(b"GET / HTTP/1.1\r\n\r\n" + bytes(30))
            assert _closed(junk), "junk was answered"
        with unix_connect(service.address) as wrong:
            frames.send(wrong, Kind.HELLO, meta={"token": "guess", "worker": 0})
            assert _closed(wrong), "a wrong token was answered"
        with unix_connect(service.address) as worker:
            frames.send(worker, Kind.HELLO, meta={"token": "t0k3n", "worker": 0, "staging": False})
            worker.settimeout(10)
            meta, (weights_fd, slot_fd) = _recv_welcome(worker)
            assert meta["size"] == 10
            weights, slot = SharedTensor(weights_fd, 10, torch.float32), SharedTensor(slot_fd, 10, torch.float32)
            frames.send(link, Kind.WEIGHTS, 1, 0, 0, payload=torch.arange(6.0).numpy())  # bucket 0: the last 6
            deadline = time.monotonic() + 10
            while not torch.equal(weights.tensor[4:], torch.arange(6.0)) and time.monotonic() < deadline:
                time.sleep(0.01)
            assert torch.equal(weights.tensor[4:], torch.arange(6.0)), "the driver's weights did not reach the worker"
            weights.close(), slot.close()
        frames.send(link, Kind.STOP)
        service.thread.join(timeout=10)
        assert not service.thread.is_alive()
    finally:
        link.close()
        driver.close()
        service.stop()


def _closed(sock) -> bool:
    """Whether the peer closed the connection (a reset counts: it closed with our bytes unread)."""
    sock.settimeout(10)
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True


@pytest.fixture
def one_thread_node():
    """A node service sets its process to one torch thread: give the test process its own back."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)
