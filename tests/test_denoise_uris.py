"""`n2n denoise` with URIs, the parts that need no Ray: what is refused before anything is
created (S3 through moto's server on loopback), the model read from a URI, the IN/OUT
overlap of object-store URIs, and the shared-storage marker check in one process.

The runs on a 3-node cluster are in test_denoise_store_cluster.py (slow)."""
import pytest
import torch

from n2n_core import build_model, save_checkpoint
from pipeline.errors import UsageError
from pipeline.inference import DenoiseConfig, run_denoise
from pipeline.inference.inputs import read_model as _read_model
from pipeline.inference.preflight import check_separate
from pipeline.inference.shared_storage import NotSharedError, check_marker, write_marker
from pipeline.inference.outputs import create_staging
from object_stores import s3_server
from tests.denoise_helpers import make_tree


@pytest.fixture(scope="module")
def s3():
    yield from s3_server()


@pytest.fixture(scope="module")
def model_bytes(tmp_path_factory):
    path = tmp_path_factory.mktemp("model") / "tiny.n2n"
    save_checkpoint(path, build_model("unet", depth=1, width=4, generator=torch.Generator().manual_seed(0)))
    return path.read_bytes()


@pytest.mark.parametrize("out", ["s3://n2n-test/photos", "s3://n2n-test/photos/", "s3://n2n-test//photos/.",
                                 "s3://n2n-test/photos?scheme=http"])
def test_uri_out_equal_to_in_is_refused_however_spelled(out):
    with pytest.raises(UsageError, match="is IN"):
        check_separate("s3://n2n-test/photos", out)


def test_uri_out_inside_in_and_in_inside_out_are_refused_and_neighbours_are_not():
    with pytest.raises(UsageError, match="is inside IN"):
        check_separate("s3://n2n-test/photos", "s3://n2n-test/photos/denoised")
    with pytest.raises(UsageError, match="is inside OUT"):
        check_separate("s3://n2n-test/photos/2024", "s3://n2n-test/photos")
    check_separate("s3://n2n-test/photos", "s3://n2n-test/photos-denoised")  # a sibling prefix, not inside
    check_separate("s3://n2n-test/photos", "gs://n2n-test/photos")  # another store
    check_separate("s3://n2n-test/photos", "/tmp/photos")


def test_refusals_on_s3_create_and_delete_nothing(s3, tmp_path, model_bytes):
    photos = s3.put_folder(make_tree_dir(tmp_path), "refuse/photos")
    with s3.fs.open_output_stream(f"{s3.bucket}/refuse/model.n2n") as f:
        f.write(model_bytes)
    with s3.fs.open_output_stream(f"{s3.bucket}/refuse/theirs/data.csv") as f:
        f.write(b"someone else's\n")
    before = s3.keys("refuse")
    model = s3.uri("refuse/model.n2n")
    for out, match in [(photos, "is IN"), (photos + "/", "is IN"), (photos + "/denoised", "is inside IN"),
                       (s3.uri("refuse/theirs"), "holds no n2n manifest"),
                       (s3.uri("refuse/model.n2n"), "is an object, not a folder")]:
        with pytest.raises(UsageError, match=match):
            run_denoise(DenoiseConfig(input=photos, output=out, model=model, progress=False))
    with pytest.raises(UsageError, match="--model .*missing.n2n.*no such file"):
        run_denoise(DenoiseConfig(input=photos, output=s3.uri("refuse/new"), model=s3.uri("refuse/missing.n2n"),
                                  progress=False))
    assert s3.keys("refuse") == before


def make_tree_dir(tmp_path):
    folder = tmp_path / "photos"
    make_tree(folder, 3)
    return folder


def test_model_from_a_uri_is_read_once_as_bytes(s3, tmp_path, model_bytes):
    with s3.fs.open_output_stream(f"{s3.bucket}/models/tiny.n2n") as f:
        f.write(model_bytes)
    assert _read_model(s3.uri("models/tiny.n2n")) == model_bytes
    local = tmp_path / "tiny.n2n"
    local.write_bytes(model_bytes)
    assert _read_model(str(local)) == model_bytes
    assert _read_model(f"file://{local}") == model_bytes
    with s3.fs.open_output_stream(f"{s3.bucket}/models/broken.n2n") as f:
        f.write(model_bytes[:100])
    with pytest.raises(UsageError, match="--model .*broken.n2n"):
        _read_model(s3.uri("models/broken.n2n"))


def test_the_marker_check_refuses_a_process_that_sees_another_folder(tmp_path, monkeypatch):
    out = tmp_path / "out"
    out.mkdir()
    create_staging(out, "run-1")
    token = write_marker(str(out), "run-1")
    check_marker(str(out), "run-1", token)  # this process sees it
    with pytest.raises(NotSharedError, match="another token"):
        check_marker(str(out), "run-1", "0" * 32)
    monkeypatch.setenv("N2N_TEST_NODE_ROOT", str(tmp_path / "elsewhere"))  # a node with its own disk
    with pytest.raises(NotSharedError, match="is not on shared storage: node .* cannot read the marker.*s3://"):
        check_marker(str(out), "run-1", token)
    (tmp_path / "elsewhere" / str(out.relative_to("/")) / "_n2n_tmp" / "run-1").mkdir(parents=True)
    (tmp_path / "elsewhere" / str(out.relative_to("/")) / "_n2n_tmp" / "run-1" / "shared-check").write_text("x" * 32)
    with pytest.raises(NotSharedError, match="sees another folder there"):
        check_marker(str(out), "run-1", token)


def test_the_actor_pool_grows_with_the_cluster_up_to_workers_or_the_gpus():
    """ActorPoolStrategy(min 1, initial what fits now, max --workers; on GPUs unbounded, on
    CPUs what fits now): the arguments are accepted by Ray Data as given."""
    import ray.data

    from pipeline.inference.stream import pool_size as _pool_size

    cases = [(dict(workers=8), "cuda", 2, {"min_size": 1, "max_size": 8, "initial_size": 2}),
             (dict(), "cuda", 2, {"min_size": 1, "max_size": None, "initial_size": 2}),
             (dict(), "cpu", 4, {"min_size": 1, "max_size": 4, "initial_size": 4}),
             (dict(workers=2), "cpu", 4, {"min_size": 1, "max_size": 2, "initial_size": 2})]
    for options, device, fits_now, expected in cases:
        config = DenoiseConfig(input="in", output="out", **options)
        assert _pool_size(config, device, fits_now) == expected
        strategy = ray.data.ActorPoolStrategy(**expected)
        assert (strategy.min_size, strategy.initial_size) == (1, expected["initial_size"])


def test_file_uris_for_in_out_and_model_then_a_rerun_skips(tmp_path, model_bytes):
    """file:// is the local file system: the same outputs, manifest and resume as plain paths."""
    from ray_support import private_ray

    keys = make_tree(tmp_path / "photos", 3)
    (tmp_path / "tiny.n2n").write_bytes(model_bytes)
    config = DenoiseConfig(input=f"file://{tmp_path}/photos", output=f"file://{tmp_path}/out",
                           model=f"file://{tmp_path}/tiny.n2n", workers=1, progress=False)
    ray_session = private_ray(num_cpus=1, log_to_driver=False)
    next(ray_session)
    try:
        first = run_denoise(config)
        again = run_denoise(config)
    finally:
        ray_session.close()
    assert (first.done, first.failed, again.skipped) == (3, 0, 3), first.format() + again.format()
    assert first.output == str(tmp_path / "out")
    assert sorted(p.relative_to(tmp_path / "out").as_posix() for p in (tmp_path / "out").rglob("*")
                  if p.is_file()) == sorted(keys + ["_manifest.jsonl"])
