"""Concat, Add and NearestUpsample2x against torch.cat, +, interpolate and autograd."""
import pytest
import torch

from n2n_core import Add, Concat, NearestUpsample2x
from n2n_core import layout
from padded_layout import assert_padded


def _run(module, fn, *inputs):
    out = module(*inputs)
    leaves = [x.clone().requires_grad_(True) for x in inputs]
    ref = fn(*leaves)
    torch.testing.assert_close(out, ref.detach(), rtol=1e-10, atol=0)
    grad = torch.randn(out.shape, dtype=out.dtype)
    ours = module.backward(grad)
    ref.backward(grad)
    ours = ours if isinstance(ours, tuple) else (ours,)
    assert len(ours) == len(inputs)
    for a, x in zip(ours, leaves):
        torch.testing.assert_close(a, x.grad, rtol=1e-10, atol=0)


@pytest.mark.parametrize("ca, cb, h, w", [(1, 1, 1, 1), (3, 5, 7, 4), (48, 3, 8, 8)])
def test_concat(ca, cb, h, w):
    a = torch.randn(2, ca, h, w, dtype=torch.float64)
    b = torch.randn(2, cb, h, w, dtype=torch.float64)
    _run(Concat(), lambda x, y: torch.cat((x, y), dim=1), a, b)


@pytest.mark.parametrize("pad", [1, 2])
@pytest.mark.parametrize("ca, cb, h, w", [(1, 1, 1, 1), (16, 3, 7, 4)])
def test_concat_into_a_padded_buffer(pad, ca, cb, h, w):
    """Concat(pad=p): the same values and gradients, laid out inside a zero-bordered buffer."""
    a = torch.randn(2, ca, h, w, dtype=torch.float64)
    b = torch.randn(2, cb, h, w, dtype=torch.float64)
    _run(Concat(pad=pad), lambda x, y: torch.cat((x, y), dim=1), a, b)
    buffer, padding = layout.padded_buffer(Concat(pad=pad)(a, b))
    assert padding == (pad, pad) and buffer.shape == (2, h + pad, w + pad, ca + cb)
    assert_padded(buffer, padding, torch.cat((a, b), dim=1))


def test_concat_feeds_a_convolution_without_copy():
    """A 3x3 padding-1 convolution reads Concat(pad=1)'s buffer as its padded input; same result as torch."""
    from n2n_core import Conv2d
    a, b = torch.randn(2, 16, 6, 5, dtype=torch.float64), torch.randn(2, 4, 6, 5, dtype=torch.float64)
    conv = Conv2d(20, 7, 3, padding=1, dtype=torch.float64)
    h = Concat(pad=1)(a, b)
    y = conv(h)
    assert conv._cache[0] is layout.padded_buffer(h)[0]  # the buffer itself kept for backward: no padding copy
    ref = torch.nn.functional.conv2d(torch.cat((a, b), dim=1), conv.weight.data, conv.bias.data, padding=1)
    torch.testing.assert_close(y, ref, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("shape", [(2, 3, 5, 7), (1, 1, 1, 1)])
def test_add(shape):
    a, b = torch.randn(shape, dtype=torch.float64), torch.randn(shape, dtype=torch.float64)
    _run(Add(), lambda x, y: x + y, a, b)


@pytest.mark.parametrize("shape", [(2, 3, 5, 7), (1, 1, 1, 1), (1, 4, 8, 2)])
def test_nearest_upsample(shape):
    x = torch.randn(shape, dtype=torch.float64)
    _run(NearestUpsample2x(), lambda t: torch.nn.functional.interpolate(t, scale_factor=2, mode="nearest"), x)


def test_errors():
    with pytest.raises(ValueError, match="outside the channel"):
        Concat()(torch.zeros(1, 2, 3, 3), torch.zeros(1, 2, 3, 4))
    with pytest.raises(ValueError, match="differ"):
        Add()(torch.zeros(1, 2), torch.zeros(2, 1))
    concat = Concat().eval()
    concat(torch.zeros(1, 1, 2, 2), torch.zeros(1, 1, 2, 2))
    with pytest.raises(RuntimeError, match="training-mode"):
        concat.backward(torch.zeros(1, 2, 2, 2))
