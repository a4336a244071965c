"""docs/export.md's examples run as printed on exports made by its own commands, and give n2n's
output (ONNX Runtime and plain torch in five lines each; the zoo package through bioimageio.core)."""
import os
import pathlib
import re
import subprocess
import sys

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from n2n import Denoiser
from pipeline.cli import main
from tests.export_helpers import photos

DOC = pathlib.Path(__file__).resolve().parents[1] / "docs" / "export.md"


def _block(section: str) -> str:
    text = DOC.read_text()
    part = text[text.index(f"## {section}"):]
    part = part[:part.index("\n## ", 4)] if "\n## " in part[4:] else part
    return re.search(r"```python\n(.*?)```", part, re.S).group(1)


def _run_block(code: str, noisy: np.ndarray, folder: pathlib.Path, as_tensor: bool = False) -> np.ndarray:
    """Run a doc block in a fresh Python in `folder`, with `noisy` given (a numpy array, or a
    torch tensor when `as_tensor`); returns its `clean`."""
    np.save(folder / "noisy.npy", noisy)
    script = ("import numpy as np, torch\nnoisy = np.load('noisy.npy')\n"
              + ("noisy = torch.from_numpy(noisy)\n" if as_tensor else "")
              + "exec(open('block.py').read())\n"
              "np.save('clean.npy', clean.numpy() if hasattr(clean, 'numpy') else np.asarray(clean))\n")
    (folder / "block.py").write_text(code)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    run = subprocess.run([sys.executable, "-c", script], cwd=folder, capture_output=True, text=True, env=env,
                         timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    return np.load(folder / "clean.npy")


def _export(folder, *args):
    cwd = os.getcwd()
    os.chdir(folder)
    try:
        result = CliRunner().invoke(main, ["export", *args])
    finally:
        os.chdir(cwd)
    assert result.exit_code == 0, result.output


@pytest.fixture(scope="module")
def denoiser():
    return Denoiser.load("default", device="cpu", tile=0)


def test_onnx_runtime_in_five_lines(tmp_path, denoiser):
    pytest.importorskip("onnxruntime", reason="pip install 'n2n[export]'")
    pytest.importorskip("onnxscript", reason="pip install 'n2n[export]'")
    code = _block("ONNX")
    assert len(code.strip().splitlines()) == 5
    _export(tmp_path, "default", "denoiser.onnx")  # the command the block names
    noisy = photos(3)[0]  # (97, 131, 3) float32
    clean = _run_block(code, noisy, tmp_path)
    assert clean.shape == noisy.shape and np.abs(clean - denoiser.denoise(noisy)).max() <= 1e-4


def test_plain_torch_in_five_lines(tmp_path, denoiser):
    code = _block("Plain torch")
    assert len(code.strip().splitlines()) == 5
    _export(tmp_path, "default", "denoiser", "--format", "torch")
    noisy = np.stack([p.transpose(2, 0, 1) for p in photos(3)[1:2]] * 2)  # (2, 3, 77, 45)
    clean = _run_block(code, noisy, tmp_path, as_tensor=True)
    assert clean.shape == noisy.shape
    assert np.abs(clean - denoiser.denoise(torch.from_numpy(noisy)).numpy()).max() <= 1e-4


@pytest.mark.slow
def test_zoo_package_predicts_with_bioimageio_core(tmp_path, denoiser):
    pytest.importorskip("bioimageio.core", reason="pip install 'n2n[bioimageio]'")
    _export(tmp_path, "default", "denoiser.zip")
    noisy = np.random.default_rng(0).random((1, 3, 48, 64), dtype=np.float32)
    clean = _run_block(_block("BioImage Model Zoo"), noisy, tmp_path)
    assert clean.shape == noisy.shape
    assert np.abs(clean - denoiser.denoise(torch.from_numpy(noisy)).numpy()).max() <= 1e-4
