"""`n2n export --format bioimageio`: a BioImage Model Zoo package whose both weight formats give
n2n's output, checked here directly and by the zoo's own packages (bioimageio.spec validates the
description, bioimageio.core runs the model on its test tensors) when they are installed."""
import importlib.util
import io
import sys
import zipfile

import numpy as np
import pytest
import torch
import yaml

from n2n_core import load_checkpoint
from pipeline.assets import default_model_path
from pipeline.export.bioimageio_format import FORMAT_VERSION, PackageInfo
from pipeline.export.run import ExportConfig, run_export
from tests.export_helpers import train_checkpoint

pytest.importorskip("onnxscript", reason="the package's ONNX weights need onnxscript: pip install 'n2n[export]'")
ort = pytest.importorskip("onnxruntime", reason="running the ONNX weights needs onnxruntime: pip install 'n2n[export]'")

TOLERANCE = 1e-4
MEMBERS = {"rdf.yaml", "README.md", "cover.png", "n2n_model.py", "weights.pt", "weights.onnx", "test_input.npy",
           "test_output.npy", "sample_input.png", "sample_output.png"}


def _package(source, out, **info):
    run_export(ExportConfig(model=str(source), output=str(out), format="bioimageio", package=PackageInfo(**info)))
    return out


@pytest.fixture(scope="module")
def trained_package(tmp_path_factory):
    folder = tmp_path_factory.mktemp("zoo")
    train_checkpoint(folder / "model.n2n", "seed-deep-grey")
    return load_checkpoint(folder / "model.n2n").model.eval(), _package(
        folder / "model.n2n", folder / "model.zip", name="n2n test denoiser", authors=("A. Tester",))


@pytest.fixture(scope="module")
def default_package(tmp_path_factory):
    out = tmp_path_factory.mktemp("zoo") / "default.zip"
    return load_checkpoint(default_model_path()).model.eval(), _package("default", out)


def _read(path):
    with zipfile.ZipFile(path) as archive:
        return {name: archive.read(name) for name in archive.namelist()}


def _check_package(model, path):
    files = _read(path)
    assert set(files) == MEMBERS
    rdf = yaml.safe_load(files["rdf.yaml"])
    multiple = model.size_multiple
    assert rdf["format_version"] == FORMAT_VERSION and rdf["type"] == "model"
    assert [a["size"] for a in rdf["inputs"][0]["axes"][2:]] == [{"min": multiple, "step": multiple}] * 2
    assert rdf["weights"]["onnx"]["opset_version"] == 18
    assert rdf["weights"]["pytorch_state_dict"]["architecture"]["kwargs"] == model.config.kwargs
    test_input, test_output = (np.load(io.BytesIO(files[name])) for name in ("test_input.npy", "test_output.npy"))
    assert test_input.dtype == test_output.dtype == np.float32 and test_input.shape[0] == 1
    # the test output is n2n's own output
    ours = model(torch.from_numpy(test_input)).clamp(0, 1).numpy()
    np.testing.assert_allclose(test_output, ours, rtol=0, atol=1e-6)
    # the ONNX weights reproduce it
    session = ort.InferenceSession(files["weights.onnx"], providers=["CPUExecutionProvider"])
    onnx_out = np.clip(session.run(None, {"input": test_input})[0], 0, 1)
    assert np.abs(onnx_out - test_output).max() <= TOLERANCE
    # the torch weights reproduce it: a state dict read without unpickling objects, in the shipped module
    spec = importlib.util.spec_from_loader("zoo_n2n_model", loader=None)
    module = importlib.util.module_from_spec(spec)
    exec(compile(files["n2n_model.py"], "n2n_model.py", "exec"), module.__dict__)
    architecture = rdf["weights"]["pytorch_state_dict"]["architecture"]
    net = getattr(module, architecture["callable"])(**architecture["kwargs"])
    net.load_state_dict(torch.load(io.BytesIO(files["weights.pt"]), weights_only=True), strict=True)
    with torch.no_grad():
        torch_out = net.eval()(torch.from_numpy(test_input)).clamp(0, 1).numpy()
    assert np.abs(torch_out - test_output).max() <= TOLERANCE
    return rdf


def _validate_with_the_zoos_packages(path):
    spec = pytest.importorskip("bioimageio.spec", reason="validating needs bioimageio.spec: pip install 'n2n[bioimageio]'")
    core = pytest.importorskip("bioimageio.core", reason="running the package needs bioimageio.core: "
                                                         "pip install 'n2n[bioimageio]'")
    description = spec.load_description(str(path))
    summary = description.validation_summary
    assert summary.status in ("valid-format", "passed"), summary.format()
    result = core.test_model(str(path))
    assert result.status == "passed", result.format()
    # The one warning left: no maintainer's GitHub user name (`--maintainer`, which the zoo asks for
    # to upload); the spec checks such a name with GitHub, which tests cannot reach.
    warnings = [w.msg for d in result.details for w in d.warnings if w.severity >= 30]  # not the "info" notes
    assert len(warnings) == 1 and "maintainers" in warnings[0], warnings


def test_trained_checkpoint_package(trained_package):
    model, path = trained_package
    rdf = _check_package(model, path)
    assert rdf["name"] == "n2n test denoiser" and rdf["authors"] == [{"name": "A. Tester"}]
    assert rdf["inputs"][0]["axes"][1]["channel_names"] == ["grey"]
    _validate_with_the_zoos_packages(path)


@pytest.mark.slow
def test_default_model_package(default_package):
    model, path = default_package
    rdf = _check_package(model, path)
    assert rdf["inputs"][0]["axes"][1]["channel_names"] == ["red", "green", "blue"]
    assert "the n2n default model" in _read(path)["README.md"].decode()
    _validate_with_the_zoos_packages(path)
