"""Every layer against its torch.nn twin in float64: forward, input gradient, parameter gradients."""
import itertools

import pytest
import torch

import n2n_core as n
from torch_oracle import check_against_torch

F64 = torch.float64

CONV_GRID = [
    dict(kernel_size=k, stride=s, padding=p, dilation=d)
    for k, s, p, d in itertools.product([1, 2, 3, (2, 3)], [1, 2, (2, 1)], [0, 1, (2, 0)], [1, (1, 2)])
]


@pytest.mark.parametrize("args", CONV_GRID, ids=str)
@pytest.mark.parametrize("shape", [(1, 3, 7, 9), (2, 4, 8, 8)], ids=str)
def test_conv2d_matches_torch(args, shape):
    layer = n.Conv2d(shape[1], 5, dtype=F64, **args)
    twin = torch.nn.Conv2d(shape[1], 5, **args).double()
    check_against_torch(layer, twin, torch.randn(shape, dtype=F64), label=str(args))


def test_conv2d_without_bias_matches_torch():
    check_against_torch(n.Conv2d(3, 4, 3, bias=False, dtype=F64), torch.nn.Conv2d(3, 4, 3, bias=False).double(),
                        torch.randn(2, 3, 6, 5, dtype=F64))


@pytest.mark.parametrize(
    "args",
    [dict(kernel_size=2, stride=2), dict(kernel_size=3, stride=2, padding=1, output_padding=1),
     dict(kernel_size=(2, 3), stride=(2, 1), dilation=(1, 2)), dict(kernel_size=3, padding=1),
     dict(kernel_size=3, stride=3, padding=(1, 0), output_padding=(2, 0))],
    ids=str,
)
def test_conv_transpose2d_matches_torch(args):
    layer = n.ConvTranspose2d(3, 4, dtype=F64, **args)
    twin = torch.nn.ConvTranspose2d(3, 4, **args).double()
    check_against_torch(layer, twin, torch.randn(2, 3, 5, 7, dtype=F64), label=str(args))


class TorchUpsampling(torch.nn.Module):
    """Nearest upsampling then a conv, holding weight/bias directly like n2n's Upsampling."""

    def __init__(self, cin, cout, kernel_size, scale, padding):
        super().__init__()
        conv = torch.nn.Conv2d(cin, cout, kernel_size, padding=padding)
        self.weight, self.bias, self.scale, self.padding = conv.weight, conv.bias, scale, padding

    def forward(self, x):
        up = torch.nn.functional.interpolate(x, scale_factor=self.scale, mode="nearest")
        return torch.nn.functional.conv2d(up, self.weight, self.bias, padding=self.padding)


@pytest.mark.parametrize("kernel_size,scale,padding", [(3, 2, 1), (2, 2, 0), (3, 3, 1), ((1, 3), 2, (0, 1))], ids=str)
def test_upsampling_matches_torch(kernel_size, scale, padding):
    layer = n.Upsampling(3, 4, kernel_size, scale_factor=scale, padding=padding, dtype=F64)
    twin = TorchUpsampling(3, 4, kernel_size, scale, padding).double()
    check_against_torch(layer, twin, torch.randn(2, 3, 5, 4, dtype=F64))


@pytest.mark.parametrize("kernel,stride", [(2, None), (3, 2), ((2, 3), (1, 2)), (3, 1)], ids=str)
@pytest.mark.parametrize("shape", [(1, 2, 8, 8), (2, 3, 9, 7)], ids=str)
def test_maxpool_matches_torch(kernel, stride, shape):
    check_against_torch(n.MaxPool2d(kernel, stride), torch.nn.MaxPool2d(kernel, stride), torch.randn(shape, dtype=F64))


@pytest.mark.parametrize("ours,theirs", [(n.ReLU, torch.nn.ReLU), (n.Sigmoid, torch.nn.Sigmoid),
                                         (lambda: n.LeakyReLU(0.1), lambda: torch.nn.LeakyReLU(0.1)),
                                         (n.LeakyReLU, torch.nn.LeakyReLU)])
def test_activations_match_torch(ours, theirs):
    check_against_torch(ours(), theirs(), torch.randn(2, 3, 5, 4, dtype=F64))


def test_default_init_matches_torch_distribution_and_fan_in():
    g = torch.Generator().manual_seed(0)
    conv = n.Conv2d(48, 96, 3, generator=g)
    bound = 1 / (48 * 9) ** 0.5
    assert conv.weight.data.abs().max() <= bound and conv.weight.data.abs().max() > 0.95 * bound
    assert conv.bias.data.abs().max() <= bound
    again = n.Conv2d(48, 96, 3, generator=torch.Generator().manual_seed(0))
    assert torch.equal(conv.weight.data, again.weight.data), "same generator seed must give the same weights"


def test_float32_and_to_float64():
    conv = n.Conv2d(3, 4, 3, padding=1)
    y = conv(torch.randn(1, 3, 6, 6))
    assert y.dtype == torch.float32 and y.shape == (1, 4, 6, 6)
    conv.to(dtype=F64)
    assert conv(torch.randn(1, 3, 6, 6, dtype=F64)).dtype == F64 and conv.weight.grad.dtype == F64


def test_bad_input_shape_is_named():
    with pytest.raises(ValueError, match=r"expects \(N, 3, H, W\), got \(1, 4, 5, 5\)"):
        n.Conv2d(3, 4, 3)(torch.randn(1, 4, 5, 5))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_conv_on_cuda_matches_torch():
    layer = n.Conv2d(3, 5, 3, padding=1, dtype=F64, device="cuda")
    twin = torch.nn.Conv2d(3, 5, 3, padding=1).double().cuda()
    check_against_torch(layer, twin, torch.randn(2, 3, 8, 8, dtype=F64, device="cuda"))
