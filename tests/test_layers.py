"""Every layer against its torch.nn twin in float64: forward, input gradient, parameter gradients."""
import dataclasses
import itertools

import pytest
import torch

import n2n_core as n
from padded_layout import assert_padded
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


# -- the fast paths: wide layers (the other GEMM orientation), phase upsampling, layouts ----------
@pytest.mark.parametrize("cin,cout,shape", [(20, 24, (2, 20, 9, 7)), (16, 3, (1, 16, 6, 6)), (3, 17, (3, 3, 5, 8))],
                         ids=str)
@pytest.mark.parametrize("args", [dict(kernel_size=3, padding=1), dict(kernel_size=2, stride=2),
                                  dict(kernel_size=(3, 2), stride=(1, 2), padding=(0, 1), dilation=(2, 1))], ids=str)
def test_conv2d_wide_and_narrow_matches_torch(cin, cout, shape, args):
    layer = n.Conv2d(cin, cout, dtype=F64, **args)
    check_against_torch(layer, torch.nn.Conv2d(cin, cout, **args).double(), torch.randn(shape, dtype=F64), label=str(args))


@pytest.mark.parametrize("shape,cout,bias", [((1, 3, 1, 1), 4, True), ((1, 5, 3, 7), 20, True),
                                             ((3, 17, 4, 5), 2, False), ((2, 4, 6, 6), 16, True)], ids=str)
def test_upsampling_phase_path_matches_torch(shape, cout, bias):
    """x2 + 3x3/1 pad 1 runs as four 2x2 phase convolutions; odd sizes, batch 1, no bias, both widths."""
    layer = n.Upsampling(shape[1], cout, bias=bias, dtype=F64)
    twin = TorchUpsampling(shape[1], cout, 3, 2, 1).double()
    if not bias:
        twin.bias = None
        twin.register_parameter("bias", None)
    check_against_torch(layer, twin, torch.randn(shape, dtype=F64))


def test_channels_last_and_strided_inputs_give_the_same_results():
    x = torch.randn(2, 6, 9, 8, dtype=F64)
    layer = n.Conv2d(6, 5, 3, padding=1, dtype=F64)
    twin = torch.nn.Conv2d(6, 5, 3, padding=1).double()
    check_against_torch(layer, twin, x.contiguous(memory_format=torch.channels_last))
    twin.zero_grad()
    check_against_torch(layer, twin, x[:, :, :, ::2])  # a non-contiguous view
    check_against_torch(n.MaxPool2d(2), torch.nn.MaxPool2d(2), x.contiguous(memory_format=torch.channels_last))


@pytest.mark.parametrize("slope", [0.0, 0.1, 1.5, -0.2])
def test_leaky_relu_any_slope_matches_torch(slope):
    check_against_torch(n.LeakyReLU(slope), torch.nn.LeakyReLU(slope), torch.randn(3, 4, 5, 2, dtype=F64))


def test_conv_transpose2d_batch_one_and_wide():
    args = dict(kernel_size=3, stride=2, padding=1, output_padding=1)
    layer = n.ConvTranspose2d(20, 18, dtype=F64, **args)
    check_against_torch(layer, torch.nn.ConvTranspose2d(20, 18, **args).double(), torch.randn(1, 20, 4, 3, dtype=F64))


@pytest.mark.parametrize("make", [
    lambda: (n.Conv2d(4, 20, 3, padding=1), torch.nn.Conv2d(4, 20, 3, padding=1)),
    lambda: (n.Conv2d(4, 6, 2, stride=2), torch.nn.Conv2d(4, 6, 2, stride=2)),
    lambda: (n.Upsampling(4, 5), TorchUpsampling(4, 5, 3, 2, 1)),
    lambda: (n.ConvTranspose2d(4, 5, 2, stride=2), torch.nn.ConvTranspose2d(4, 5, 2, stride=2)),
    lambda: (n.MaxPool2d(2), torch.nn.MaxPool2d(2)),
    lambda: (n.LeakyReLU(0.1), torch.nn.LeakyReLU(0.1)),
], ids=["conv", "conv2x2s2", "upsampling", "convT", "maxpool", "leaky"])
def test_float32_matches_torch(make):
    layer, twin = make()
    out = check_against_torch(layer, twin, torch.randn(2, 4, 8, 6), rtol=1e-4, atol=1e-5)
    assert out.dtype == torch.float32


def test_eval_mode_keeps_nothing_and_backward_raises():
    for layer, x in [(n.Conv2d(2, 3, 3), torch.randn(1, 2, 5, 5)), (n.Upsampling(2, 3), torch.randn(1, 2, 3, 3)),
                     (n.MaxPool2d(2), torch.randn(1, 2, 4, 4)), (n.LeakyReLU(0.1), torch.randn(3))]:
        layer.eval()
        layer(x)
        with pytest.raises(RuntimeError, match="without a training-mode forward"):
            layer.backward(torch.ones(1))


SLOW_GRID = [
    dict(kernel_size=k, stride=s, padding=p, dilation=d)
    for k, s, p, d in itertools.product([1, 3, 5, (1, 4), (3, 2)], [1, 2, 3, (3, 1)], [0, 1, 2, (0, 3)],
                                        [1, 2, (2, 1)])
]


@pytest.mark.slow
@pytest.mark.parametrize("args", SLOW_GRID, ids=str)
@pytest.mark.parametrize("shape,cout", [((1, 3, 11, 13), 4), ((3, 17, 12, 10), 18)], ids=str)
def test_conv2d_big_grid_matches_torch(args, shape, cout):
    twin = torch.nn.Conv2d(shape[1], cout, **args).double()
    H, W = shape[2:]
    k, d, p = (args["kernel_size"],) * 2, (args["dilation"],) * 2, (args["padding"],) * 2
    k, d, p = [v[0] if isinstance(v[0], tuple) else v for v in (k, d, p)]
    if any(H_ + 2 * pp - dd * (kk - 1) < 1 for H_, pp, dd, kk in zip((H, W), p, d, k)):
        pytest.skip("kernel larger than the padded input")
    check_against_torch(n.Conv2d(shape[1], cout, dtype=F64, **args), twin, torch.randn(shape, dtype=F64), label=str(args))


@pytest.mark.slow
@pytest.mark.parametrize("k,s,p,op,d", [(k, s, p, op, d) for k, s, p, op, d in
                                        itertools.product([1, 2, 3, (2, 3)], [1, 2, 3], [0, 1], [0, 1], [1, 2])
                                        if op < max(s, d) and not (isinstance(k, int) and k == 1 and p > 0)], ids=str)
def test_conv_transpose2d_big_grid_matches_torch(k, s, p, op, d):
    args = dict(kernel_size=k, stride=s, padding=p, output_padding=op, dilation=d)
    layer = n.ConvTranspose2d(5, 18, dtype=F64, **args)
    check_against_torch(layer, torch.nn.ConvTranspose2d(5, 18, **args).double(), torch.randn(2, 5, 6, 7, dtype=F64),
                        label=str(args))


@pytest.mark.parametrize("args", [dict(kernel_size=3, padding=1), dict(kernel_size=(3, 2), stride=(2, 1), padding=1),
                                  dict(kernel_size=3, padding=2, dilation=2)], ids=str)
def test_banded_im2col_matches_torch(args):
    """Columns not kept (input gradients, eval mode) are built one band of rows at a time."""
    from n2n_core import conv_plan
    x = torch.randn(3, 4, 9, 7, dtype=F64)
    for elements in (40, 5000):  # bands of rows of one image; bands of one or two whole images
        layer, twin = n.Conv2d(4, 6, dtype=F64, **args), torch.nn.Conv2d(4, 6, **args).double()
        layer.plan = dataclasses.replace(conv_plan.CPU_PLAN, band_elements=elements)
        check_against_torch(layer, twin, x, label=str(args))  # the input gradient runs banded
        layer.eval()
        torch.testing.assert_close(layer(x), twin(x).detach(), rtol=1e-10, atol=1e-12)


class ConvAct(n.Module):
    """A convolution with its activation fused in (Conv2d.forward(x, activation=...))."""

    def __init__(self, conv, act):
        super().__init__()
        self.conv, self.act = conv, act

    def forward(self, x):
        return self.conv(x, activation=self.act)

    def backward(self, grad):
        return self.conv.backward(self.act.backward(grad.clone()))  # an in-place activation overwrites its gradient


class TorchConvAct(torch.nn.Module):
    def __init__(self, conv, act):
        super().__init__()
        self.conv, self.act = conv, act

    def forward(self, x):
        return self.act(self.conv(x))


@pytest.mark.parametrize("slope", [0.0, 0.1, 1.5, -0.2])
@pytest.mark.parametrize("cin,cout", [(16, 20), (17, 3), (3, 18)], ids=str)
def test_conv_with_fused_inplace_leaky_relu_matches_torch(slope, cin, cout):
    """Tap convolutions apply the activation block by block; other paths (3 input channels) and slopes < 0 after."""
    args = dict(kernel_size=3, padding=1)
    ours = ConvAct(n.Conv2d(cin, cout, dtype=F64, **args), n.LeakyReLU(slope, inplace=True))
    twin = TorchConvAct(torch.nn.Conv2d(cin, cout, **args).double(), torch.nn.LeakyReLU(slope))
    x = torch.randn(2, cin, 7, 9, dtype=F64)
    check_against_torch(ours, twin, x, label=f"slope {slope}")
    ours.eval()
    torch.testing.assert_close(ours(x), twin(x).detach(), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("slope", [0.0, 0.1])
def test_fused_leaky_relu_backward_at_exact_zeros_and_across_slabs(slope):
    """The fused activation derives its mask from the output in backward: where the output is
    exactly 0 the gradient is the slope's, as torch's (x <= 0), and slabs of the batch
    (ConvPlan.slab_elements) each get their own part."""
    args = dict(kernel_size=3, padding=1)
    ours = ConvAct(n.Conv2d(16, 20, dtype=F64, **args), n.LeakyReLU(slope, inplace=True))
    ours.conv.weight.data[:5] = 0  # five output channels exactly 0 everywhere
    ours.conv.bias.data[:5] = 0
    twin = TorchConvAct(torch.nn.Conv2d(16, 20, **args).double(), torch.nn.LeakyReLU(slope))
    x = torch.randn(8, 16, 48, 50, dtype=F64)  # 48,000 output elements an image: two slabs of 5 and 3
    x[:, :, :3] = 0  # and the first rows of every channel 0 where the bias is 0 too
    out = check_against_torch(ours, twin, x, label=f"slope {slope}")
    assert (out[:, :5] == 0).all()
    layer = ours.conv
    assert layer.plan_for(x.device).slab_elements < out.numel()


class Cloned(n.Module):
    """Runs an in-place module on copies, so the oracle's input and gradient stay untouched."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        return self.inner(x.clone())

    def backward(self, grad):
        return self.inner.backward(grad.clone())


@pytest.mark.parametrize("slope", [0.0, 0.1, 1.5, -0.2])
@pytest.mark.parametrize("shape", [(3, 4, 5, 2), (3, 8, 130, 131)], ids=str)  # the second in several slabs
def test_inplace_leaky_relu_matches_torch(slope, shape):
    check_against_torch(Cloned(n.LeakyReLU(slope, inplace=True)), torch.nn.LeakyReLU(slope),
                        torch.randn(shape, dtype=F64))


@pytest.mark.parametrize("rows", [7, 64])  # blocks of a few rows, a partial last block
@pytest.mark.parametrize("args,cout", [(dict(kernel_size=3, padding=1), 20), (dict(kernel_size=3, padding=1), 3),
                                       (dict(kernel_size=(3, 5), padding=(2, 2), dilation=(2, 1)), 18)], ids=str)
def test_tap_convolution_in_blocks_matches_torch(rows, args, cout):
    """Tap convolutions run their GEMMs block by block of rows; small blocks exercise the seams."""
    from n2n_core import conv_plan
    layer, twin = n.Conv2d(17, cout, dtype=F64, **args), torch.nn.Conv2d(17, cout, **args).double()
    layer.plan = dataclasses.replace(conv_plan.CPU_PLAN, tap_block_rows=rows)
    assert layer.uses_taps("cpu")
    x = torch.randn(3, 17, 9, 7, dtype=F64)
    check_against_torch(layer, twin, x, label=str(args))
    layer.eval()
    torch.testing.assert_close(layer(x), twin(x).detach(), rtol=1e-10, atol=1e-12)


def test_phase_tap_tables_are_derived_as_they_were_written():
    """The nearest-x2 + 3x3 phase tables, now derived from the row rule, equal the hand-written ones."""
    from n2n_core import resample
    assert resample._PHASE_TAPS == [[[1, 0, 0], [0, 1, 1]], [[1, 1, 0], [0, 0, 1]]]
    assert resample._GRAD_TAPS == [[[0, 0, 0], [0, 1, 1], [1, 0, 0]], [[0, 0, 1], [1, 1, 0], [0, 0, 0]]]


@pytest.mark.parametrize("kernel,dilation", [((3, 3), (1, 1)), ((3, 5), (2, 1)), ((5, 3), (1, 3)), ((2, 2), (2, 2)), ((2, 2), (1, 1))])
def test_tap_reads_end_at_the_last_row_of_the_padded_buffer(kernel, dilation):
    """The layout contract's bound: last anchor + largest offset = the padded buffer's last row with
    "same" padding (its tail included), and every read of a real output pixel's window lands on
    its input pixel or on a border."""
    from n2n_core import layout, tap_conv
    from padded_layout import interior_rows
    N, H, W = 3, 7, 9
    padding = tuple(d * (k - 1) // 2 for k, d in zip(kernel, dilation))
    same = all(2 * p == d * (k - 1) for k, p, d in zip(kernel, padding, dilation))
    (ph, pw), (dh, dw) = padding, dilation
    Hp, Wp = H + ph, W + pw
    offsets = tap_conv._tap_offsets(kernel, dilation, Wp)
    last_read = tap_conv._anchor_count(N, Hp, Wp, H, W) - 1 + max(offsets)
    R = layout.padded_rows(N, H, W, padding)
    if not same:  # an even kernel with dilation 1 has no same padding: the reads would run past the buffer
        assert not tap_conv.use_taps(kernel, (1, 1), padding, dilation) and last_read > R - 1
        return
    assert last_read == R - 1
    pixel = interior_rows(N, H, W, padding)
    for n in range(N):
        for h in range(H):
            for w in range(W):
                anchor = (n * Hp + h) * Wp + w
                for t, offset in enumerate(offsets):
                    i, j = divmod(t, kernel[1])
                    hi, wj = h + i * dh - ph, w + j * dw - pw  # the input pixel tap (i, j) reads
                    inside = 0 <= hi < H and 0 <= wj < W
                    assert pixel[anchor + offset] == inside
                    if inside:
                        assert anchor + offset == (n * Hp + ph + hi) * Wp + pw + wj


@pytest.mark.parametrize("inplace", [True, False])
def test_padded_layout_survives_only_an_inplace_leaky_relu(inplace):
    """A tap convolution's output is the marked interior of its padded buffer; LeakyReLU(inplace=True)
    returns that very object, so the next convolution reads the buffer without a copy."""
    from n2n_core import layout
    conv, act = n.Conv2d(16, 16, 3, padding=1, dtype=F64), n.LeakyReLU(0.1, inplace=inplace)
    y = conv(torch.randn(2, 16, 5, 6, dtype=F64))
    buffer, padding = layout.padded_buffer(y)
    assert padding == (1, 1) and buffer.shape == (2, 6, 7, 16)
    h = act(y)
    assert (h is y) == inplace
    assert (layout.padded_buffer(h) is not None) == inplace
    if inplace:
        assert layout.padded_buffer(h)[0] is buffer
        assert_padded(buffer, padding, h)


@pytest.mark.parametrize("cout", [20, 3])  # computed 32 and 16 wide on the CPU
def test_a_widened_output_is_read_in_place_by_the_next_convolution(cout):
    """An output whose width is rounded up for the GEMM is the first C channels of its wider padded
    buffer, marked: the next convolution reads those rows in place (no padding copy), forward and
    backward agree with torch, and the rows read in backward are the buffer's."""
    from n2n_core import layout
    from torch_oracle import check_against_torch
    first, act = n.Conv2d(16, cout, 3, padding=1, dtype=F64), n.LeakyReLU(0.1, inplace=True)
    second = n.Conv2d(cout, 5, 3, padding=1, dtype=F64)
    h = first(torch.randn(2, 16, 5, 6, dtype=F64), act)
    buffer, padding = layout.padded_buffer(h)
    assert padding == (1, 1) and buffer.shape == (2, 6, 7, cout) and buffer.stride(2) == 16 * -(-cout // 16)
    assert_padded(buffer, padding, h)
    second(h)
    assert second._cache[0] is buffer  # kept for backward as it is: no copy
    twin = torch.nn.Conv2d(cout, 5, 3, padding=1).double()
    check_against_torch(second, twin, h)  # a strided input: the same results as a contiguous one


@pytest.mark.parametrize("scale", [2, 3])  # the phase path and the plain upsample-then-convolve path
def test_upsampling_names_itself_on_a_wrong_input(scale):
    layer = n.Upsampling(4, 8, scale_factor=scale, dtype=F64)
    for bad in (torch.zeros(1, 5, 4, 4, dtype=F64), torch.zeros(4, 4, 4, dtype=F64)):
        with pytest.raises(ValueError, match=r"Upsampling expects \(N, 4, H, W\)"):
            layer(bad)


@pytest.mark.parametrize("shape", [(1, 2, 8, 8), (2, 3, 9, 7), (1, 1, 2, 2), (3, 5, 6, 11)], ids=str)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_maxpool_2x2_slices_match_torch(shape, layout):
    """The 2x2 stride-2 path (pool2x2.py): odd sizes, both memory layouts, and ties, where the
    gradient goes to the first maximum in row-major order as torch's."""
    x = torch.randn(shape, dtype=F64)
    x = x.contiguous(memory_format=torch.channels_last) if layout == "channels_last" else x
    check_against_torch(n.MaxPool2d(2), torch.nn.MaxPool2d(2), x)
    ties = torch.randint(0, 2, shape).to(F64)  # many equal values in each window
    ties = ties.contiguous(memory_format=torch.channels_last) if layout == "channels_last" else ties
    check_against_torch(n.MaxPool2d(2), torch.nn.MaxPool2d(2), ties)


@pytest.mark.parametrize("shape", [(2, 5, 8, 6), (1, 3, 9, 7)], ids=str)
def test_maxpool_2x2_into_padded_buffers_matches_torch(shape):
    """output_padding=1 (the U-Net's pools): the output is the marked interior of a zero-bordered
    buffer a 3x3 convolution reads as it is; with a padded input (a convolution's output) the input
    gradient comes back in a padded buffer too. Values and gradients as torch's."""
    from n2n_core import layout
    from torch_oracle import check_against_torch
    pool = n.MaxPool2d(2, output_padding=1)
    check_against_torch(pool, torch.nn.MaxPool2d(2), torch.randn(shape, dtype=F64))
    y = pool(torch.randn(shape, dtype=F64))
    buffer, padding = layout.padded_buffer(y)
    assert padding == (1, 1) and buffer.shape[1:3] == (shape[2] // 2 + 1, shape[3] // 2 + 1)
    assert_padded(buffer, padding, y)
    conv, act = n.Conv2d(shape[1], 4, 3, padding=1, dtype=F64), n.LeakyReLU(0.1, inplace=True)
    x = act(conv(torch.randn(shape, dtype=F64)))  # marked: the pool's gradient takes its layout
    pool.train()
    y = pool(x)
    g = torch.randn(y.shape, dtype=F64)
    grad = pool.backward(g)
    assert layout.padded_buffer(grad) is not None and layout.padded_buffer(grad)[1] == (1, 1)
    assert_padded(*layout.padded_buffer(grad), grad)
    xt = x.detach().clone().requires_grad_(True)
    torch.nn.functional.max_pool2d(xt, 2).backward(g)
    torch.testing.assert_close(grad, xt.grad, rtol=0, atol=0)
    with pytest.raises(ValueError, match="output_padding"):
        n.MaxPool2d(3, output_padding=1)


def test_maxpool_2x2_general_path_agrees():
    """The same windows by the general im2col kernel: the values and the routed gradient agree."""
    from n2n_core import resample
    from n2n_core.pool2x2 import max_pool2x2_backward, max_pool2x2_forward

    x = torch.randint(0, 3, (2, 4, 7, 6)).to(F64)
    y, routes = max_pool2x2_forward(x)
    y_ref, index_ref = resample.max_pool2d_forward(x, (2, 2), (2, 2))
    torch.testing.assert_close(y, y_ref)
    g = torch.randn(y.shape, dtype=F64)
    torch.testing.assert_close(max_pool2x2_backward(g, routes, x.shape),
                               resample.max_pool2d_backward(g, index_ref, x.shape, (2, 2), (2, 2)), rtol=0, atol=0)
    assert max_pool2x2_forward(x, keep_routes=False)[1] is None  # inference keeps nothing
    torch.testing.assert_close(max_pool2x2_forward(x, keep_routes=False)[0], y_ref)
