"""The oracle every gradient test uses: an n2n module against its torch.nn twin.

`check_against_torch` copies the n2n module's weights into the torch module by name,
runs both forwards on the same input, sends the same random output gradient through
both backward passes (n2n's explicit `backward`, torch's autograd) and compares the
output, the input gradient and every parameter gradient with `assert_close`.
"""
from __future__ import annotations

import torch


def copy_weights_to_torch(module, torch_module) -> None:
    """Copy every n2n parameter into the torch module's parameter of the same name."""
    ours = module.state_dict()
    theirs = dict(torch_module.named_parameters())
    missing = sorted(set(ours) ^ set(theirs))
    assert not missing, f"parameter names differ between n2n and torch: {missing}"
    with torch.no_grad():
        for name, value in ours.items():
            assert theirs[name].shape == value.shape, (
                f"{name}: n2n shape {tuple(value.shape)} vs torch {tuple(theirs[name].shape)}"
            )
            theirs[name].copy_(value)


def check_against_torch(module, torch_module, *inputs, rtol=1e-10, atol=1e-12, seed=0, label=""):
    """Compare forward, input gradient(s) and parameter gradients in the dtype of the inputs.

    Returns the n2n output. `inputs` are plain tensors; the module's forward takes them
    positionally and its backward returns one gradient per input (a tuple if several).
    """
    copy_weights_to_torch(module, torch_module)
    module.train()
    module.zero_grad()
    out = module(*inputs)

    torch_inputs = [x.detach().clone().requires_grad_(True) for x in inputs]
    torch_out = torch_module(*torch_inputs)
    where = f" [{label}]" if label else ""
    torch.testing.assert_close(out, torch_out.detach(), rtol=rtol, atol=atol, msg=lambda m: f"forward{where}: {m}")

    g = torch.Generator(device="cpu").manual_seed(seed)
    grad_out = torch.randn(out.shape, generator=g, dtype=out.dtype).to(out.device)
    grad_in = module.backward(grad_out)
    torch_out.backward(grad_out)
    grads = grad_in if isinstance(grad_in, tuple) else (grad_in,)
    assert len(grads) == len(inputs), f"backward returned {len(grads)} gradients for {len(inputs)} inputs{where}"
    for i, (ours, x) in enumerate(zip(grads, torch_inputs)):
        torch.testing.assert_close(ours, x.grad, rtol=rtol, atol=atol, msg=lambda m: f"grad of input {i}{where}: {m}")
    torch_params = dict(torch_module.named_parameters())
    for name, p in module.named_parameters():
        theirs = torch_params[name].grad
        assert theirs is not None, f"torch produced no gradient for {name}{where}"
        torch.testing.assert_close(p.grad, theirs, rtol=rtol, atol=atol, msg=lambda m: f"grad of {name}{where}: {m}")
    return out
