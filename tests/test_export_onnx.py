"""`n2n export --format onnx`: ONNX Runtime gives n2n_core's output to 1e-4 (float32), on random
images of many shapes and on real photos of odd sizes padded as n2n pads them, for the default
model and freshly trained checkpoints; the file says its opset and size multiple."""
import json

import numpy as np
import pytest
import torch

from n2n_core import load_checkpoint
from pipeline.export.run import ExportConfig, run_export
from pipeline.inference.tiling import reflect_pad_to
from tests.export_helpers import TRAINED, n2n_denoise, onnx_denoise, photos, train_checkpoint

onnx = pytest.importorskip("onnx", reason="the ONNX export needs onnx: pip install 'n2n[export]'")
pytest.importorskip("onnxscript", reason="torch's ONNX exporter needs onnxscript: pip install 'n2n[export]'")
ort = pytest.importorskip("onnxruntime", reason="running the export needs onnxruntime: pip install 'n2n[export]'")

TOLERANCE = 1e-4


def _session(path):
    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _export(model_source, out):
    result = run_export(ExportConfig(model=str(model_source), output=str(out), format="onnx"))
    assert result.output == out and out.is_file()
    return out


@pytest.fixture(scope="module")
def default_onnx(tmp_path_factory):
    return _export("default", tmp_path_factory.mktemp("onnx") / "default.onnx")


@pytest.fixture(scope="module", params=sorted(TRAINED))
def trained_onnx(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp("trained")
    train_checkpoint(folder / "model.n2n", request.param)
    return folder / "model.n2n", _export(folder / "model.n2n", folder / "model.onnx")


def _check(checkpoint_source, onnx_path, shapes):
    model = load_checkpoint(checkpoint_source).model.eval()
    session, multiple = _session(onnx_path), model.size_multiple
    channels = model.config.kwargs["in_channels"]
    worst = 0.0
    for batch, h_blocks, w_blocks in shapes:  # random images straight in: dynamic batch, height, width
        x = torch.rand(batch, channels, h_blocks * multiple, w_blocks * multiple)
        theirs = session.run(None, {"input": x.numpy()})[0]
        worst = max(worst, float(np.abs(theirs - model(x).numpy()).max()))
    for photo in photos(channels):  # real photos of odd sizes, padded as n2n pads them
        assert photo.shape[0] % multiple or photo.shape[1] % multiple
        ours, theirs = n2n_denoise(model, photo), onnx_denoise(session, photo, multiple)
        assert theirs.shape == photo.shape
        worst = max(worst, float(np.abs(theirs - ours).max()))
    assert worst <= TOLERANCE, f"ONNX Runtime differs from n2n_core by {worst:.2e} (> {TOLERANCE})"
    return model


def test_default_model_in_onnx_runtime_matches_n2n(default_onnx):
    from pipeline.assets import default_model_path

    model = _check(default_model_path(), default_onnx, [(1, 1, 1), (2, 3, 2), (1, 5, 7)])
    proto = onnx.load(str(default_onnx))
    assert [o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")] == [18]
    meta = {p.key: p.value for p in proto.metadata_props}
    assert meta["n2n.size_multiple"] == str(model.size_multiple) == "16"
    assert meta["n2n.opset"] == "18" and meta["n2n.source"] == "the n2n default model"
    assert json.loads(meta["n2n.architecture"]) == {"name": "unet", "kwargs": model.config.kwargs}
    dims = [[d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim] for v in (*proto.graph.input,
                                                                                          *proto.graph.output)]
    assert dims == [["batch", 3, "height", "width"]] * 2


def test_trained_checkpoints_in_onnx_runtime_match_n2n(trained_onnx):
    checkpoint, path = trained_onnx
    model = _check(checkpoint, path, [(1, 1, 1), (3, 2, 5)])
    meta = {p.key: p.value for p in onnx.load(str(path)).metadata_props}
    assert meta["n2n.size_multiple"] == str(model.size_multiple)
    assert meta["n2n.source"] == "checkpoint model.n2n (step 25)"


@pytest.mark.parametrize("height, width, multiple", [(5, 9, 16), (3, 2, 16), (1, 7, 4), (2, 1, 16), (17, 33, 16), (16, 16, 16)])
def test_numpy_reflect_padding_is_n2ns(height, width, multiple):
    """docs/export.md pads with numpy's "reflect": the same pixels as n2n's padding, even
    for pads wider than the image (repeated reflection)."""
    x = torch.rand(1, 2, height, width)
    ours = reflect_pad_to(x, -(-height // multiple) * multiple, -(-width // multiple) * multiple)
    theirs = np.pad(x.numpy(), ((0, 0), (0, 0), (0, -height % multiple), (0, -width % multiple)), mode="reflect")
    np.testing.assert_array_equal(theirs, ours.numpy())
