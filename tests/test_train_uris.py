"""Training paths as URIs: data read from s3://, the run written to and resumed from s3:// (moto's S3
server on loopback), file:// URIs, and no half-written object under a final name.

These run without Ray (`ray=False`, the driver's I/O is the same with Ray); the 3-node
cluster version is tests/test_train_store_cluster.py.
"""
import json

import pytest

from n2n_core import load_checkpoint
from pipeline.errors import UsageError
from pipeline.training import train
from pipeline.training.run_dir import RunDir
from object_stores import s3_server
from train_support import assert_weights_close, images, interrupt_after, reference_weights, tiny_config  # noqa: F401 (fixture)


@pytest.fixture(scope="module")
def s3():
    yield from s3_server()


def test_run_on_s3_is_resumed_from_s3_to_the_uninterrupted_weights(s3, images, tmp_path):
    data = s3.put_folder(images, "data/images")
    out = s3.uri("runs/a")
    config = tiny_config(data, out, ray=False, steps=10, checkpoint_every=3, validate_every=5)
    interrupt_after(config, 5)
    assert s3.keys("runs/a") == ["checkpoints/step-00000003.n2n", "metrics.jsonl", "n2n-run.json"]

    result = train(config.replace(resume=True))
    assert result.steps == 10 and result.checkpoint == out + "/model.n2n"
    assert_weights_close(result.model.state_dict(), reference_weights(config), 1e-10, "resumed from s3")
    # checkpoints 3, 6, 9 and 10, the newest 3 kept; every final object complete, no temporary one left
    assert s3.keys("runs/a") == ["checkpoints/step-00000006.n2n", "checkpoints/step-00000009.n2n",
                                 "checkpoints/step-00000010.n2n", "metrics.jsonl", "model.n2n", "n2n-run.json",
                                 "training.png"]
    (tmp_path / "model.n2n").write_bytes(s3.read("runs/a/model.n2n"))
    final = load_checkpoint(tmp_path / "model.n2n")
    assert final.step == 10
    assert_weights_close(final.model.state_dict(), reference_weights(config), 1e-10, "model.n2n on s3")
    lines = [json.loads(t) for t in s3.read("runs/a/metrics.jsonl").decode().splitlines()]
    assert lines[0]["config"]["out"] == out
    assert [r["step"] for r in lines[1:] if "loss" in r] == list(range(1, 11))  # steps 4-5 of the crash dropped
    assert s3.read("runs/a/training.png")[:8] == b"\x89PNG\r\n\x1a\n"


def test_existing_checkpoints_on_s3_need_resume(s3, images):
    out = s3.uri("runs/b")
    train(tiny_config(images, out, ray=False, steps=2, validation_images=0))
    with pytest.raises(UsageError, match="runs/b.* already holds checkpoints: pass --resume"):
        train(tiny_config(images, out, ray=False, steps=4, validation_images=0))


def test_corrupt_checkpoint_on_s3_is_named_by_its_uri(s3, images):
    with s3.fs.open_output_stream(f"{s3.bucket}/runs/c/checkpoints/step-00000004.n2n") as f:
        f.write(b"\x10\x00\x00\x00\x00\x00\x00\x00{not a header")
    with pytest.raises(UsageError, match=r"^--resume: s3://n2n-test/runs/c/checkpoints/step-00000004\.n2n: "):
        train(tiny_config(images, s3.uri("runs/c"), ray=False, steps=6, resume=True))


def test_a_failed_save_leaves_nothing_on_s3(s3):
    run = RunDir(s3.uri("runs/d"))
    try:
        run.create()

        def save_half_then_fail(path):
            path.write_bytes(b"half a checkpoint")
            raise OSError("disk full")

        with pytest.raises(OSError, match="disk full"):
            run.write_checkpoint("checkpoints/step-00000001.n2n", save_half_then_fail)
        assert s3.keys("runs/d") == ["n2n-run.json"] and run.checkpoints() == []
        run.write_checkpoint("checkpoints/step-00000002.n2n", lambda path: path.write_bytes(b"whole"))
        assert s3.keys("runs/d") == ["checkpoints/step-00000002.n2n", "n2n-run.json"]  # the temporary object was
        # moved, not kept
    finally:
        run.close()


def test_endpoint_in_the_uri_query_reaches_the_same_server(s3, images):
    host_port = s3.endpoint.removeprefix("http://")
    out = f"s3://{s3.bucket}/runs/e?endpoint_override={host_port}&scheme=http"
    result = train(tiny_config(images, out, ray=False, steps=2, validation_images=0))
    assert result.checkpoint == f"s3://{s3.bucket}/runs/e/model.n2n?endpoint_override={host_port}&scheme=http"
    assert "model.n2n" in s3.keys("runs/e")


def test_file_uri_out_is_a_local_folder(images, tmp_path):
    out = tmp_path / "run"
    result = train(tiny_config(images, out.as_uri(), ray=False, steps=2))
    assert result.checkpoint == out / "model.n2n"
    assert load_checkpoint(out / "model.n2n").step == 2 and (out / "checkpoints" / "step-00000002.n2n").is_file()
    assert (out / "metrics.jsonl").is_file() and (out / "training.png").is_file()
