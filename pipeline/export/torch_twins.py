"""torch.nn twins of n2n models: the same network in torch.nn, with the n2n model's weights.

The tests use them as the autograd oracle and the benchmarks as the peer; the exports
(ONNX, torch, BioImage Model Zoo) start from them. The architectures themselves are in
`pipeline.export.torch_model`, a file that needs torch alone (it is what `n2n export
--format torch` ships):

    model = build_model("unet", depth=3, width=8)
    twin = torch_twin(model)              # same config, weights copied, same dtype/device
    # or: twin = build_torch_model("unet", depth=3, width=8)
"""
from __future__ import annotations

import torch
from torch import nn

from pipeline.export.torch_model import TORCH_ARCHITECTURES, TorchUNet, build_torch_model, torch_seed, torch_seed_deep


def copy_weights(model, twin: nn.Module) -> None:
    """Copy every parameter of an n2n model into the twin's parameter of the same name."""
    ours = model.state_dict()
    theirs = dict(twin.named_parameters())
    if set(ours) != set(theirs):
        raise KeyError(f"parameter names differ: n2n only {sorted(set(ours) - set(theirs))}, "
                       f"torch only {sorted(set(theirs) - set(ours))}")
    with torch.no_grad():
        for name, value in ours.items():
            theirs[name].copy_(value)


def torch_twin(model) -> nn.Module:
    """A torch.nn twin of an n2n model built by build_model, with its weights, dtype and device."""
    p = model.parameters()[0].data
    twin = build_torch_model(model.config.name, dtype=p.dtype, device=p.device, **model.config.kwargs)
    copy_weights(model, twin)
    return twin


__all__ = ["TORCH_ARCHITECTURES", "TorchUNet", "build_torch_model", "copy_weights", "torch_seed", "torch_seed_deep",
           "torch_twin"]
