"""The manifest keeps up with the outputs (a line before every rename, in the actor's shard),
recognizes n2n's own files by what it recorded, and a full disk stops an actor cleanly.

The actor runs in this process here (no Ray); the kill-and-resume tests of
test_denoise_job.py check the same end to end."""
import errno
import json
import shutil

import pytest
import torch

from n2n_core import build_model, save_checkpoint
from pipeline.data.datasets import open_dataset
from pipeline.inference import outputs
from pipeline.inference import read_manifest
from pipeline.inference.manifest import FAILED, SKIPPED, ManifestWriter, read_state
from pipeline.inference.outputs import create_staging
from pipeline.inference.planning import plan_inputs
from pipeline.inference.worker import DenoiseWorker, WorkerPlan, table_entries
from tests.denoise_helpers import make_tree


@pytest.fixture
def tiny_model(tmp_path):
    path = tmp_path / "tiny.n2n"
    save_checkpoint(path, build_model("unet", depth=1, width=4, generator=torch.Generator().manual_seed(0)))
    return path


def actor(tmp_path, model, src, out, run="run-1", output_kind="folder"):
    """A DenoiseWorker in this process over the folder src, writing into out; and its batch."""
    out.mkdir(exist_ok=True)
    create_staging(out, run)
    dataset = open_dataset(src)
    plan = WorkerPlan(model_path=str(model), device="cpu", threads=1, tile=None, overlap=0, max_pixels=10**8,
                      input_kind="folder", output_kind=output_kind, output_root=str(out), run=run)
    import pyarrow as pa

    batch = pa.table({"index": list(range(len(dataset))), "key": dataset.keys})
    return DenoiseWorker(plan, dataset), batch


def test_every_output_has_its_line_before_it_lands(tmp_path, tiny_model, monkeypatch):
    src, out = tmp_path / "in", tmp_path / "out"
    keys = sorted(make_tree(src, 3))  # the order the dataset lists them
    worker, batch = actor(tmp_path, tiny_model, src, out)
    published = []
    real_publish = outputs.publish

    def publish(source, parent):  # the instant before the rename: a kill here must lose nothing
        done = {k for k, r in read_manifest(out / "_manifest.jsonl").items() if r["status"] == "done"}
        assert parent.relative in done, f"{parent.relative} renamed before its manifest line"
        published.append(parent.relative)
        real_publish(source, parent)

    monkeypatch.setattr(outputs, "publish", publish)
    entries = table_entries(worker(batch))
    assert [e.status for e in entries] == ["done"] * 3 and published == keys
    records = read_manifest(out / "_manifest.jsonl")  # the shard, merged by the reader
    for key in keys:
        info = (out / key).stat()
        assert (records[key]["size"], records[key]["mtime_ns"]) == (info.st_size, info.st_mtime_ns)


def test_a_full_disk_fails_the_image_and_asks_the_driver_to_stop(tmp_path, tiny_model, monkeypatch):
    src, out = tmp_path / "in", tmp_path / "out"
    keys = sorted(make_tree(src, 4))  # the order the dataset lists them
    worker, batch = actor(tmp_path, tiny_model, src, out)
    real_stage, calls = outputs.stage, []

    def stage(staging, data, suffix=".tmp"):
        calls.append(1)
        if len(calls) >= 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_stage(staging, data, suffix)

    monkeypatch.setattr(outputs, "stage", stage)
    entries = table_entries(worker(batch))
    assert [e.status for e in entries] == ["done", "failed", "failed", "failed"]
    assert all(e.stop and e.reason.startswith("disk full:") for e in entries[1:])
    assert len(calls) == 2  # after the first full write the others fail at once: no work wasted
    records = read_manifest(out / "_manifest.jsonl")
    assert records[keys[0]]["status"] == "done" and all(records[k]["status"] == "failed" for k in keys[1:])
    assert sorted(p.name for p in (out / "_n2n_tmp" / "run-1").iterdir())[0].startswith("manifest-")
    assert not list((out / "_n2n_tmp" / "run-1").glob("*.tmp"))  # no temporary file left


def test_torn_lines_are_ignored_and_shards_merge_into_the_manifest(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    line = lambda key, status: json.dumps({"key": key, "status": status, "output": key})
    (out / "_manifest.jsonl").write_text(line("a.png", "done") + "\n" + '{"key": "b.png", "sta')  # killed mid-line
    shard_dir = out / "_n2n_tmp" / "killed-run"
    shard_dir.mkdir(parents=True)
    (shard_dir / "manifest-1.jsonl").write_text(line("c.png", "done") + "\n" + line("a.png", "failed") + "\n{\"ke")
    assert {k: r["status"] for k, r in read_manifest(out / "_manifest.jsonl").items()} == {"a.png": "failed",
                                                                                        "c.png": "done"}
    with ManifestWriter(out / "_manifest.jsonl", "rerun") as manifest:
        from pipeline.inference.job_output import _merge_staging

        _merge_staging(out, manifest)
    assert not (out / "_n2n_tmp").exists()
    assert {k: r["status"] for k, r in read_manifest(out / "_manifest.jsonl").items()} == {"a.png": "failed",
                                                                                        "c.png": "done"}


def test_n2n_recognizes_its_outputs_after_a_copy_and_never_replaces_an_edited_one(tmp_path, tiny_model):
    src, out = tmp_path / "in", tmp_path / "out"
    keys = sorted(make_tree(src, 3))  # the order the dataset lists them
    worker, batch = actor(tmp_path, tiny_model, src, out)
    worker(batch)
    with ManifestWriter(out / "_manifest.jsonl", "merge") as manifest:
        from pipeline.inference.job_output import _merge_staging

        _merge_staging(out, manifest)
    moved = tmp_path / "moved"
    shutil.copytree(out, moved, copy_function=shutil.copyfile)  # new times, same bytes
    (moved / keys[1]).write_bytes(b"edited by the user")
    dataset = open_dataset(src)

    def plan(overwrite):
        return plan_inputs(dataset.keys, null_rows=set(), problems=[], output_kind="folder",
                           state=read_state(moved / "_manifest.jsonl"), root=moved, overwrite=overwrite,
                           row_name=dataset.name)

    first = plan(False)
    outcome = {e.key: (e.status, e.reason) for e in first.early}
    assert outcome[keys[0]][0] == SKIPPED and outcome[keys[2]][0] == SKIPPED  # recognized by their SHA-256
    assert outcome[keys[1]][0] == FAILED and "was not written by n2n" in outcome[keys[1]][1]
    assert first.todo == []
    again = plan(True)  # --overwrite redoes n2n's own outputs, never the edited one
    assert sorted(k for _, k in again.todo) == sorted([keys[0], keys[2]])
    assert {e.key: e.status for e in again.early} == {keys[1]: FAILED}
