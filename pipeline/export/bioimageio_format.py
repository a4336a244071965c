"""An n2n model as a BioImage Model Zoo package: a zip that napari, Fiji, ilastik and
`bioimageio.core` run.

The zip holds (format 0.5 of the zoo's model description; the fields in `describe`):
    rdf.yaml          the description: inputs and outputs with their axes and sizes,
                      the weights, test tensors, authors, citation, licence
    weights.onnx      the ONNX graph (pipeline.export.onnx_format, opset 18)
    weights.pt        the torch.nn module's state dict (`torch.save`; the zoo's
                      "pytorch_state_dict" format) ...
    n2n_model.py      ... and the module's source, needing torch alone (torch_model.py)
    test_input.npy    (1, C, 128, 128) float32: a scikit-image sample photo with
                      Gaussian noise (sigma 25, seed 0), stored as 8 bits
    test_output.npy   the n2n model's output for it, clipped to [0, 1]
    sample_input.png, sample_output.png   the same as 8-bit pictures (1 or 3 channels)
    cover.png         noisy | denoised, 2:1
    README.md         what the model is and how to feed it
The input is (batch, channel, y, x) float32 in [0, 1], y and x multiples of the model's
size multiple (the description's `min` and `step`, so zoo tools pad to them); the output
has the input's shape, clipped to [0, 1] by the description's postprocessing.
"""
from __future__ import annotations

import datetime
import hashlib
import io
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

FORMAT_VERSION = "0.5.12"  # what bioimageio.spec 0.5.12 writes and checks
TEST_SIDE = 128
NOISE = "gaussian:25"
CITATION = {"text": "Lehtinen, J. et al. Noise2Noise: Learning Image Restoration without Clean Data. ICML 2018.",
            "doi": "10.48550/arXiv.1803.04189"}
CALLABLES = {"unet": "TorchUNet", "seed": "torch_seed", "seed-deep": "torch_seed_deep"}
FILES = ("rdf.yaml", "README.md", "cover.png", "n2n_model.py", "weights.pt", "weights.onnx", "test_input.npy",
         "test_output.npy", "sample_input.png", "sample_output.png")


@dataclass(frozen=True)
class PackageInfo:
    """What the description says about the model that the checkpoint does not: its name,
    authors, maintainers (GitHub user names: the zoo asks for one to upload), licence (an
    SPDX id) and a line of description."""

    name: str = "n2n denoiser"
    authors: tuple[str, ...] = ("n2n",)
    maintainers: tuple[str, ...] = ()
    license: str = "MIT"
    description: str = "Noise2Noise image denoiser trained with n2n on noisy image pairs only"
    tags: tuple[str, ...] = field(default=("denoising", "noise2noise", "n2n", "pytorch", "onnx", "2d"))


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def test_tensors(model) -> tuple[np.ndarray, np.ndarray]:
    """(test input, test output), each (1, C, 128, 128) float32: a sample photo with noise, and
    the n2n model's output for it clipped to [0, 1]."""
    from pipeline.data.samples import sample_photo
    from pipeline.quality.evaluate import add_evaluation_noise

    channels = model.config.kwargs["in_channels"]
    photo = sample_photo("astronaut", 2 * TEST_SIDE)  # (H, W, 3) uint8, longer side 256
    top, left = 0, (photo.shape[1] - TEST_SIDE) // 2  # the head and shoulders
    crop = torch.from_numpy(photo[top:top + TEST_SIDE, left:left + TEST_SIDE].copy()).permute(2, 0, 1).float() / 255
    if channels != 3:
        crop = crop.mean(dim=0, keepdim=True).expand(channels, -1, -1).contiguous()
    noisy = add_evaluation_noise(crop, NOISE, seed=0, index=0, clip=True).unsqueeze(0)  # (1, C, S, S)
    parameter = model.parameters()[0].data
    model.eval()
    output = model(noisy.to(device=parameter.device, dtype=parameter.dtype)).clamp(0.0, 1.0)
    return noisy.numpy().astype(np.float32), output.to("cpu", torch.float32).numpy()


def _png(pixels: np.ndarray) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def _rgb8(array: np.ndarray) -> np.ndarray:
    """(1, C, S, S) float in [0, 1] -> (S, S, 3) uint8 (the first three channels, or the first one as grey)."""
    image = array[0, :3] if array.shape[1] >= 3 else array[0, :1].repeat(3, axis=0)  # (3, S, S)
    return np.clip(np.rint(image.transpose(1, 2, 0) * 255), 0, 255).astype(np.uint8)


def sample_png(array: np.ndarray) -> bytes | None:
    """A (1, C, S, S) tensor of 1 or 3 channels as an 8-bit PNG (None for other channel counts)."""
    if array.shape[1] not in (1, 3):
        return None
    pixels = _rgb8(array)
    return _png(pixels[:, :, 0] if array.shape[1] == 1 else pixels)


def cover_png(test_input: np.ndarray, test_output: np.ndarray) -> bytes:
    """noisy | denoised side by side (2:1), each half the 128 x 128 test image at twice its size."""
    def picture(array: np.ndarray) -> np.ndarray:
        return _rgb8(array).repeat(2, axis=0).repeat(2, axis=1)

    return _png(np.concatenate([picture(test_input), picture(test_output)], axis=1))  # (2S, 4S, 3)


def _npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


def readme(model, info: PackageInfo, source_label: str) -> str:
    config, multiple = model.config, int(model.size_multiple)
    return f"""# {info.name}

{info.description}.

Exported by `n2n export ... --format bioimageio` from {source_label}: the `{config.name}`
architecture with {dict(config.kwargs)}.

- Input `input`: (batch, channel, y, x) float32 in [0, 1] ({config.kwargs['in_channels']} channels);
  y and x multiples of {multiple}. Other sizes: pad by reflection at the bottom and right
  to a multiple of {multiple} and crop the output back (what n2n does).
- Output `output`: the same shape ({config.kwargs['out_channels']} channels), clipped to [0, 1].
- Weights: `weights.onnx` (ONNX, opset 18) and `weights.pt` (torch.nn state dict of the
  module in `n2n_model.py`, which needs torch alone).
- Test tensors: a scikit-image sample photo with Gaussian noise (sigma 25 on the 0..255
  scale, stored as 8 bits), and this model's output for it.

Noise2Noise (Lehtinen et al., ICML 2018) trains on pairs of independently noisy images,
never on clean ones. Licence: {info.license}.

## Validation

`test_output.npy` is n2n's own output for `test_input.npy`; both weight formats reproduce
it (`bioimageio.core`'s `test_model` checks it, and n2n's tests check the ONNX and torch
weights against n2n to 1e-4 on photos and random images of many sizes). How n2n's
default model measures on CBSD68, against CBM3D: the README of the n2n project.
"""


def _sample(name: str, hashes: dict[str, str]) -> dict:
    return {"sample_tensor": {"source": name, "sha256": hashes[name]}} if name in hashes else {}


def describe(model, info: PackageInfo, hashes: dict[str, str]) -> dict:
    """The rdf.yaml of the package, as a dict (format 0.5 of the zoo's model description)."""
    from pipeline.export.onnx_format import OPSET

    kwargs = dict(model.config.kwargs)
    multiple = int(model.size_multiple)
    in_names = ["red", "green", "blue"] if kwargs["in_channels"] == 3 else [f"c{i}" for i in range(kwargs["in_channels"])]
    out_names = ["red", "green", "blue"] if kwargs["out_channels"] == 3 else [f"c{i}" for i in range(kwargs["out_channels"])]
    if kwargs["in_channels"] == 1:
        in_names = ["grey"]
    if kwargs["out_channels"] == 1:
        out_names = ["grey"]
    unit_range = {"type": "float32", "range": [0.0, 1.0]}
    return {
        "format_version": FORMAT_VERSION,
        "type": "model",
        "name": info.name,
        "description": info.description,
        "authors": [{"name": name} for name in info.authors],
        **({"maintainers": [{"github_user": user} for user in info.maintainers]} if info.maintainers else {}),
        "cite": [dict(CITATION)],
        "license": info.license,
        "tags": list(dict.fromkeys([*info.tags, model.config.name])),  # the architecture's name too
        "documentation": {"source": "README.md", "sha256": hashes["README.md"]},
        "covers": [{"source": "cover.png", "sha256": hashes["cover.png"]}],
        "timestamp": datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0).isoformat(),
        "inputs": [{
            "id": "input",
            "description": f"noisy image, float32 in [0, 1]; y and x multiples of {multiple}",
            "axes": [
                {"type": "batch"},
                {"type": "channel", "channel_names": in_names},
                {"type": "space", "id": "y", "size": {"min": multiple, "step": multiple}},
                {"type": "space", "id": "x", "size": {"min": multiple, "step": multiple}},
            ],
            "test_tensor": {"source": "test_input.npy", "sha256": hashes["test_input.npy"]},
            **_sample("sample_input.png", hashes),
            "data": unit_range,
            "preprocessing": [{"id": "ensure_dtype", "kwargs": {"dtype": "float32"}}],
        }],
        "outputs": [{
            "id": "output",
            "description": "denoised image, float32 in [0, 1]",
            "axes": [
                {"type": "batch"},
                {"type": "channel", "channel_names": out_names},
                {"type": "space", "id": "y", "size": {"tensor_id": "input", "axis_id": "y"}},
                {"type": "space", "id": "x", "size": {"tensor_id": "input", "axis_id": "x"}},
            ],
            "test_tensor": {"source": "test_output.npy", "sha256": hashes["test_output.npy"]},
            **_sample("sample_output.png", hashes),
            "data": unit_range,
            "postprocessing": [{"id": "clip", "kwargs": {"min": 0.0, "max": 1.0}},
                               {"id": "ensure_dtype", "kwargs": {"dtype": "float32"}}],
        }],
        "weights": {
            "pytorch_state_dict": {
                "source": "weights.pt",
                "sha256": hashes["weights.pt"],
                "architecture": {"source": "n2n_model.py", "sha256": hashes["n2n_model.py"],
                                 "callable": CALLABLES[model.config.name], "kwargs": kwargs},
                "pytorch_version": torch.__version__.split("+")[0],
            },
            "onnx": {"source": "weights.onnx", "sha256": hashes["weights.onnx"], "opset_version": OPSET,
                     "parent": "pytorch_state_dict"},
        },
    }


def package_bytes(model, source_label: str, info: PackageInfo = PackageInfo()) -> bytes:
    """The zip of the package (see the module docstring) for the n2n model `model`."""
    import yaml

    from pipeline.export import torch_model
    from pipeline.export.onnx_format import onnx_bytes
    from pipeline.export.torch_format import state_dict_bytes

    test_input, test_output = test_tensors(model)
    files = {
        "README.md": readme(model, info, source_label).encode(),
        "cover.png": cover_png(test_input, test_output),
        "n2n_model.py": Path(torch_model.__file__).read_bytes(),
        "weights.pt": state_dict_bytes(model),
        "weights.onnx": onnx_bytes(model, source_label),
        "test_input.npy": _npy(test_input),
        "test_output.npy": _npy(test_output),
        "sample_input.png": sample_png(test_input),
        "sample_output.png": sample_png(test_output),
    }
    files = {name: data for name, data in files.items() if data is not None}
    description = describe(model, info, {name: _sha256(data) for name, data in files.items()})
    files = {"rdf.yaml": yaml.safe_dump(description, sort_keys=False, allow_unicode=True).encode(), **files}
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for name in (name for name in FILES if name in files):
            archive.writestr(zipfile.ZipInfo(name, date_time=(2024, 1, 1, 0, 0, 0)), files[name],
                             compress_type=zipfile.ZIP_DEFLATED)
    return buffer.getvalue()
