"""`n2n export --format torch`: a folder with one self-contained `.py` (torch.nn, torch alone) and
a `.safetensors` of its weights; loaded by a Python that imports neither n2n nor its
dependencies, it gives n2n_core's outputs (1e-4, float32), odd sizes included."""
import ast
import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from n2n_core import load_checkpoint
from pipeline.assets import default_model_path
from pipeline.export.run import ExportConfig, run_export
from tests.export_helpers import TRAINED, n2n_denoise, photos, train_checkpoint

TOLERANCE = 1e-4
STDLIB = {"__future__", "json", "struct", "pathlib"}

# Run in a fresh interpreter, in the export folder, with nothing of n2n on its path: load, run
# the inputs saved beside it, save the outputs, and report which modules it imported.
LOADER = """
import json, sys, torch
sys.path.insert(0, ".")
from n2n_model import load, denoise
model = load()
inputs = torch.load("inputs.pt", weights_only=True)
outputs = {"raw": model(inputs["raw"]).detach(), "photos": [denoise(model, x) for x in inputs["photos"]]}
torch.save(outputs, "outputs.pt")
print(json.dumps(sorted(name for name in sys.modules if name.split(".")[0] in
                        ("n2n", "n2n_core", "pipeline", "ray", "onnx", "safetensors", "PIL", "click"))))
"""


def _export(source, out):
    result = run_export(ExportConfig(model=str(source), output=str(out), format="torch"))
    assert result.output == out
    return out


@pytest.fixture(scope="module", params=["default", *sorted(TRAINED)])
def exported(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp("torch")
    if request.param == "default":
        source = default_model_path()
        _export("default", folder / "out")
    else:
        source = folder / "model.n2n"
        train_checkpoint(source, request.param)
        _export(source, folder / "out")
    return load_checkpoint(source).model.eval(), folder / "out"


def test_folder_holds_the_module_and_its_weights(exported):
    model, out = exported
    assert sorted(p.name for p in out.iterdir()) == ["n2n_model.py", "n2n_model.safetensors"]
    tree = ast.parse((out / "n2n_model.py").read_text())
    imported = {alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import)
                for alias in node.names}
    imported |= {node.module.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    assert imported <= {"torch"} | STDLIB, f"n2n_model.py imports {sorted(imported - {'torch'} - STDLIB)}"


def test_loads_with_torch_alone_and_matches_n2n(exported):
    model, out = exported
    channels, multiple = model.config.kwargs["in_channels"], model.size_multiple
    raw = torch.rand(2, channels, 2 * multiple, 3 * multiple)
    images = photos(channels)
    tensors = [torch.from_numpy(np.ascontiguousarray(p.transpose(2, 0, 1)))[None] for p in images]
    torch.save({"raw": raw, "photos": tensors}, out / "inputs.pt")
    try:
        run = subprocess.run([sys.executable, "-I", "-c", LOADER], cwd=out, capture_output=True, text=True, timeout=120)
        assert run.returncode == 0, run.stderr[-2000:]
        assert json.loads(run.stdout.strip().splitlines()[-1]) == [], "the loader imported n2n or its dependencies"
        outputs = torch.load(out / "outputs.pt", weights_only=True)
    finally:
        for name in ("inputs.pt", "outputs.pt"):
            (out / name).unlink(missing_ok=True)
    worst = float((outputs["raw"] - model(raw)).abs().max())
    for photo, theirs in zip(images, outputs["photos"]):
        ours = n2n_denoise(model, photo)
        worst = max(worst, float(np.abs(theirs[0].numpy().transpose(1, 2, 0) - ours).max()))
    assert worst <= TOLERANCE, f"the exported torch module differs from n2n_core by {worst:.2e}"


def test_weights_are_a_standard_safetensors_file(exported):
    safetensors_torch = pytest.importorskip("safetensors.torch", reason="pip install safetensors")
    model, out = exported
    weights = safetensors_torch.load_file(str(out / "n2n_model.safetensors"))
    ours = model.state_dict()
    assert sorted(weights) == sorted(ours)
    for name, value in ours.items():
        assert torch.equal(weights[name], value), name
