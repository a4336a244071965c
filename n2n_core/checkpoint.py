"""Checkpoints: one file from which a model is rebuilt without any other input.

`save_checkpoint` writes a safetensors-compatible file (see tensorfile.py) holding
    tensors   "model.<state-dict key>"   the weights
              "optimizer.<i>"            every tensor of the optimizer's state_dict
              "extra.<name>"             extra tensors (e.g. torch.Generator states, uint8)
    metadata  "format"        "n2n-checkpoint", "format_version" "1"
              "model_config"  JSON {"name": ..., "kwargs": {...}} (build_model's arguments)
              "step"          JSON int
              "config"        JSON (the training config, or null)
              "optimizer"     JSON of the optimizer's state_dict with each tensor replaced by
                              {"__tensor__": "optimizer.<i>"} (or null)
              "extra"         JSON (anything else, or null)
Nothing is pickled; loading parses JSON and raw little-endian bytes only, and any
inconsistency raises `CheckpointError` naming the file.

An untrusted file costs bounded memory and time: the tensor file's own limits apply
(regular files only, at most `max_bytes`, a capped header), and the architecture
arguments are checked against the file's tensor shapes before the model is built, so
arguments asking for a network far larger than the weights in the file allocate nothing.
`load_checkpoint` takes a path or the file's bytes (a model shipped to remote workers).
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass

import torch
from torch import Tensor

from n2n_core.module import Module
from n2n_core.tensorfile import MAX_FILE_BYTES, BytesLike, CheckpointError, read_tensor_file, write_tensor_file

FORMAT = "n2n-checkpoint"
FORMAT_VERSION = "1"
_TENSOR_REF = "__tensor__"
_INT_KEYED = "__int_keyed__"


@dataclass
class Checkpoint:
    """What `load_checkpoint` returns.

    Attributes:
        model: the rebuilt module (training mode, weights loaded, on `map_location`).
        model_config: its `ModelConfig`.
        step: the training step saved with it.
        config: the saved config dict (or None).
        optimizer_state: a dict for `optimizer.load_state_dict` (or None).
        extra_tensors: name -> tensor (on `map_location`).
        extra: the saved JSON-able extra dict (or None).
    """

    model: Module
    model_config: object
    step: int
    config: dict | None
    optimizer_state: dict | None
    extra_tensors: dict[str, Tensor]
    extra: dict | None


# -- JSON trees with tensors pulled out ------------------------------------------------
def _encode(value, tensors: dict[str, Tensor], where: str):
    """Replace tensors by references; dicts with int keys are stored as pair lists."""
    if isinstance(value, Tensor):
        name = f"optimizer.{len(tensors)}"
        tensors[name] = value
        return {_TENSOR_REF: name}
    if isinstance(value, dict):
        if all(isinstance(k, str) for k in value):
            if _TENSOR_REF in value or _INT_KEYED in value:
                raise ValueError(f"{where}: keys {_TENSOR_REF!r} / {_INT_KEYED!r} are reserved")
            return {k: _encode(v, tensors, f"{where}.{k}") for k, v in value.items()}
        if all(isinstance(k, int) and not isinstance(k, bool) for k in value):
            return {_INT_KEYED: [[k, _encode(v, tensors, f"{where}.{k}")] for k, v in value.items()]}
        raise TypeError(f"{where}: dict keys must be all strings or all ints")
    if isinstance(value, (list, tuple)):
        return [_encode(v, tensors, f"{where}[{i}]") for i, v in enumerate(value)]
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return value
    raise TypeError(f"{where}: cannot store a {type(value).__name__} (tensors, numbers, strings, lists, dicts only)")


def _decode(value, tensors: dict[str, Tensor], path):
    if isinstance(value, dict):
        if set(value) == {_TENSOR_REF}:
            name = value[_TENSOR_REF]
            if name not in tensors:
                raise CheckpointError(path, f"optimizer state refers to missing tensor {name!r}")
            return tensors[name]
        if set(value) == {_INT_KEYED}:
            pairs = value[_INT_KEYED]
            if not isinstance(pairs, list) or not all(
                isinstance(p, list) and len(p) == 2 and isinstance(p[0], int) for p in pairs
            ):
                raise CheckpointError(path, "optimizer state: malformed int-keyed dict")
            return {k: _decode(v, tensors, path) for k, v in pairs}
        return {k: _decode(v, tensors, path) for k, v in value.items()}
    if isinstance(value, list):
        return [_decode(v, tensors, path) for v in value]
    return value


def _to_json(value, what: str) -> str:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        value = dataclasses.asdict(value)
    try:
        return json.dumps(value, sort_keys=True)
    except (TypeError, ValueError) as e:
        raise TypeError(f"save_checkpoint: {what} is not JSON-serializable ({e})") from None


def _parse_json(path, metadata: dict, key: str):
    if key not in metadata:
        raise CheckpointError(path, f"metadata has no {key!r}")
    try:
        return json.loads(metadata[key])
    except ValueError as e:
        raise CheckpointError(path, f"metadata {key!r} is not valid JSON ({e})") from None


# -- save / load ------------------------------------------------------------------------
def save_checkpoint(path, model: Module, optimizer=None, *, step: int = 0, config=None,
                    extra_tensors: dict[str, Tensor] | None = None, extra: dict | None = None) -> None:
    """Write model config and weights, optimizer state, step, config and extras to `path` atomically.

    `config` may be a dict or a dataclass instance (stored as its dict); `extra` any
    JSON-able dict; `extra_tensors` name -> tensor (RNG states as uint8 tensors, ...).
    """
    model_config = getattr(model, "config", None)
    if model_config is None:
        raise TypeError("save_checkpoint: the model has no .config; build it with n2n_core.build_model")
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise ValueError(f"save_checkpoint: step must be a non-negative int, got {step!r}")
    tensors = {f"model.{k}": v for k, v in model.state_dict().items()}
    optimizer_json = "null"
    if optimizer is not None:
        opt_tensors: dict[str, Tensor] = {}
        encoded = _encode(optimizer.state_dict(), opt_tensors, "optimizer")
        tensors.update(opt_tensors)
        optimizer_json = _to_json(encoded, "the optimizer state")
    for name, t in (extra_tensors or {}).items():
        if not isinstance(t, Tensor):
            raise TypeError(f"save_checkpoint: extra tensor {name!r} is a {type(t).__name__}")
        tensors[f"extra.{name}"] = t
    metadata = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "model_config": _to_json({"name": model_config.name, "kwargs": dict(model_config.kwargs)}, "model.config"),
        "step": json.dumps(step),
        "config": _to_json(config, "config"),
        "optimizer": optimizer_json,
        "extra": _to_json(extra, "extra"),
    }
    write_tensor_file(path, tensors, metadata)


def _check_shapes(path, name: str, kwargs: dict, weights: dict[str, Tensor]) -> None:
    """The architecture arguments describe exactly the file's weights (compared without
    building anything, stopping at the first difference)."""
    from n2n_core.architectures import parameter_shapes

    try:
        expected = parameter_shapes(name, **kwargs)
    except (TypeError, ValueError) as e:
        raise CheckpointError(path, f"cannot rebuild architecture {name!r} with {kwargs}: {e}") from None
    seen = 0
    for key, shape in expected:
        if key not in weights:
            raise CheckpointError(path, f"weights do not fit architecture {name!r} with {kwargs}: "
                                        f"it needs a tensor {key!r} {list(shape)}, the file has none")
        if tuple(weights[key].shape) != shape:
            raise CheckpointError(path, f"weights do not fit architecture {name!r} with {kwargs}: {key!r} is "
                                        f"{list(weights[key].shape)} in the file, the architecture needs {list(shape)}")
        seen += 1
    if seen != len(weights):
        extra = sorted(set(weights) - {key for key, _ in parameter_shapes(name, **kwargs)})
        raise CheckpointError(path, f"weights do not fit architecture {name!r} with {kwargs}: "
                                    f"unexpected tensors {extra[:5]}")


def load_checkpoint(source, map_location="cpu", *, name=None, max_bytes: int = MAX_FILE_BYTES) -> Checkpoint:
    """Read, validate and rebuild. Raises `CheckpointError` on any problem.

    `source` is a path or the file's bytes; errors name `name`, else the path, else
    "<bytes>". Files over `max_bytes` are refused unread.
    """
    tensors, metadata = read_tensor_file(source, name=name, max_bytes=max_bytes)
    path = name or ("<bytes>" if isinstance(source, BytesLike) else source)
    from n2n_core.architectures import ARCHITECTURES, ModelConfig, build_model  # (architectures import layers)

    if metadata.get("format") != FORMAT:
        raise CheckpointError(path, f"not an n2n checkpoint (format {metadata.get('format')!r})")
    if metadata.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(path, f"unsupported checkpoint version {metadata.get('format_version')!r}")
    mc = _parse_json(path, metadata, "model_config")
    if not isinstance(mc, dict) or not isinstance(mc.get("name"), str) or not isinstance(mc.get("kwargs"), dict):
        raise CheckpointError(path, f"model_config must be {{'name': str, 'kwargs': dict}}, got {mc!r}")
    if mc["name"] not in ARCHITECTURES:
        raise CheckpointError(path, f"unknown architecture {mc['name']!r} (known: {', '.join(sorted(ARCHITECTURES))})")
    step = _parse_json(path, metadata, "step")
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise CheckpointError(path, f"step must be a non-negative int, got {step!r}")
    config = _parse_json(path, metadata, "config")
    extra = _parse_json(path, metadata, "extra")
    optimizer_tree = _parse_json(path, metadata, "optimizer")

    weights = {k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")}
    if not weights:
        raise CheckpointError(path, "no model weights in the file")
    dtype = next(iter(weights.values())).dtype
    if not dtype.is_floating_point:
        raise CheckpointError(path, f"model weights have non-floating dtype {dtype}")
    _check_shapes(path, mc["name"], mc["kwargs"], weights)
    try:
        # a fixed generator: rebuilding must not consume the caller's global random state
        model = build_model(mc["name"], generator=torch.Generator().manual_seed(0), dtype=dtype, **mc["kwargs"])
    except (TypeError, ValueError) as e:
        raise CheckpointError(path, f"cannot rebuild architecture {mc['name']!r} with {mc['kwargs']}: {e}") from None
    try:
        model.load_state_dict(weights, strict=True)
    except (KeyError, ValueError, TypeError) as e:
        raise CheckpointError(path, f"weights do not fit architecture {mc['name']!r}: {e}") from None
    model.to(device=map_location)

    def move(t: Tensor) -> Tensor:
        return t.to(map_location)

    optimizer_state = None
    if optimizer_tree is not None:
        moved = {k: move(v) for k, v in tensors.items() if k.startswith("optimizer.")}
        optimizer_state = _decode(optimizer_tree, moved, path)
    extra_tensors = {k[len("extra."):]: move(v) for k, v in tensors.items() if k.startswith("extra.")}
    unknown = [k for k in tensors if not k.startswith(("model.", "optimizer.", "extra."))]
    if unknown:
        raise CheckpointError(path, f"unexpected tensors {unknown[:5]}")
    return Checkpoint(
        model=model,
        model_config=ModelConfig(mc["name"], mc["kwargs"]),
        step=step,
        config=config,
        optimizer_state=optimizer_state,
        extra_tensors=extra_tensors,
        extra=extra,
    )


__all__ = ["Checkpoint", "CheckpointError", "save_checkpoint", "load_checkpoint"]
