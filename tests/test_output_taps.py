"""Nearest x2 + 3x3 convolution kernels against torch autograd in float64: both paths of `Upsampling`
(output_taps.py on a CPU, functional.py's phase columns elsewhere), called directly on the CPU."""
import pytest
import torch
import torch.nn.functional as F

from n2n_core import functional as fn
from n2n_core import output_taps

F64 = torch.float64

SHAPES = [((1, 3, 1, 1), 2), ((2, 5, 3, 4), 4), ((3, 17, 4, 5), 2), ((2, 16, 6, 7), 20), ((1, 4, 9, 2), 3)]


def _reference(x, weight, bias, grad_y):
    """Output and gradients of interpolate-then-conv2d by autograd."""
    x, weight = x.clone().requires_grad_(True), weight.clone().requires_grad_(True)
    bias = bias.clone().requires_grad_(True) if bias is not None else None
    y = F.conv2d(F.interpolate(x, scale_factor=2, mode="nearest"), weight, bias, padding=1)
    y.backward(grad_y)
    return y.detach(), x.grad, weight.grad, (bias.grad if bias is not None else None)


def _check(forward, backward, shape, cout, bias, layout):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=g, dtype=F64)
    weight = torch.randn(cout, shape[1], 3, 3, generator=g, dtype=F64)
    b = torch.randn(cout, generator=g, dtype=F64) if bias else None
    N, _, H, W = shape
    grad_y = torch.randn(N, cout, 2 * H, 2 * W, generator=g, dtype=F64)
    y_ref, gx_ref, gw_ref, gb_ref = _reference(x, weight, b, grad_y)
    x_in = x.contiguous(memory_format=torch.channels_last) if layout == "channels_last" else x
    y, saved = forward(x_in, weight, b)
    torch.testing.assert_close(y, y_ref, rtol=1e-10, atol=1e-12, msg=lambda m: f"forward {shape}: {m}")
    gx, gw, gb = backward(grad_y.contiguous(memory_format=torch.channels_last) if layout == "channels_last"
                          else grad_y, saved, x.shape, weight)
    torch.testing.assert_close(gx, gx_ref, rtol=1e-10, atol=1e-12, msg=lambda m: f"grad x {shape}: {m}")
    torch.testing.assert_close(gw, gw_ref, rtol=1e-10, atol=1e-12, msg=lambda m: f"grad weight {shape}: {m}")
    if bias:
        torch.testing.assert_close(gb, gb_ref, rtol=1e-10, atol=1e-12, msg=lambda m: f"grad bias {shape}: {m}")


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("shape,cout", SHAPES, ids=str)
def test_output_taps_match_autograd(shape, cout, bias, layout):
    _check(output_taps.upsample2x_conv3x3_forward,
           lambda gy, xp, shape, w: output_taps.upsample2x_conv3x3_backward(gy, xp, w), shape, cout, bias, layout)


@pytest.mark.parametrize("shape,cout", SHAPES, ids=str)
def test_phase_columns_match_autograd(shape, cout):
    """functional.py's phase path: what Upsampling runs off the CPU, checked here on the CPU."""
    _check(fn.upsample2x_conv3x3_forward, fn.upsample2x_conv3x3_backward, shape, cout, True, "contiguous")


@pytest.mark.parametrize("block", [1, 1000, 1500, 5000])  # rows 1, 2, 4 of an image; 2 images
def test_output_taps_in_small_blocks(monkeypatch, block):
    """Blocks of Z smaller than one image (bands of rows, the large-image inference path) and
    blocks of several images (training) give the same result as one block."""
    monkeypatch.setattr(output_taps, "_BLOCK_ELEMENTS", block)
    _check(output_taps.upsample2x_conv3x3_forward,
           lambda gy, xp, shape, w: output_taps.upsample2x_conv3x3_backward(gy, xp, w), (3, 2, 7, 5), 2, True,
           "contiguous")


def test_output_taps_keep_only_the_padded_input():
    x = torch.randn(2, 4, 5, 6)
    y, saved = output_taps.upsample2x_conv3x3_forward(x, torch.randn(3, 4, 3, 3), None, keep_input=False)
    assert saved is None and y.shape == (2, 3, 10, 12)
    _, saved = output_taps.upsample2x_conv3x3_forward(x, torch.randn(3, 4, 3, 3), None)
    assert saved.shape == (2, 7, 8, 4)
