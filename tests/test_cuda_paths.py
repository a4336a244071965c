"""On a GPU: every convolution plan against torch autograd on CUDA, in float64 and float32, at
widths of 16 and more (the layers the CPU runs as tap GEMMs), on shapes of several blocks and
bands; the U-Net; the memory a forward needs; and the bulk job's actor. They skip without CUDA
(tests/test_conv_plans.py runs the same plans on the CPU); bench/gpu_check.sh runs them."""
import dataclasses

import numpy as np
import pyarrow as pa
import pytest
import torch

import n2n_core as n
from pipeline.export.torch_twins import build_torch_model
from n2n_core import build_model, conv_plan
from n2n_core.conv import set_conv_plan
from torch_oracle import check_against_torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
DEVICE = "cuda"
F64 = torch.float64
PLANS = {
    "cuda": conv_plan.CUDA_PLAN,  # the device's rule: im2col and one GEMM per convolution
    "cuda-taps": dataclasses.replace(conv_plan.CUDA_PLAN, path="taps"),  # bench/core.py --conv-path taps
    "cuda-bands": dataclasses.replace(conv_plan.CUDA_PLAN, band_elements=1 << 12),  # inference in several bands
    "cuda-taps-blocks": dataclasses.replace(conv_plan.CUDA_PLAN, path="taps", tap_block_rows=97),  # several blocks
    "cpu-plan": conv_plan.CPU_PLAN,  # the CPU's plan, run on the GPU
}
CONVS = [  # (in, out, kernel args, input shape): widths of 16 and more, and the thin ends
    (16, 16, dict(kernel_size=3, padding=1), (2, 16, 33, 17)),
    (44, 88, dict(kernel_size=3, padding=1), (3, 44, 24, 20)),  # the default model's widths
    (91, 59, dict(kernel_size=3, padding=1), (2, 91, 16, 16)),  # its dec_conv1a
    (29, 3, dict(kernel_size=3, padding=1), (2, 29, 20, 24)),  # its last layer
    (3, 44, dict(kernel_size=3, padding=1), (4, 3, 31, 29)),  # its first layer
    (18, 20, dict(kernel_size=(3, 5), padding=(2, 2), dilation=(2, 1)), (1, 18, 19, 13)),
    (48, 96, dict(kernel_size=2, stride=2), (2, 48, 16, 12)),
]


@pytest.fixture(autouse=True)
def exact_float32():
    """cuDNN may use TF32 for float32 convolutions by default: the twin must compute in float32."""
    before = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = before


def test_the_rule_on_this_device():
    x = torch.zeros(1, 16, 8, 8, device=DEVICE)
    assert conv_plan.plan_for(x.device) is conv_plan.CUDA_PLAN
    assert not n.Conv2d(16, 16, 3, padding=1, device=DEVICE).uses_taps(x.device)


@pytest.mark.parametrize("plan", PLANS, ids=str)
@pytest.mark.parametrize("cin,cout,args,shape", CONVS, ids=str)
def test_conv2d_every_plan_float64(plan, cin, cout, args, shape):
    layer = n.Conv2d(cin, cout, dtype=F64, device=DEVICE, **args)
    layer.plan = PLANS[plan]
    twin = torch.nn.Conv2d(cin, cout, **args).to(dtype=F64, device=DEVICE)
    x = torch.randn(shape, dtype=F64, device=DEVICE)
    check_against_torch(layer, twin, x, label=f"{plan} {args}")
    layer.eval()
    torch.testing.assert_close(layer(x), twin(x).detach(), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("plan", ["cuda", "cuda-taps"], ids=str)
@pytest.mark.parametrize("cin,cout,args,shape", CONVS, ids=str)
def test_conv2d_float32(plan, cin, cout, args, shape):
    layer = n.Conv2d(cin, cout, device=DEVICE, **args)
    layer.plan = PLANS[plan]
    twin = torch.nn.Conv2d(cin, cout, **args).to(device=DEVICE)
    out = check_against_torch(layer, twin, torch.randn(shape, device=DEVICE), rtol=1e-4, atol=1e-4, label=plan)
    assert out.dtype == torch.float32 and out.device.type == DEVICE


@pytest.mark.parametrize("plan", PLANS, ids=str)
@pytest.mark.parametrize("name,kwargs,shape", [
    ("unet", dict(depth=4, width=44, residual=True), (3, 3, 48, 64)),  # the default model's architecture
    ("unet", dict(depth=3, width=18), (2, 3, 40, 24)),
    ("seed", dict(width=16), (2, 3, 20, 12)),  # the fused upsampling's cached tables, on the GPU
], ids=str)
def test_networks_every_plan_float64(plan, name, kwargs, shape):
    model = build_model(name, generator=torch.Generator().manual_seed(2), dtype=F64, device=DEVICE, **kwargs)
    set_conv_plan(model, PLANS[plan])
    twin = build_torch_model(name, dtype=F64, device=DEVICE, **kwargs)
    check_against_torch(model, twin, torch.rand(shape, dtype=F64, device=DEVICE), label=f"{plan} {name}")


def _unet_step(plan, dtype):
    """The default architecture's training step at batch 16 of 64x64 (the same weights, input and output
    gradient in any dtype): n2n's and its torch twin's output, input gradient and parameter gradients, as float64."""
    from pipeline.export.torch_twins import copy_weights

    model = build_model("unet", depth=4, width=44, residual=True, generator=torch.Generator().manual_seed(0))
    model = set_conv_plan(model.to(device=DEVICE, dtype=dtype), PLANS[plan])
    twin = build_torch_model("unet", depth=4, width=44, residual=True, device=DEVICE, dtype=dtype)
    copy_weights(model, twin)
    g = torch.Generator().manual_seed(1)
    x = torch.rand(16, 3, 64, 64, generator=g).to(device=DEVICE, dtype=dtype)
    grad_out = torch.randn(16, 3, 64, 64, generator=g).to(device=DEVICE, dtype=dtype)
    out = model(x)
    grad_x = model.backward(grad_out.clone())
    xt = x.clone().requires_grad_(True)
    out_t = twin(xt)
    out_t.backward(grad_out)
    names = [name for name, _ in model.named_parameters()]
    ours = [out, grad_x] + [p.grad for _, p in model.named_parameters()]
    theirs = [out_t.detach(), xt.grad] + [dict(twin.named_parameters())[name].grad for name in names]
    return ["output", "input gradient"] + names, [t.double() for t in ours], [t.double() for t in theirs]


@pytest.mark.parametrize("plan", ["cuda", "cuda-taps"], ids=str)
def test_unet_float32_training_step_against_float64(plan):
    """A float32 training step of the default architecture at batch 16 of 64x64, against the float64
    step of torch autograd, beside torch's own float32 step. Float32 rounding flips the leaky-ReLU slope
    of a few units near zero, so gradients move by much more than the rounding itself: on a CPU torch's
    float32 step was 1.7e-4 to 8.8e-4 off its float64 one and n2n's 1.6e-4 to 1.5e-3 (relative norm,
    worst parameter tensor; outputs 6e-7 to 9e-7). Bounds: the output 1e-5, the input gradient and all
    parameter gradients together 3e-3, any one parameter tensor 1e-2; a wrong gradient is off by ~1."""
    labels, _, reference = _unet_step(plan, torch.float64)
    _, ours, torch_f32 = _unet_step(plan, torch.float32)
    error = lambda a, b: float((a - b).norm() / b.norm().clamp_min(1e-30))
    flat = lambda ts: torch.cat([t.flatten() for t in ts])
    found = {
        "output": (error(ours[0], reference[0]), 1e-5, error(torch_f32[0], reference[0])),
        "input gradient": (error(ours[1], reference[1]), 3e-3, error(torch_f32[1], reference[1])),
        "all parameter gradients": (error(flat(ours[2:]), flat(reference[2:])), 3e-3,
                                    error(flat(torch_f32[2:]), flat(reference[2:]))),
    }
    found.update({label: (error(a, b), 1e-2, error(t, b)) for label, a, b, t in
                  zip(labels[2:], ours[2:], reference[2:], torch_f32[2:])})
    bad = {k: v for k, v in found.items() if v[0] > v[1]}
    assert not bad, "; ".join(f"{plan} {k}: float32 off float64 by {e:.1e} (bound {b:.0e}; torch's float32: {t:.1e})"
                              for k, (e, b, t) in bad.items())


def test_forward_cost_predicts_the_allocators_peak():
    from pipeline.inference.memory import ForwardCost, forward_budget
    from pipeline.inference.tiling import denoise_image

    model = build_model("unet", depth=4, width=44, residual=True, device=DEVICE).eval()
    cost = ForwardCost.measure(model)
    image = torch.rand(3, 1024, 1536)
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    denoise_image(model, image, tile=None, forward_pixels=10**9)
    peak = torch.cuda.max_memory_allocated() - base
    predicted = cost.bytes(1024 * 1536)
    assert 0.7 * peak < predicted < 1.5 * peak, (peak, predicted)
    free, total = torch.cuda.mem_get_info()
    assert 0 < forward_budget(DEVICE) <= total


def test_the_bulk_actor_on_the_gpu_matches_the_cpu(tmp_path):
    from n2n_core import save_checkpoint
    from pipeline.data.datasets import open_dataset
    from pipeline.data.images import decode_image
    from pipeline.inference.outputs import create_staging
    from pipeline.inference.worker import DenoiseWorker, WorkerPlan, table_entries
    from tests.denoise_helpers import make_image

    checkpoint = tmp_path / "model.n2n"
    save_checkpoint(checkpoint, build_model("unet", depth=3, width=16, residual=True,
                                            generator=torch.Generator().manual_seed(0)))
    src = tmp_path / "in"
    src.mkdir()
    for i, (h, w) in enumerate([(40, 52)] * 3 + [(300, 200)]):  # three in one forward; one tiled at 128
        (src / f"img{i}.png").write_bytes(make_image(np.random.default_rng(i), "PNG", "RGB", h, w))
    dataset = open_dataset(src)
    batch = pa.table({"index": list(range(len(dataset))), "key": dataset.keys})
    outputs = {}
    for device in ("cpu", "cuda"):
        out = tmp_path / device
        out.mkdir()
        create_staging(out, "r")
        plan = WorkerPlan(model_path=str(checkpoint), device=device, threads=2, tile=128, overlap=32,
                          max_pixels=10**8, input_kind="folder", output_kind="folder", output_root=str(out), run="r")
        worker = DenoiseWorker(plan, dataset)
        assert next(iter(worker.model.parameters())).data.device.type == device
        assert [e.status for e in table_entries(worker(batch))] == ["done"] * 4
        outputs[device] = {k: decode_image((out / k).read_bytes(), k).pixels for k in dataset.keys}
    for key in dataset.keys:  # float32 sums in another order: at most one 8-bit level apart
        assert (outputs["cuda"][key] - outputs["cpu"][key]).abs().max() <= 1.01 / 255, key
