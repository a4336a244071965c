"""An n2n model as plain torch: `n2n_model.py` (torch.nn, torch alone) + `n2n_model.safetensors`.

The `.py` is `pipeline/export/torch_model.py` byte for byte: the torch.nn module of every
n2n architecture, a reader of the weights file that needs torch alone, `load()` and
`denoise()` (padding as n2n pads). The weights file is the module's state dict in the
safetensors layout (n2n_core.tensorfile), its metadata holding "n2n_architecture" (what
`load` rebuilds), "n2n_size_multiple" and "n2n_source".
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from n2n_core.tensorfile import write_tensor_file
from pipeline.export import torch_model

PY_NAME = "n2n_model.py"
WEIGHTS_NAME = "n2n_model.safetensors"


def weights_metadata(model, source_label: str) -> dict[str, str]:
    config = model.config
    return {
        torch_model.ARCHITECTURE_KEY: json.dumps({"name": config.name, "kwargs": dict(config.kwargs)}, sort_keys=True),
        "n2n_size_multiple": str(int(model.size_multiple)),
        "n2n_source": source_label,
    }


def write_torch_files(model, folder: Path, source_label: str) -> list[Path]:
    """Write n2n_model.py and n2n_model.safetensors of the n2n model `model` into `folder`."""
    shutil.copyfile(torch_model.__file__, folder / PY_NAME)
    weights = {name: value.detach().to("cpu") for name, value in model.state_dict().items()}
    write_tensor_file(folder / WEIGHTS_NAME, weights, weights_metadata(model, source_label))
    return [folder / PY_NAME, folder / WEIGHTS_NAME]


def state_dict_bytes(model) -> bytes:
    """The weights as a `torch.save` state dict (what the BioImage Model Zoo's pytorch_state_dict
    format is; read back with `torch.load(..., weights_only=True)`, never unpickling objects)."""
    import io

    buffer = io.BytesIO()
    torch.save({name: value.detach().to("cpu").clone() for name, value in model.state_dict().items()}, buffer)
    return buffer.getvalue()
