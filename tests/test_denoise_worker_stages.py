"""The denoising actor's stages (worker.py): decoding runs ahead of the model and encoding behind
it, on their own threads; images of one padded size share a forward, the tiles of a large one
too; and the outputs are the very bytes of an actor that runs one image or tile per forward.
The actor runs in this process (no Ray)."""
import threading
import time

import numpy as np
import pyarrow as pa
import pytest
import torch

from n2n_core import build_model, save_checkpoint
from pipeline.data.datasets import open_dataset
from pipeline.inference.outputs import create_staging
from pipeline.inference.prefetch import LookAhead
from pipeline.inference.worker import DenoiseWorker, WorkerPlan, table_entries
from tests.denoise_helpers import make_image


@pytest.fixture
def model_file(tmp_path):
    path = tmp_path / "model.n2n"
    model = build_model("unet", depth=2, width=16, residual=True, generator=torch.Generator().manual_seed(0))
    save_checkpoint(path, model)
    return path


def photos(folder):
    """Four 40x52 RGB PNGs (one padded size), a grey one, one of another size, one tiled (130x90 at tile 64)
    and a broken file."""
    folder.mkdir()
    sizes = [(40, 52, "RGB")] * 4 + [(40, 52, "L"), (23, 31, "RGB"), (130, 90, "RGB")]
    for i, (h, w, mode) in enumerate(sizes):
        (folder / f"img{i}.png").write_bytes(make_image(np.random.default_rng(i), "PNG", mode, h, w))
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")


def run_actor(model_file, src, out, run, **plan_options):
    out.mkdir()
    create_staging(out, run)
    dataset = open_dataset(src)
    plan = WorkerPlan(model_path=str(model_file), device="cpu", threads=1, tile=64, overlap=16, max_pixels=10**8,
                      input_kind="folder", output_kind="folder", output_root=str(out), run=run, **plan_options)
    worker = DenoiseWorker(plan, dataset)
    batch = pa.table({"index": list(range(len(dataset))), "key": dataset.keys})
    return worker, batch


def test_batched_actor_writes_the_same_bytes_as_one_image_per_forward(tmp_path, model_file, monkeypatch):
    src = tmp_path / "in"
    photos(src)
    one, batch = run_actor(model_file, src, tmp_path / "one", "r1", forward_bytes=0)
    batched, _ = run_actor(model_file, src, tmp_path / "batched", "r2", forward_bytes=1 << 30)
    assert one.forward_pixels is None and batched.forward_pixels > 10**5
    by_one = {e.key: e for e in table_entries(one(batch))}
    forwards = []
    real = batched.model.forward
    monkeypatch.setattr(batched.model, "forward", lambda x: forwards.append(tuple(x.shape)) or real(x))
    real_take = LookAhead.take

    def take_when_all_decoded(self):  # as if decoding were instant: the grouping does not hang on timing
        deadline = time.monotonic() + 30
        while len(self._ready) + self._taken < len(self._items) and time.monotonic() < deadline:
            time.sleep(0.01)
        return real_take(self)

    monkeypatch.setattr(LookAhead, "take", take_when_all_decoded)
    together = {e.key: e for e in table_entries(batched(batch))}
    assert by_one.keys() == together.keys() and len(by_one) == 8
    assert together["broken.png"].status == by_one["broken.png"].status == "failed"
    for key, entry in together.items():
        if key != "broken.png":
            assert entry.status == "done", entry.reason
            assert (tmp_path / "batched" / key).read_bytes() == (tmp_path / "one" / key).read_bytes(), key
    # everything decoded went in together: the five 40x52 images (the grey one replicated) in one forward,
    # the large image's six tiles in another
    assert (5, 3, 40, 52) in forwards, forwards
    assert (6, 3, 96, 92) in forwards, forwards  # 3 x 2 tiles of 64 with 16 pixels of context: one size


def test_decoding_runs_ahead_and_encoding_behind_the_model(tmp_path, model_file, monkeypatch):
    """The model waits for a later image's decode, and the first image's encode for the model's next
    forward: either would time out if the stages ran one after another on one thread."""
    src = tmp_path / "in"
    src.mkdir()
    for i in range(3):  # three sizes: three forwards
        (src / f"img{i}.png").write_bytes(make_image(np.random.default_rng(i), "PNG", "RGB", 40, 40 + 24 * i))
    worker, batch = run_actor(model_file, src, tmp_path / "out", "r1", forward_bytes=1 << 30)
    decoded = {i: threading.Event() for i in range(3)}
    modelled = {i: threading.Event() for i in range(3)}
    load, denoise, finish = worker._load, worker._denoise, worker._finish
    order = []

    def slow_load(numbered):
        result = load(numbered)
        order.append(("decoded", numbered[0]))
        decoded[numbered[0]].set()
        return result

    def overlapped_denoise(images):
        first = images[0].index
        if first == 0:
            assert decoded[1].wait(20), "the next image was not decoded while the model had the first"
        outputs = denoise(images)
        for item in images:
            order.append(("denoised", item.index))
            modelled[item.index].set()
        return outputs

    def overlapped_finish(item, out):
        if item.index == 0:
            assert modelled[2].wait(20) or modelled[1].wait(0), "the model did not go on while image 0 was encoded"
        return finish(item, out)

    monkeypatch.setattr(worker, "_load", slow_load)
    monkeypatch.setattr(worker, "_denoise", overlapped_denoise)
    monkeypatch.setattr(worker, "_finish", overlapped_finish)
    entries = table_entries(worker(batch))
    assert [e.status for e in entries] == ["done"] * 3, [e.reason for e in entries]
    assert order.index(("decoded", 1)) < order.index(("denoised", 0))


def test_precision_is_the_models_dtype_and_a_setting_of_the_output(tmp_path, model_file):
    from pipeline.inference.config import DenoiseConfig
    from pipeline.inference.inputs import pixel_settings
    from pipeline.errors import UsageError

    src = tmp_path / "in"
    src.mkdir()
    (src / "a.png").write_bytes(make_image(np.random.default_rng(0), "PNG", "RGB", 40, 52))
    full, batch = run_actor(model_file, src, tmp_path / "full", "r1")
    low, _ = run_actor(model_file, src, tmp_path / "low", "r2", precision="bfloat16")
    assert {p.dtype for p in low.model.parameters()} == {torch.bfloat16}
    assert [e.status for e in table_entries(full(batch))] == [e.status for e in table_entries(low(batch))] == ["done"]
    from pipeline.data.images import decode_image

    a, b = (decode_image((tmp_path / folder / "a.png").read_bytes(), "a.png").pixels for folder in ("full", "low"))
    assert 0 < (a - b).abs().max() < 0.05
    settings = lambda **kw: pixel_settings(DenoiseConfig(str(src), str(tmp_path / "o"), **kw), b"model")
    assert "precision" not in settings()  # outputs of runs before the option stay finished
    assert settings(precision="bfloat16")["precision"] == "bfloat16"
    with pytest.raises(UsageError, match="--precision must be one of float32, bfloat16, float16, got 'half'"):
        DenoiseConfig(str(src), str(tmp_path / "o"), precision="half")


def test_out_of_memory_in_the_actor_retries_smaller_and_keeps_the_smaller_size(tmp_path, model_file, monkeypatch,
                                                                               caplog):
    """A GPU running out of memory, injected: forwards of more than one 96x92 tile region fail. The actor's
    images are still done (the batch of six tiles halves until one fits), with the very bytes of an actor that
    runs one tile per forward; it says so once per retry, and its next call starts at the smaller size."""
    import logging

    src = tmp_path / "in"
    src.mkdir()
    for i in range(2):
        (src / f"big{i}.png").write_bytes(make_image(np.random.default_rng(i), "PNG", "RGB", 130, 90))
    one, batch = run_actor(model_file, src, tmp_path / "one", "r1", forward_bytes=0)
    flaky, _ = run_actor(model_file, src, tmp_path / "flaky", "r2", forward_bytes=1 << 30)
    region = 96 * 92  # 3 x 2 tiles of 64 with 16 pixels of context, one size
    assert flaky.forward_pixels >= 6 * region
    forwards = []
    real = flaky.model.forward

    def forward(x):
        forwards.append(x.shape[0] * x.shape[2] * x.shape[3])
        if forwards[-1] > region:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 6.00 GiB (injected)")
        return real(x)

    monkeypatch.setattr(flaky.model, "forward", forward)
    reference = {e.key: e.status for e in table_entries(one(batch))}
    with caplog.at_level(logging.WARNING, logger="pipeline.inference.worker"):
        first = table_entries(flaky(batch.slice(0, 1)))
    assert [e.status for e in first] == ["done"], [e.reason for e in first]
    retries = [r.getMessage() for r in caplog.records if "out of memory" in r.getMessage()]
    assert [f // region for f in forwards[:3]] == [6, 3, 1] and len(retries) == 2, (forwards, retries)
    assert "CUDA out of memory" in retries[0] and "one forward now takes at most" in retries[0]
    assert flaky.forward_pixels == region
    forwards.clear()
    second = table_entries(flaky(batch.slice(1, 1)))  # the next call: no forward above the size that worked
    assert [e.status for e in second] == ["done"] and forwards and max(forwards) == region, forwards
    for key in reference:
        assert reference[key] == "done"
        assert (tmp_path / "flaky" / key).read_bytes() == (tmp_path / "one" / key).read_bytes(), key
