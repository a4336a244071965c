"""A checkpoint fresh from `n2n train`, exported by `n2n export` in all three formats: each gives
n2n's output (1e-4, float32) on real photos of odd sizes."""
import io
import os
import zipfile

import numpy as np
import pytest
from click.testing import CliRunner

from n2n_core import load_checkpoint
from pipeline.cli import main
from tests.export_helpers import n2n_denoise, onnx_denoise, photos
from tests.test_export_bioimageio import _check_package
from tests.test_export_torch import test_loads_with_torch_alone_and_matches_n2n as check_torch_export
from train_support import make_images

ort = pytest.importorskip("onnxruntime", reason="running the export needs onnxruntime: pip install 'n2n[export]'")
pytest.importorskip("onnxscript", reason="torch's ONNX exporter needs onnxscript: pip install 'n2n[export]'")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    folder = tmp_path_factory.mktemp("run")
    make_images(folder / "images", count=4, size=32)
    result = CliRunner().invoke(main, [
        "train", "--data", str(folder / "images"), "--out", str(folder / "run"), "--no-ray", "--arch", "unet",
        "--arch-arg", "depth=2", "--arch-arg", "width=8", "--arch-arg", "residual=true", "--steps", "6",
        "--batch-size", "2", "--crop-size", "16", "--checkpoint-every", "6", "--validate-every", "6",
        "--validation-images", "1", "--validation-size", "16", "--no-progress"])
    assert result.exit_code == 0, result.output
    checkpoint = folder / "run" / "model.n2n"
    assert checkpoint.is_file(), os.listdir(folder / "run")
    return folder, checkpoint, load_checkpoint(checkpoint).model.eval()


def _export(checkpoint, out, fmt):
    result = CliRunner().invoke(main, ["export", str(checkpoint), str(out), "--format", fmt])
    assert result.exit_code == 0, result.output
    return out


def test_onnx_of_a_freshly_trained_run(trained):
    folder, checkpoint, model = trained
    session = ort.InferenceSession(str(_export(checkpoint, folder / "model.onnx", "onnx")),
                                   providers=["CPUExecutionProvider"])
    worst = max(float(np.abs(onnx_denoise(session, p, model.size_multiple) - n2n_denoise(model, p)).max())
                for p in photos(3))
    assert worst <= 1e-4, worst


def test_torch_export_of_a_freshly_trained_run(trained):
    folder, checkpoint, model = trained
    check_torch_export((model, _export(checkpoint, folder / "torch", "torch")))


def test_zoo_package_of_a_freshly_trained_run(trained):
    folder, checkpoint, model = trained
    path = _export(checkpoint, folder / "model.zip", "bioimageio")
    _check_package(model, path)
    readme = zipfile.ZipFile(path).read("README.md").decode()
    assert "checkpoint model.n2n (step 6)" in readme
