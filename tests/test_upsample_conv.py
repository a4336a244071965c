"""Nearest x2 + 3x3 convolution kernels against torch autograd in float64: the two ways of
upsample_conv.py (what `Upsampling` and `UpsampleConcatConv2d` run on a CPU) and resample.py's
phase columns (what they run elsewhere), each called directly on the CPU; then the fused
U-Net decoder layer against interpolate + cat + conv2d."""
import pytest
import torch
import torch.nn.functional as F

from n2n_core import layout, resample
from n2n_core import upsample_conv

F64 = torch.float64

# (input shape, output channels): batch 1, 1x1 images, odd sizes, thin (< 16) and wide outputs
SHAPES = [((1, 3, 1, 1), 2), ((2, 5, 3, 4), 4), ((3, 17, 4, 5), 2), ((2, 16, 6, 7), 20), ((1, 4, 9, 2), 3),
          ((2, 6, 5, 3), 16)]


def _reference(x, weight, bias, grad_y):
    """Output and gradients of interpolate-then-conv2d by autograd."""
    x, weight = x.clone().requires_grad_(True), weight.clone().requires_grad_(True)
    bias = bias.clone().requires_grad_(True) if bias is not None else None
    y = F.conv2d(F.interpolate(x, scale_factor=2, mode="nearest"), weight, bias, padding=1)
    y.backward(grad_y)
    return y.detach(), x.grad, weight.grad, (bias.grad if bias is not None else None)


def _check(forward, backward, shape, cout, bias, layout):
    """forward(x, weight, bias) -> (y, saved); backward(grad_y, saved, x_shape, weight) -> grads."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=g, dtype=F64)
    weight = torch.randn(cout, shape[1], 3, 3, generator=g, dtype=F64)
    b = torch.randn(cout, generator=g, dtype=F64) if bias else None
    N, _, H, W = shape
    grad_y = torch.randn(N, cout, 2 * H, 2 * W, generator=g, dtype=F64)
    y_ref, gx_ref, gw_ref, gb_ref = _reference(x, weight, b, grad_y)
    x_in = x.contiguous(memory_format=torch.channels_last) if layout == "channels_last" else x
    y, saved = forward(x_in, weight, b)
    label = f"{shape} -> {cout}, bias {bias}, {layout}"
    torch.testing.assert_close(y, y_ref, rtol=1e-10, atol=1e-12, msg=lambda m: f"forward {label}: {m}")
    gx, gw, gb = backward(grad_y.contiguous(memory_format=torch.channels_last) if layout == "channels_last"
                          else grad_y, saved, x.shape, weight)
    torch.testing.assert_close(gx, gx_ref, rtol=1e-10, atol=1e-12, msg=lambda m: f"grad x {label}: {m}")
    torch.testing.assert_close(gw, gw_ref, rtol=1e-10, atol=1e-12, msg=lambda m: f"grad weight {label}: {m}")
    if bias:
        torch.testing.assert_close(gb, gb_ref, rtol=1e-10, atol=1e-12, msg=lambda m: f"grad bias {label}: {m}")


def _way(into, backward):
    """(forward, backward) for `_check` from one of upsample_conv's (into, backward) pairs."""
    def forward(x, weight, bias):
        N, _, H, W = x.shape
        y = x.new_empty(N, 2 * H, 2 * W, weight.shape[0])
        return layout.nchw_view(y), into(y, x, weight, bias, False)
    return forward, lambda grad_y, xp, shape, weight: backward(grad_y, xp, weight)


WAYS = {"output-taps": (upsample_conv._output_taps_into, upsample_conv._output_taps_backward),
        "phase-taps": (upsample_conv._phase_taps_into, upsample_conv._phase_taps_backward),
        "dispatch": (upsample_conv.into, upsample_conv.backward)}


@pytest.mark.parametrize("way", sorted(WAYS))
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("shape,cout", SHAPES, ids=str)
def test_upsample_conv_matches_autograd(shape, cout, bias, layout, way):
    _check(*_way(*WAYS[way]), shape, cout, bias, layout)


@pytest.mark.parametrize("way", sorted(WAYS))
def test_upsample_conv_accumulates_into_an_existing_output(way):
    """`into(..., accumulate=True)` adds to what y holds (the U-Net decoder adds the skip's part)."""
    into = WAYS[way][0]
    x, weight, bias = torch.randn(2, 5, 3, 4, dtype=F64), torch.randn(7, 5, 3, 3, dtype=F64), torch.randn(7, dtype=F64)
    before = torch.randn(2, 6, 8, 7, dtype=F64)
    y = before.clone()
    into(y, x, weight, bias, True)
    expected = F.conv2d(F.interpolate(x, scale_factor=2, mode="nearest"), weight, bias, padding=1)
    torch.testing.assert_close(y, before + expected.permute(0, 2, 3, 1), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("shape,cout", SHAPES[:3], ids=str)
def test_phase_columns_match_autograd(shape, cout):
    """resample.py's phase path: what Upsampling runs off the CPU, checked here on the CPU."""
    _check(resample.upsample2x_conv3x3_forward, resample.upsample2x_conv3x3_backward, shape, cout, True, "contiguous")


@pytest.mark.parametrize("block", [1, 1000, 1500, 5000])  # bands of 1, 2, 4 rows of an image; 2 images
def test_output_taps_in_small_blocks(monkeypatch, block):
    """Blocks of Z smaller than one image (bands of rows, the large-image inference path) and
    blocks of several images (training) give the same result as one block."""
    monkeypatch.setattr(upsample_conv, "_BLOCK_ELEMENTS", block)
    _check(*_way(*WAYS["output-taps"]), (3, 2, 7, 5), 2, True, "contiguous")


@pytest.mark.parametrize("block", [7, 20, 35, 60, 112, 1000])  # 1, 2, 5 rows of 7 anchors; 1, 2, all images
def test_phase_taps_in_small_blocks(monkeypatch, block):
    """Blocks of whole low-resolution rows, written into y as each completes: one row a block,
    blocks that cross from one image to the next, and the short last block; blocks of whole
    images (6 padded rows each here), one and two a block, and all of them."""
    monkeypatch.setattr(upsample_conv, "_BLOCK_ROWS", block)
    _check(*_way(*WAYS["phase-taps"]), (3, 4, 5, 6), 17, True, "contiguous")


@pytest.mark.parametrize("block", [7, 20, 112, 1000])
@pytest.mark.parametrize("accumulate", [True, False])
def test_phase_taps_run_the_epilogue_on_each_finished_block(monkeypatch, block, accumulate):
    """`into(..., epilogue=)` applies it (LeakyReLU.activate_, as UpsampleConcatConv2d hands it
    over) to every output pixel exactly once, after its whole sum."""
    from n2n_core import LeakyReLU

    monkeypatch.setattr(upsample_conv, "_BLOCK_ROWS", block)
    g = torch.Generator().manual_seed(1)
    x, weight = torch.randn(3, 16, 5, 6, generator=g, dtype=F64), torch.randn(20, 16, 3, 3, generator=g, dtype=F64)
    before = torch.randn(3, 10, 12, 20, generator=g, dtype=F64) if accumulate else torch.zeros(3, 10, 12, 20, dtype=F64)
    y = before.clone()
    upsample_conv.into(y, x, weight, None, accumulate, epilogue=LeakyReLU(0.1, inplace=True).activate_)
    conv = F.conv2d(F.interpolate(x, scale_factor=2, mode="nearest"), weight, None, padding=1).permute(0, 2, 3, 1)
    torch.testing.assert_close(y, F.leaky_relu(before + conv, 0.1), rtol=1e-10, atol=1e-12)


def test_forward_keeps_only_the_padded_input():
    x = torch.randn(2, 4, 5, 6)
    y, saved = upsample_conv.forward(x, torch.randn(3, 4, 3, 3), None, keep_input=False)
    assert saved is None and y.shape == (2, 3, 10, 12)
    _, saved = upsample_conv.forward(x, torch.randn(3, 4, 3, 3), None)
    assert saved.shape == (2, 7, 8, 4)


class _TorchUpsampleConcatConv(torch.nn.Module):
    """The oracle: interpolate, cat, conv2d (and a leaky ReLU), holding weight and bias directly."""

    def __init__(self, ch, cs, cout, slope):
        super().__init__()
        conv = torch.nn.Conv2d(ch + cs, cout, 3, padding=1)
        self.weight, self.bias, self.slope = conv.weight, conv.bias, slope

    def forward(self, h, skip):
        up = F.interpolate(h, scale_factor=2, mode="nearest")
        y = F.conv2d(torch.cat((up, skip), dim=1), self.weight, self.bias, padding=1)
        return y if self.slope is None else F.leaky_relu(y, self.slope)


@pytest.mark.parametrize("low_resolution", [True, False], ids=["low-resolution", "joined"])
@pytest.mark.parametrize("slope", [None, 0.1])
@pytest.mark.parametrize("ch,cs,cout,shape", [(4, 3, 5, (2, 3, 4)), (6, 16, 16, (1, 4, 3)), (17, 20, 27, (2, 2, 5)),
                                              (16, 2, 3, (3, 1, 1))], ids=str)
def test_upsample_concat_conv_matches_torch(ch, cs, cout, shape, slope, low_resolution, monkeypatch):
    """The U-Net decoder's fused layer: thin and wide skips (im2col and taps), widened and
    16-multiple outputs, with and without the in-place activation the U-Net hands it; both its
    paths (low resolution, a CPU's; joined: upsample, concatenate, convolve, what it runs elsewhere)."""
    from n2n_core import LeakyReLU
    from n2n_core.conv import UpsampleConcatConv2d
    from tests.torch_oracle import check_against_torch

    N, H, W = shape
    monkeypatch.setattr(UpsampleConcatConv2d, "low_resolution", staticmethod(lambda device: low_resolution))
    layer = UpsampleConcatConv2d(ch, cs, cout, dtype=F64, generator=torch.Generator().manual_seed(3))
    act = LeakyReLU(slope, inplace=True) if slope is not None else None

    from n2n_core.module import Module

    class Pair(Module):  # the layer and its activation as one module for the oracle
        def __init__(self):
            super().__init__()
            self.layer = layer
            if act is not None:
                self.act = act

        def forward(self, h, skip):
            return self.layer(h, skip, activation=act)

        def backward(self, g):
            # a copy: the in-place activation would write over the oracle's own output gradient
            return self.layer.backward(act.backward(g.clone()) if act is not None else g)

    twin = torch.nn.Module()
    twin.layer = _TorchUpsampleConcatConv(ch, cs, cout, slope).double()
    twin.forward = lambda h, skip: twin.layer(h, skip)
    h = torch.randn(N, ch, H, W, dtype=F64)
    skip = torch.randn(N, cs, 2 * H, 2 * W, dtype=F64)
    check_against_torch(Pair(), twin, h, skip, label=f"{ch}+{cs}->{cout}")


def test_upsample_concat_conv_names_bad_shapes():
    from n2n_core.conv import UpsampleConcatConv2d

    layer = UpsampleConcatConv2d(4, 3, 5)
    with pytest.raises(ValueError, match=r"expects h \(N, 4, H, W\) and skip \(N, 3, 2H, 2W\), got"):
        layer(torch.randn(1, 4, 3, 3), torch.randn(1, 3, 5, 6))
