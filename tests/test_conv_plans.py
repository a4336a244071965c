"""Every convolution path of every device's plan, run on the CPU against torch autograd in float64.

`conv_plan.plan_for` picks a `ConvPlan` per device (the CPU's: shifted tap GEMMs in blocks
of 4096 anchors, widths rounded to 16; CUDA's: im2col and one GEMM per convolution, large
bands). A layer's `plan` overrides it, so both plans, and each path with the other device's
block sizes, are checked here on the CPU; tests/test_cuda_paths.py runs them on a GPU.
"""
import dataclasses

import pytest
import torch

import n2n_core as n
from pipeline.export.torch_twins import build_torch_model
from n2n_core import build_model, conv_plan, resample
from n2n_core.conv import set_conv_plan
from torch_oracle import check_against_torch

F64 = torch.float64
PLANS = {
    "cpu": conv_plan.CPU_PLAN,
    "cuda": conv_plan.CUDA_PLAN,
    "cuda-taps": dataclasses.replace(conv_plan.CUDA_PLAN, path="taps"),  # `--conv-path taps` on a GPU: one block
    "cpu-gemm": dataclasses.replace(conv_plan.CPU_PLAN, path="gemm"),
    # several blocks and bands on these small shapes: the seams between them
    "cpu-small-blocks": dataclasses.replace(conv_plan.CPU_PLAN, tap_block_rows=7, band_elements=40),
    "cuda-small-bands": dataclasses.replace(conv_plan.CUDA_PLAN, band_elements=300),
    "cuda-taps-small-blocks": dataclasses.replace(conv_plan.CUDA_PLAN, path="taps", tap_block_rows=11),
}


def test_the_rule_per_device():
    assert conv_plan.plan_for("cpu") is conv_plan.CPU_PLAN and conv_plan.plan_for(torch.device("cpu")) is conv_plan.CPU_PLAN
    assert conv_plan.plan_for("cuda") is conv_plan.CUDA_PLAN and conv_plan.plan_for("cuda:1") is conv_plan.CUDA_PLAN
    assert conv_plan.CPU_PLAN.path == "taps" and conv_plan.CUDA_PLAN.path == "gemm"
    assert not conv_plan.CUDA_PLAN.round_widths and conv_plan.CUDA_PLAN.tap_block_rows is None
    layer = n.Conv2d(16, 16, 3, padding=1)
    assert layer.uses_taps("cpu") and not layer.uses_taps("cuda")
    thin = n.Conv2d(3, 16, 3, padding=1)  # a thin input: block columns on the CPU, im2col on CUDA
    assert thin.uses_taps("cpu") and not thin.uses_taps("cuda")
    assert not n.Conv2d(16, 16, 2, stride=2).uses_taps("cpu")  # not "same": im2col on every device
    with pytest.raises(ValueError, match="'taps' or 'gemm'"):
        dataclasses.replace(conv_plan.CPU_PLAN, path="implicit")


CONVS = [  # (in, out, kernel args, input shape)
    (16, 16, dict(kernel_size=3, padding=1), (2, 16, 9, 7)),
    (17, 44, dict(kernel_size=3, padding=1), (3, 17, 6, 10)),  # width 44: rounded to 48 on the CPU only
    (20, 3, dict(kernel_size=3, padding=1), (2, 20, 8, 8)),  # a thin output (the U-Net's last layer)
    (3, 18, dict(kernel_size=3, padding=1), (2, 3, 7, 9)),  # a thin input: block columns on the CPU
    (3, 3, dict(kernel_size=3, padding=1), (2, 3, 6, 5)),  # thin input and output
    (5, 20, dict(kernel_size=(5, 3), padding=(4, 1), dilation=(2, 1)), (2, 5, 7, 6)),  # thin, dilated
    (18, 20, dict(kernel_size=(3, 5), padding=(2, 2), dilation=(2, 1)), (1, 18, 9, 8)),
    (16, 24, dict(kernel_size=2, stride=2), (2, 16, 8, 6)),
]


@pytest.mark.parametrize("plan", PLANS, ids=str)
@pytest.mark.parametrize("cin,cout,args,shape", CONVS, ids=str)
def test_conv2d_every_plan_matches_torch(plan, cin, cout, args, shape):
    layer, twin = n.Conv2d(cin, cout, dtype=F64, **args), torch.nn.Conv2d(cin, cout, **args).double()
    layer.plan = PLANS[plan]
    x = torch.randn(shape, dtype=F64)
    check_against_torch(layer, twin, x, label=f"{plan} {args}")
    layer.eval()
    torch.testing.assert_close(layer(x), twin(x).detach(), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("plan", PLANS, ids=str)
@pytest.mark.parametrize("shape,cout", [((2, 16, 5, 6), 20), ((1, 4, 3, 7), 3)], ids=str)
def test_upsampling_every_plan_matches_torch(plan, shape, cout):
    from test_layers import TorchUpsampling

    layer = n.Upsampling(shape[1], cout, dtype=F64)
    layer.plan = PLANS[plan]
    check_against_torch(layer, TorchUpsampling(shape[1], cout, 3, 2, 1).double(), torch.randn(shape, dtype=F64))


@pytest.mark.parametrize("plan", PLANS, ids=str)
@pytest.mark.parametrize("name,kwargs,shape", [
    ("unet", dict(depth=2, width=16, residual=True), (2, 3, 12, 16)),
    ("unet", dict(depth=3, width=18), (1, 3, 16, 24)),  # 18, 36, 24, 12 channels: every width rounded on the CPU
    ("seed", dict(width=16), (2, 3, 8, 12)),
], ids=str)
def test_networks_every_plan_match_torch(plan, name, kwargs, shape):
    model = set_conv_plan(build_model(name, generator=torch.Generator().manual_seed(2), dtype=F64, **kwargs),
                          PLANS[plan])
    twin = build_torch_model(name, dtype=F64, **kwargs)
    check_against_torch(model, twin, torch.rand(shape, dtype=F64), label=f"{plan} {name} {kwargs}")


def test_the_plan_is_the_inputs_devices_unless_set():
    """A layer without its own plan follows the input's device; set_conv_plan(model, None) restores that."""
    model = build_model("unet", depth=2, width=16)
    conv = model.enc_conv1
    assert conv.plan is None and conv.uses_taps("cpu")
    set_conv_plan(model, conv_plan.CUDA_PLAN)
    assert all(m.plan is conv_plan.CUDA_PLAN for m in model.modules() if isinstance(m, n.Conv2d))
    assert not conv.uses_taps("cpu")
    set_conv_plan(model, None)
    assert conv.uses_taps("cpu")


def test_tap_tables_are_made_once_per_device_and_dtype():
    """The phase tables of the fused upsampling (the gemm plan's path: the taps plan upsamples at
    low resolution without them) are cached tensors, not a host copy per call."""
    resample._constant.cache_clear()
    layer = n.Upsampling(4, 5)
    layer.plan = conv_plan.CUDA_PLAN
    for _ in range(3):
        layer(torch.randn(1, 4, 3, 3))
    info = resample._constant.cache_info()
    assert info.currsize == 1 and info.misses == 1 and info.hits == 2, info  # _PHASE_TAPS: made once, then read
    layer.to(dtype=F64)
    layer(torch.randn(1, 4, 3, 3, dtype=F64))
    assert resample._constant.cache_info().currsize == 2
