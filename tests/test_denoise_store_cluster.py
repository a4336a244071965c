"""Bulk denoising on a 3-node cluster (ray.cluster_utils.Cluster: a head without CPUs and two
2-CPU workers), from and to S3 (moto's server on loopback) and Google Cloud Storage
(gcp-storage-emulator on loopback; tests/object_stores.py), and into a local OUT that the
actors' nodes must share.

The nodes inherit the stores' endpoints and credentials from the environment they were
started with (AWS_ENDPOINT_URL_S3, CLOUD_STORAGE_EMULATOR_ENDPOINT, ...), as nodes of a real
cluster get them from their instance profile or service account. The driver runs on the head, which has no CPU, so every actor runs on another
node than the driver: the shared-storage check of a local OUT always applies here.
"""
import io
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from n2n_core import build_model, save_checkpoint
from pipeline.errors import UsageError
from pipeline.inference import DenoiseConfig, run_denoise
from pipeline.inference import job as job_module
from pipeline.inference import read_manifest
from pipeline.inference.remote import RemoteTree
from object_stores import gcs_server, s3_server, store_cluster
from tests.denoise_helpers import make_image, make_tree

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def s3():
    yield from s3_server()


@pytest.fixture(scope="module")
def gcs():
    yield from gcs_server()


@pytest.fixture(scope="module")
def cluster(s3, gcs):  # after the stores: the nodes start with their environment
    yield from store_cluster(connect=False)


@pytest.fixture(params=["s3", "gs"])
def store(request, s3, gcs):
    return s3 if request.param == "s3" else gcs


@pytest.fixture(scope="module")
def models(s3, gcs, tmp_path_factory):
    """The checkpoint as a URI in each store, by scheme: no node has it on disk."""
    path = tmp_path_factory.mktemp("model") / "tiny.n2n"
    save_checkpoint(path, build_model("unet", depth=1, width=4, generator=torch.Generator().manual_seed(0)))
    for bucket in (s3, gcs):
        with bucket.fs.open_output_stream(f"{bucket.bucket}/models/tiny.n2n") as f:
            f.write(path.read_bytes())
    return {bucket.scheme: bucket.uri("models/tiny.n2n") for bucket in (s3, gcs)}


@pytest.fixture
def model(models):
    return models["s3"]


def config(c, src, out, model, **options):
    return DenoiseConfig(input=src, output=out, model=model, address=c.address, workers=4, batch_size=2,
                         progress=False, **options)


def mtimes(s3, key):
    selector = pafs.FileSelector(f"{s3.bucket}/{key}", recursive=True)
    return {i.path: i.mtime_ns for i in s3.fs.get_file_info(selector) if i.type == pafs.FileType.File}


def test_png_tree_from_a_bucket_to_a_bucket_then_resume_skips_what_is_done(store, cluster, models, tmp_path,
                                                                           monkeypatch):
    c, _ = cluster
    model = models[store.scheme]
    keys = make_tree(tmp_path / "photos", 12)
    src = store.put_folder(tmp_path / "photos", "tree/photos")
    out = store.uri("tree/denoised")
    summary = run_denoise(config(c, src, out, model, compare=2))
    assert (summary.total, summary.done, summary.failed) == (12, 12, 0), summary.format()
    assert summary.output == out and summary.manifest == out + "/_manifest.jsonl"
    written = store.keys("tree/denoised")
    assert [k for k in written if not k.startswith("_compare/")] == sorted(keys + ["_manifest.jsonl"])
    assert len([k for k in written if k.startswith("_compare/")]) == 2
    for key in keys:  # every output is a complete image of its input's size
        original = Image.open(io.BytesIO(store.read(f"tree/photos/{key}")))
        assert Image.open(io.BytesIO(store.read(f"tree/denoised/{key}"))).size == original.size
    manifest = read_manifest(out + "/_manifest.jsonl")
    assert {k: r["status"] for k, r in manifest.items()} == {k: "done" for k in keys}
    assert all(r["mtime_ns"] > 0 for r in manifest.values())  # the store's times, recorded after each upload
    before = mtimes(store, "tree/denoised")

    def no_download(self, relative):  # a resume compares sizes and times from one listing
        raise AssertionError(f"downloaded {relative} to hash it")

    monkeypatch.setattr(RemoteTree, "sha256", no_download)
    again = run_denoise(config(c, src, out, model))
    assert (again.done, again.skipped, again.failed) == (0, 12, 0), again.format()
    after = mtimes(store, "tree/denoised")
    assert {k: v for k, v in after.items() if not k.endswith("_manifest.jsonl")} == \
        {k: v for k, v in before.items() if not k.endswith("_manifest.jsonl")}  # nothing rewritten

    monkeypatch.undo()
    store.fs.delete_file(f"{store.bucket}/tree/denoised/{keys[3]}")  # a lost output is redone, only it
    third = run_denoise(config(c, src, out, model))
    assert (third.done, third.skipped) == (1, 11), third.format()
    assert keys[3] in store.keys("tree/denoised")


def test_interrupted_s3_run_resumes_without_redoing_landed_outputs(s3, cluster, model, tmp_path, monkeypatch):
    """The driver stops mid-run (an exception out of the progress loop, as Ctrl-C): its shards
    stay in OUT/_n2n_tmp and the rerun merges them, skips every output that landed and does
    the rest."""
    c, _ = cluster
    keys = make_tree(tmp_path / "photos", 16, seed=3)
    src = s3.put_folder(tmp_path / "photos", "stop/photos")
    out = s3.uri("stop/denoised")
    seen = []
    real_add = job_module._Counts.add

    def stop_after_four(self, entries):
        real_add(self, entries)
        seen.extend(entries)
        if len(seen) >= 4:
            raise KeyboardInterrupt

    monkeypatch.setattr(job_module._Counts, "add", stop_after_four)
    with pytest.raises(KeyboardInterrupt):
        run_denoise(config(c, src, out, model))
    monkeypatch.undo()
    landed = {k for k in s3.keys("stop/denoised") if k in keys}
    assert len(landed) >= 4 and any(k.startswith("_n2n_tmp/") for k in s3.keys("stop/denoised"))
    logged = read_manifest(out + "/_manifest.jsonl")  # main object + the killed run's shards
    assert landed <= {k for k, r in logged.items() if r["status"] == "done"}, "an output without its line"
    before = mtimes(s3, "stop/denoised")
    rerun = run_denoise(config(c, src, out, model))
    assert rerun.failed == 0 and rerun.done + rerun.skipped == 16, rerun.format()
    assert rerun.skipped >= len(landed)
    after = mtimes(s3, "stop/denoised")
    for key in landed:  # not rewritten
        assert after[f"{s3.bucket}/stop/denoised/{key}"] == before[f"{s3.bucket}/stop/denoised/{key}"]
    assert sorted(k for k in s3.keys("stop/denoised")) == sorted(keys + ["_manifest.jsonl"])  # staging gone


def test_driver_killed_mid_s3_run_resumes_without_redoing_landed_outputs(s3, cluster, model, tmp_path):
    """kill -9 of `n2n denoise s3://... s3://...` (the driver, attached to the cluster, as
    under `ray submit`) once 5 outputs are in the bucket: Ray ends the dead driver's actors,
    and the rerun skips every output that landed, keeping its object, and does the rest."""
    c, _ = cluster
    keys = make_tree(tmp_path / "photos", 40, seed=5, min_side=150, max_side=200)
    src = s3.put_folder(tmp_path / "photos", "kill/photos")
    out = s3.uri("kill/denoised")
    process = subprocess.Popen(
        [sys.executable, "-m", "pipeline.cli", "denoise", src, out, "--model", model, "--workers", "4",
         "--batch-size", "2", "--no-progress", "--address", c.address],
        cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, start_new_session=True,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 150
    try:
        while len(set(s3.keys("kill/denoised")) & set(keys)) < 5:
            assert process.poll() is None, "the job ended before it could be killed"
            assert time.monotonic() < deadline, "the job did not land 5 outputs in time"
            time.sleep(0.05)
    finally:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    # Ray kills a dead driver's actors; wait until the bucket is still (an actor killed mid-upload
    # leaves nothing: an object appears only complete)
    listing, still_since = mtimes(s3, "kill/denoised"), time.monotonic()
    while time.monotonic() - still_since < 3:
        time.sleep(0.5)
        now = mtimes(s3, "kill/denoised")
        if now != listing:
            listing, still_since = now, time.monotonic()
        assert time.monotonic() < deadline + 60, "outputs kept landing after the driver was killed"
    landed = {k for k in s3.keys("kill/denoised") if k in keys}
    assert 5 <= len(landed) < len(keys)
    logged = read_manifest(out + "/_manifest.jsonl")  # the main object (if any) and the killed run's shards
    assert landed <= {k for k, r in logged.items() if r["status"] == "done"}, "an output without its line"
    before = mtimes(s3, "kill/denoised")
    rerun = run_denoise(config(c, src, out, model))
    assert rerun.failed == 0 and rerun.done + rerun.skipped == len(keys), rerun.format()
    assert rerun.skipped >= len(landed) and rerun.done == len(keys) - rerun.skipped
    after = mtimes(s3, "kill/denoised")
    for key in landed:  # not rewritten
        assert after[f"{s3.bucket}/kill/denoised/{key}"] == before[f"{s3.bucket}/kill/denoised/{key}"]
    assert s3.keys("kill/denoised") == sorted(keys + ["_manifest.jsonl"])  # staging gone
    for key in keys[::9]:  # complete images
        assert Image.open(io.BytesIO(s3.read(f"kill/denoised/{key}"))).size == \
            Image.open(io.BytesIO(s3.read(f"kill/photos/{key}"))).size


@pytest.mark.parametrize("store", ["s3"], indirect=True)  # the GCS emulator hangs on pyarrow's random-access reads
def test_parquet_table_in_a_bucket_to_parquet_in_the_bucket(store, cluster, models, tmp_path):
    import numpy as np

    c, _ = cluster
    model = models[store.scheme]
    rng = np.random.default_rng(0)
    table = pa.table({"path": [f"row{i}.png" for i in range(10)],
                      "image": [make_image(rng, "PNG", "RGB", 24, 32) for _ in range(10)],
                      "label": list(range(10))})
    with store.fs.open_output_stream(f"{store.bucket}/table/photos.parquet") as f:
        pq.write_table(table, f)
    out = store.uri("table/denoised.parquet")
    summary = run_denoise(config(c, store.uri("table/photos.parquet"), out, model))
    assert (summary.done, summary.failed) == (10, 0), summary.format()
    parts = [k for k in store.keys("table/denoised.parquet") if k != "_manifest.jsonl"]
    assert parts and all(k.startswith("part-") and k.endswith(".parquet") for k in parts)
    result = pq.read_table(f"{store.bucket}/table/denoised.parquet", filesystem=store.fs).sort_by("label")
    assert result.column("path").to_pylist() == table.column("path").to_pylist()
    assert result.column("image").to_pylist() == table.column("image").to_pylist()  # carried untouched
    assert all(Image.open(io.BytesIO(b)).size == (32, 24) for b in result.column("denoised").to_pylist())
    again = run_denoise(config(c, store.uri("table/photos.parquet"), out, model))
    assert (again.done, again.skipped) == (0, 10), again.format()
    assert [k for k in store.keys("table/denoised.parquet") if k != "_manifest.jsonl"] == parts


def test_local_out_on_the_cluster_passes_the_shared_storage_check(s3, cluster, model, tmp_path):
    """Nodes of one machine share its disk: every actor node reads the driver's marker."""
    c, _ = cluster
    keys = make_tree(tmp_path / "photos", 4)
    summary = run_denoise(config(c, str(tmp_path / "photos"), str(tmp_path / "out"), model))
    assert summary.done == 4, summary.format()
    assert sorted(p.relative_to(tmp_path / "out").as_posix() for p in (tmp_path / "out").rglob("*")
                  if p.is_file()) == sorted(keys + ["_manifest.jsonl"])  # marker and staging gone


def test_local_out_a_node_does_not_see_is_refused_in_one_line(s3, cluster, model, tmp_path):
    """A node whose actors see another folder at OUT's path (N2N_TEST_NODE_ROOT, the one test
    hook of shared_storage.py: nodes of one machine cannot have disks of their own): the job
    refuses before any input is touched and leaves nothing behind."""
    c, _ = cluster
    make_tree(tmp_path / "photos", 4)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    node = c.add_node(num_cpus=1, env_vars={"N2N_TEST_NODE_ROOT": str(elsewhere)})
    try:
        c.wait_for_nodes()
        out = tmp_path / "out"
        with pytest.raises(UsageError) as info:
            run_denoise(config(c, str(tmp_path / "photos"), str(out), model))
        message = str(info.value)
        assert "\n" not in message and "is not on shared storage" in message and "s3://" in message, message
        assert repr(str(out)) in message and node.node_ip_address in message
        assert not out.exists(), "OUT left behind"
        assert list(elsewhere.rglob("*")) == []
    finally:
        c.remove_node(node)
