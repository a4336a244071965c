"""An n2n model as ONNX: dynamic batch, height and width, opset 18, metadata that says how to feed it.

Decision: the graph is exported from the model's torch.nn twin (`pipeline.export.torch_twins`,
weights copied from the n2n checkpoint) with torch's own exporter, `torch.onnx.export(...,
dynamo=True)` (torch.export-based; it needs `onnxscript`), at opset 18. The older
TorchScript-based exporter (`dynamo=False`, needing only `onnx`) gives the same graph but
warns that it is deprecated and will be removed from torch. Opset 18 is the lowest the
torch.export-based exporter writes natively; ONNX Runtime has run it since 1.14, TensorRT
since 8.6 and OpenVINO since 2023.0, and the graph uses only Conv, LeakyRelu or Relu,
Sigmoid, MaxPool, Resize (nearest), Concat and Add.

The graph: input "input" (batch, in_channels, height, width) float32 in [0, 1], height
and width multiples of the model's size multiple; output "output" of the same shape
(out_channels), not clipped. Images of other sizes are padded as n2n pads them: reflection
at the bottom and right up to the multiple, the output cropped back, then clipped to
[0, 1] (docs/export.md shows it with ONNX Runtime). The model's metadata
(`metadata_props`) says so in "n2n.size_multiple", "n2n.input", "n2n.padding" and
"n2n.opset", and holds the architecture ("n2n.architecture") and where the weights came
from ("n2n.source").
"""
from __future__ import annotations

import contextlib
import json
import logging
import warnings

import torch

from pipeline.errors import UsageError

OPSET = 18
INPUT_NAME, OUTPUT_NAME = "input", "output"
NEEDS = "pip install 'n2n[export]' (onnx and onnxscript)"


def require_onnx():
    try:
        import onnx  # noqa: F401
        import onnxscript  # noqa: F401
    except ImportError as e:
        raise UsageError(f"the ONNX export needs the {e.name} package: {NEEDS}") from None


def metadata(model, source_label: str) -> dict[str, str]:
    """What the ONNX file says about itself (string keys and values)."""
    multiple = int(model.size_multiple)
    config = model.config
    return {
        "n2n.architecture": json.dumps({"name": config.name, "kwargs": dict(config.kwargs)}, sort_keys=True),
        "n2n.size_multiple": str(multiple),
        "n2n.input": f"{INPUT_NAME}: (batch, {config.kwargs['in_channels']}, height, width) float32 in [0, 1]; "
                     f"height and width multiples of {multiple}",
        "n2n.output": f"{OUTPUT_NAME}: (batch, {config.kwargs['out_channels']}, height, width) float32; clip to [0, 1]",
        "n2n.padding": f"other sizes: reflect-pad at the bottom and right to a multiple of {multiple} (the edge "
                       f"pixel not repeated, numpy.pad mode 'reflect'), run, crop the output back",
        "n2n.opset": str(OPSET),
        "n2n.exporter": f"torch.onnx.export(dynamo=True), torch {torch.__version__.split('+')[0]}",
        "n2n.source": source_label,
    }


def _example_input(model) -> torch.Tensor:
    multiple = int(model.size_multiple)
    # two different sizes, neither of them 1 block: the exporter then keeps both dims symbolic
    return torch.rand(2, model.config.kwargs["in_channels"], 2 * multiple, 3 * multiple,
                      generator=torch.Generator().manual_seed(0))


@contextlib.contextmanager
def _quiet_exporter():
    """The exporter's chatter (torchvision ops it skips, deprecations inside torch) is not the
    user's business: silenced while it runs; its errors still raise."""
    logger = logging.getLogger("torch.onnx")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            warnings.simplefilter("ignore", DeprecationWarning)
            warnings.simplefilter("ignore", UserWarning)
            yield
    finally:
        logger.setLevel(level)


def _name_dims(graph_value, names: tuple[str, ...]) -> None:
    """Give the symbolic dims of a graph input or output plain names (the exporter writes
    expressions such as "16*s1")."""
    dims = graph_value.type.tensor_type.shape.dim
    for dim, name in zip(dims, names):
        if name and not dim.HasField("dim_value"):
            dim.dim_param = name


def onnx_bytes(model, source_label: str) -> bytes:
    """The serialized ONNX model of the n2n model `model` (any device and float dtype: exported
    in float32 on the CPU). Raises UsageError when onnx or onnxscript is missing."""
    require_onnx()
    import onnx

    from pipeline.export.torch_twins import torch_twin

    twin = torch_twin(model).to(device="cpu", dtype=torch.float32).eval()
    multiple = int(model.size_multiple)
    batch = torch.export.Dim("batch", min=1)
    height, width = torch.export.Dim("height_blocks", min=1), torch.export.Dim("width_blocks", min=1)
    shapes = ({0: batch, 2: multiple * height, 3: multiple * width},)
    with torch.no_grad(), _quiet_exporter():
        program = torch.onnx.export(twin, (_example_input(model),), dynamo=True, opset_version=OPSET,
                                    input_names=[INPUT_NAME], output_names=[OUTPUT_NAME], dynamic_shapes=shapes,
                                    verbose=False, report=False)
    proto = program.model_proto
    for value in (*proto.graph.input, *proto.graph.output):
        _name_dims(value, ("batch", "", "height", "width"))
    proto.doc_string = (f"n2n denoiser ({source_label}): {INPUT_NAME} (batch, C, height, width) float32 in [0, 1], "
                        f"height and width multiples of {multiple}")
    del proto.metadata_props[:]
    for key, value in metadata(model, source_label).items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.checker.check_model(proto)
    return proto.SerializeToString()
