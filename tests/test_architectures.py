"""seed, seed-deep and unet against their torch.nn twins (pipeline/export/torch_twins.py), in float64.

Forward output, input gradient and every parameter gradient must equal autograd's on
the twin with the same weights, to 1e-10 relative.
"""
import pytest
import torch


from pipeline.export.torch_twins import build_torch_model, torch_twin
from n2n_core import ModelConfig, build_model
from tests.torch_oracle import check_against_torch

CASES = [
    # name, kwargs, input (N, C, H, W)
    ("seed", dict(width=4), (2, 3, 8, 8)),
    ("seed", dict(width=5), (1, 3, 9, 11)),       # odd sizes: stride-2 convs floor them
    ("seed", dict(), (1, 3, 12, 8)),              # the paper's widths
    ("seed", dict(in_channels=1, out_channels=2, width=3), (2, 1, 16, 4)),
    ("seed-deep", dict(width=3), (2, 3, 16, 32)),
    ("seed-deep", dict(width=4), (1, 3, 35, 17)),
    ("unet", dict(depth=1, width=3), (2, 3, 6, 10)),
    ("unet", dict(depth=2, width=5), (1, 3, 12, 20)),
    ("unet", dict(depth=3, width=4, residual=True), (2, 3, 8, 24)),
    ("unet", dict(depth=2, width=3, in_channels=1, out_channels=2), (1, 1, 4, 8)),
    ("unet", dict(depth=5, width=6), (1, 3, 32, 64)),
    ("unet", dict(depth=2, width=16), (2, 3, 8, 12)),  # wide skips: their part of the decoder convs as taps
    ("unet", dict(depth=1, width=20, residual=True), (1, 3, 6, 4)),  # dec_conv1a 27 wide: a widened GEMM
]


@pytest.mark.parametrize("name, kwargs, shape", CASES, ids=[f"{c[0]}-{c[1]}-{c[2]}" for c in CASES])
def test_matches_torch_twin(name, kwargs, shape):
    model = build_model(name, generator=torch.Generator().manual_seed(1), dtype=torch.float64, **kwargs)
    twin = build_torch_model(name, dtype=torch.float64, **kwargs)
    x = torch.rand(shape, dtype=torch.float64)
    out = check_against_torch(model, twin, x, rtol=1e-10, atol=1e-12, label=f"{name} {kwargs}")
    assert out.shape[:2] == (shape[0], kwargs.get("out_channels", 3))



@pytest.mark.parametrize("name, kwargs, shape", CASES, ids=[f"{c[0]}-{c[1]}-{c[2]}" for c in CASES])
def test_backward_without_the_input_gradient_gives_the_same_parameter_gradients(name, kwargs, shape):
    """Training's backward (input_grad=False) skips the input's products: None back, parameters' gradients
    equal to the full backward's, to the last bit (the same products, in the same order)."""
    model = build_model(name, generator=torch.Generator().manual_seed(1), dtype=torch.float64, **kwargs)
    x = torch.rand(shape, dtype=torch.float64)
    grad_out = torch.randn(model(x).shape, dtype=torch.float64)
    grads = []
    for input_grad in (True, False):
        model.zero_grad()
        model(x)
        grad_x = model.backward(grad_out.clone(), input_grad=input_grad)
        assert (grad_x is None) == (not input_grad), f"{name} {kwargs}: input_grad={input_grad} returned {type(grad_x)}"
        grads.append({k: p.grad.clone() for k, p in model.named_parameters()})
    for key, full in grads[0].items():
        assert torch.equal(grads[1][key], full), f"{name} {kwargs}: {key} differs without the input gradient"

def test_unet_is_the_papers_network():
    model = build_model("unet")
    names = [n for n, _ in model.named_parameters() if n.endswith(".weight")]
    assert names == [
        "enc_conv0.weight", "enc_conv1.weight", "enc_conv2.weight", "enc_conv3.weight", "enc_conv4.weight",
        "enc_conv5.weight", "enc_conv6.weight", "dec_conv5.weight", "dec_conv5b.weight", "dec_conv4.weight",
        "dec_conv4b.weight", "dec_conv3.weight", "dec_conv3b.weight", "dec_conv2.weight", "dec_conv2b.weight",
        "dec_conv1a.weight", "dec_conv1b.weight", "dec_conv1.weight",
    ]
    shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}
    assert shapes["enc_conv0.weight"] == (48, 3, 3, 3)
    assert shapes["dec_conv5.weight"] == (96, 96, 3, 3)
    assert shapes["dec_conv4.weight"] == (96, 144, 3, 3)
    assert shapes["dec_conv1a.weight"] == (64, 99, 3, 3)
    assert shapes["dec_conv1b.weight"] == (32, 64, 3, 3)
    assert shapes["dec_conv1.weight"] == (3, 32, 3, 3)
    assert model.size_multiple == 32 and model.in_channels == 3
    assert model.config == ModelConfig("unet", dict(in_channels=3, out_channels=3, depth=5, width=48, residual=False))


def test_seed_tables():
    seed = build_model("seed")
    assert [tuple(p.shape) for p in seed.parameters()][::2] == [(48, 3, 2, 2), (96, 48, 2, 2), (48, 96, 3, 3),
                                                                 (3, 48, 3, 3)]
    deep = build_model("seed-deep")
    assert [p.shape[0] for p in deep.parameters()][::2] == [48, 48, 48, 96, 96, 96, 48, 3]
    assert seed.size_multiple == 4 and deep.size_multiple == 16


def test_unet_init_is_he_for_leaky_relu():
    model = build_model("unet", width=48, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    w = model.enc_conv2.weight.data  # fan-in 48 * 9
    expected = (2 / (1 + 0.1**2)) ** 0.5 / (48 * 9) ** 0.5
    assert abs(w.std().item() / expected - 1) < 0.05
    assert abs(model.dec_conv1.weight.data.std().item() * (32 * 9) ** 0.5 - 1) < 0.1  # linear output: gain 1
    assert torch.count_nonzero(model.enc_conv2.bias.data) == 0
    # the second moment survives conv + leaky ReLU (what He init is for): E[h^2] ~ E[x^2]
    x = torch.randn(2, 48, 32, 32, dtype=torch.float64)
    h = model.enc_conv2_act(model.enc_conv2(x))
    ratio = (h * h).mean().item() / (x * x).mean().item()
    assert 0.85 < ratio < 1.15, ratio


def test_generator_makes_init_reproducible_and_dtype_device():
    a = build_model("unet", depth=2, width=4, generator=torch.Generator().manual_seed(5))
    b = build_model("unet", depth=2, width=4, generator=torch.Generator().manual_seed(5))
    c = build_model("unet", depth=2, width=4, generator=torch.Generator().manual_seed(6))
    for (n, p), q, r in zip(a.named_parameters(), b.parameters(), c.parameters()):
        assert p.dtype == torch.float32 and torch.equal(p.data, q.data), n
    assert not torch.equal(a.enc_conv0.weight.data, c.enc_conv0.weight.data)
    d = build_model("seed", dtype=torch.float64, device="cpu", width=4)
    assert all(p.dtype == torch.float64 for p in d.parameters())


def test_torch_twin_copies_weights():
    model = build_model("unet", depth=2, width=4, dtype=torch.float64)
    twin = torch_twin(model)
    x = torch.rand(1, 3, 8, 8, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(model(x), twin(x), rtol=1e-12, atol=1e-14)


def test_eval_mode_keeps_nothing_and_backward_raises():
    model = build_model("unet", depth=2, width=4).eval()
    model(torch.rand(1, 3, 8, 8))
    with pytest.raises(RuntimeError, match="training-mode forward"):
        model.backward(torch.zeros(1, 3, 8, 8))


def test_errors():
    with pytest.raises(ValueError, match="unknown architecture 'resnet'"):
        build_model("resnet")
    with pytest.raises(TypeError, match=r"unknown arguments \['colour'\]"):
        build_model("unet", colour=3)
    with pytest.raises(TypeError, match="depth must be an int"):
        build_model("unet", depth=2.5)
    with pytest.raises(ValueError, match="width must be >= 1"):
        build_model("seed", width=0)
    with pytest.raises(ValueError, match="residual=True needs"):
        build_model("unet", residual=True, out_channels=1)
    with pytest.raises(ValueError, match="multiples of 4"):
        build_model("unet", depth=2, width=2)(torch.zeros(1, 3, 6, 8))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name, kwargs, shape", [("seed", dict(width=4), (2, 3, 8, 8)),
                                                 ("unet", dict(depth=3, width=4), (2, 3, 16, 24))])
def test_cuda_matches_torch_twin(name, kwargs, shape):
    model = build_model(name, generator=torch.Generator().manual_seed(1), dtype=torch.float64, device="cuda",
                        **kwargs)
    assert all(p.data.is_cuda for p in model.parameters())
    twin = build_torch_model(name, dtype=torch.float64, device="cuda", **kwargs)
    x = torch.rand(shape, dtype=torch.float64, device="cuda")
    check_against_torch(model, twin, x, rtol=1e-10, atol=1e-12, label=f"cuda {name}")


@pytest.mark.parametrize("name, kwargs", [(c[0], c[1]) for c in CASES] + [("unet", dict(depth=4, width=32, residual=True))])
def test_parameter_shapes_name_exactly_what_build_model_allocates(name, kwargs):
    from n2n_core.architectures import count_parameters, parameter_shapes

    model = build_model(name, **kwargs)
    expected = [(k, tuple(v.shape)) for k, v in model.state_dict().items()]
    assert list(parameter_shapes(name, **kwargs)) == expected
    assert count_parameters(name, **kwargs) == sum(p.data.numel() for p in model.parameters())


def test_huge_architecture_arguments_are_measured_without_building():
    from n2n_core.architectures import count_parameters, parameter_shapes

    with pytest.raises(ValueError, match="more than 1,000,000,000 parameters"):
        count_parameters("unet", limit=10**9, width=6000)  # returns at once: nothing is built
    with pytest.raises(ValueError, match="more than 100,000 weight tensors"):
        count_parameters("unet", limit=10**9, depth=10**9, width=1)
    assert count_parameters("unet", width=6000) > 10**9
    with pytest.raises(ValueError, match="unknown architecture"):
        parameter_shapes("resnet")
    with pytest.raises(ValueError, match="residual"):
        parameter_shapes("unet", residual=True, out_channels=1)
    with pytest.raises(TypeError, match="depth must be an int"):
        parameter_shapes("unet", depth="3")
