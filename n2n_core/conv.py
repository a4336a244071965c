"""Convolutions: Conv2d, ConvTranspose2d, and Upsampling (nearest x2, then a convolution)."""
from __future__ import annotations

import torch
from torch import Tensor

from n2n_core import conv_plan, gemm_conv, layout, resample, tap_conv, upsample_conv
from n2n_core.init import fan_in_and_out, torch_default_conv_init_
from n2n_core.module import Module, Parameter
from n2n_core.skip import Concat


class _ConvNd(Module):
    """What the convolutions share: torch's arguments and initialization, the input check,
    the bias as a tensor or None, and the gradient accumulation into the parameters.

    `transposed`: the weight is (C_in, C_out, kh, kw) instead of (C_out, C_in, kh, kw), and
    its fan-in is taken from dim 1 too, as torch does.
    """

    def __init__(self, in_channels, out_channels, kernel_size, stride, padding, dilation, bias, transposed, *,
                 generator=None, dtype=torch.float32, device=None):
        super().__init__()
        self.in_channels, self.out_channels = int(in_channels), int(out_channels)
        self.kernel_size = layout.pair(kernel_size)
        self.stride, self.padding, self.dilation = layout.pair(stride), layout.pair(padding), layout.pair(dilation)
        shape = (self.in_channels, self.out_channels) if transposed else (self.out_channels, self.in_channels)
        self.weight = Parameter(torch.empty(*shape, *self.kernel_size, dtype=dtype, device=device))
        self.bias = Parameter(torch.empty(self.out_channels, dtype=dtype, device=device)) if bias else None
        # torch computes fan-in of a transposed conv weight from dim 1 (out channels) too
        fan_in = fan_in_and_out(self.weight.data)[0] if transposed else None
        torch_default_conv_init_(self.weight.data, self.bias.data if bias else None, generator, fan_in=fan_in)

    def _check_input(self, x: Tensor) -> None:
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"{type(self).__name__} expects (N, {self.in_channels}, H, W), got {tuple(x.shape)}")

    def _bias(self) -> Tensor | None:
        return self.bias.data if self.bias is not None else None

    def _accumulate(self, grad_weight: Tensor, grad_bias: Tensor) -> None:
        """Add a backward pass's gradients into the parameters (they accumulate until zero_grad)."""
        self.weight.accumulate(grad_weight)
        if self.bias is not None:
            self.bias.accumulate(grad_bias)


class Conv2d(_ConvNd):
    """2-D cross-correlation, PyTorch's Conv2d arguments and layout.

    Shape:
        input (N, C_in, H, W) -> output (N, C_out, H_out, W_out) with
        H_out = (H + 2 padding - dilation (kernel - 1) - 1) // stride + 1 (same for W).
    Attributes:
        weight: (C_out, C_in, kh, kw); bias: (C_out,) or None.
    """

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, dilation=1, bias=True, *,
                 generator=None, dtype=torch.float32, device=None):
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, dilation, bias, False,
                         generator=generator, dtype=dtype, device=device)
        # whether shifted GEMMs over the padded input can compute it (tap_conv.use_taps); a plan
        # whose path is "taps" (the CPU's) runs them, another im2col and one GEMM
        self._tap_shaped = tap_conv.use_taps(self.kernel_size, self.stride, self.padding, self.dilation)
        self.plan: conv_plan.ConvPlan | None = None  # None: the plan of the input's device (conv_plan.plan_for)
        self._cache = None

    def plan_for(self, device) -> conv_plan.ConvPlan:
        """The plan this layer runs on `device`: its own `plan` when set, else the device's."""
        return self.plan or conv_plan.plan_for(device)

    def uses_taps(self, device) -> bool:
        """Whether this layer runs as shifted GEMMs on `device` (conv_plan's rule; see `plan`)."""
        return self._tap_shaped and self.plan_for(device).path == "taps"

    def forward(self, x: Tensor, activation: Module | None = None) -> Tensor:
        """x (N, C_in, H, W) -> activation(conv(x)), or conv(x) without an activation.

        `activation`: any elementwise module, applied to the output. One whose `fusable()` is
        true (LeakyReLU(inplace=True), with `activate_` and `adopt`) runs fused into a tap
        convolution, on each block of the output while it is in cache, and keeps for its own
        backward what a plain call would have kept.
        """
        self._check_input(x)
        plan = self.plan_for(x.device)
        taps = self._tap_shaped and plan.path == "taps"
        fused = taps and _fusable(activation)
        if taps:
            y, saved = tap_conv.tap_conv2d_forward(x, self.weight.data, self._bias(), self.padding, self.dilation,
                                                   epilogue=activation.activate_ if fused else None, plan=plan)
        else:
            y, saved = gemm_conv.conv2d_forward(x, self.weight.data, self._bias(), self.stride, self.padding,
                                                self.dilation, keep_cols=self.training, plan=plan)
        self._cache = (saved, x.shape, taps, plan) if self.training else None
        if activation is None:
            return y
        return activation.adopt(y) if fused else activation(y)

    def backward(self, grad_output: Tensor, input_grad: bool = True) -> Tensor | None:
        """Add the parameters' gradients; return the input's, or None when `input_grad` is False
        (a model's first layer in training: that product is never needed)."""
        saved, shape, taps, plan = self._saved(self._cache)
        self._cache = None  # the columns (or padded input) are large; free them now
        if taps:
            grad_x, grad_w, grad_b = tap_conv.tap_conv2d_backward(grad_output, saved, self.weight.data, self.padding,
                                                                  self.dilation, input_grad, plan=plan)
        else:
            grad_x, grad_w, grad_b = gemm_conv.conv2d_backward(grad_output, saved, shape, self.weight.data,
                                                               self.stride, self.padding, self.dilation, input_grad,
                                                               plan=plan)
        self._accumulate(grad_w, grad_b)
        return grad_x

    def extra_repr(self) -> str:
        s = f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}"
        if self.padding != (0, 0):
            s += f", padding={self.padding}"
        if self.dilation != (1, 1):
            s += f", dilation={self.dilation}"
        return s + ("" if self.bias is not None else ", bias=False")


class ConvTranspose2d(_ConvNd):
    """Transposed convolution (the input gradient of a Conv2d), torch's arguments and layout.

    Shape:
        input (N, C_in, H, W) -> output (N, C_out, H_out, W_out) with
        H_out = (H - 1) stride - 2 padding + dilation (kernel - 1) + output_padding + 1.
    Attributes:
        weight: (C_in, C_out, kh, kw); bias: (C_out,) or None.
    """

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, output_padding=0, dilation=1,
                 bias=True, *, generator=None, dtype=torch.float32, device=None):
        output_padding, stride, dilation = layout.pair(output_padding), layout.pair(stride), layout.pair(dilation)
        for op, s, d in zip(output_padding, stride, dilation):
            if op >= max(s, d):
                raise ValueError(f"output_padding {output_padding} must be smaller than stride or dilation")
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, dilation, bias, True,
                         generator=generator, dtype=dtype, device=device)
        self.output_padding = output_padding
        self._x = None

    def forward(self, x: Tensor) -> Tensor:
        self._check_input(x)
        self._x = x if self.training else None
        return gemm_conv.conv_transpose2d_forward(x, self.weight.data, self._bias(),
                                                  self.stride, self.padding, self.output_padding, self.dilation)

    def backward(self, grad_output: Tensor) -> Tensor:
        x = self._saved(self._x)
        grad_x, grad_w, grad_b = gemm_conv.conv_transpose2d_backward(grad_output, x, self.weight.data,
                                                                     self.stride, self.padding, self.dilation)
        self._accumulate(grad_w, grad_b)
        return grad_x

    def extra_repr(self) -> str:
        return f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}"


class Upsampling(Conv2d):
    """Nearest-neighbour upsampling by `scale_factor`, then a convolution (the seed design's layer).

    Its own `weight` (C_out, C_in, kh, kw) and `bias` like a Conv2d; the state-dict keys
    match PyTorch's nearest Upsample followed by its Conv2d only up to the
    prefix, so its torch twin is a module holding `weight` and `bias` directly.

    Shape:
        (N, C_in, H, W) -> (N, C_out, H_out, W_out), the Conv2d formula applied to (s H, s W).
    """

    def __init__(self, in_channels, out_channels, kernel_size=3, scale_factor=2, stride=1, padding=1, bias=True, *,
                 generator=None, dtype=torch.float32, device=None):
        super().__init__(in_channels, out_channels, kernel_size, stride=stride, padding=padding, bias=bias,
                         generator=generator, dtype=dtype, device=device)
        self.scale_factor = int(scale_factor)

    def _is_upsample2x_conv3x3(self) -> bool:
        """x2 then 3x3/1, padding 1 (the seed's layer): computed as four 2x2 convolutions at low resolution."""
        return (self.scale_factor == 2 and self.kernel_size == (3, 3) and self.stride == (1, 1)
                and self.padding == (1, 1) and self.dilation == (1, 1))

    def forward(self, x: Tensor) -> Tensor:
        self._check_input(x)
        if not self._is_upsample2x_conv3x3():
            return super().forward(resample.upsample_nearest_forward(x, self.scale_factor))
        # the taps plan (a CPU's) upsamples at low resolution without columns (upsample_conv.py,
        # BENCHMARKS.md "Core"); the gemm plan (CUDA's) builds the phase columns for one batched GEMM
        plan = self.plan_for(x.device)
        taps = plan.path == "taps"
        run = upsample_conv.forward if taps else resample.upsample2x_conv3x3_forward
        y, saved = run(x, self.weight.data, self._bias(), self.training)
        self._cache = (saved, x.shape, taps, plan) if self.training else None
        return y

    def backward(self, grad_output: Tensor, input_grad: bool = True) -> Tensor | None:
        """As Conv2d.backward: None for the input's gradient when `input_grad` is False."""
        if not self._is_upsample2x_conv3x3():
            grad = super().backward(grad_output, input_grad)
            return None if grad is None else resample.upsample_nearest_backward(grad, self.scale_factor)
        saved, shape, taps, plan = self._saved(self._cache)
        self._cache = None
        if taps:
            grad_x, grad_w, grad_b = upsample_conv.backward(grad_output, saved, self.weight.data, input_grad)
        else:
            grad_x, grad_w, grad_b = resample.upsample2x_conv3x3_backward(grad_output, saved, shape, self.weight.data,
                                                                          input_grad, plan=plan)
        self._accumulate(grad_w, grad_b)
        return grad_x

    def extra_repr(self) -> str:
        return f"scale_factor={self.scale_factor}, " + super().extra_repr()


class UpsampleConcatConv2d(Conv2d):
    """conv3x3(cat(upsample_nearest2x(h), skip)), padding 1: a U-Net decoder's first convolution.

    Its `weight` (C_out, C_h + C_skip, 3, 3) and `bias` are exactly those of the Conv2d over the
    concatenation (same state-dict entries, same initialization). On a CPU the convolution splits
    over the two inputs: the skip's channels run as a plain convolution at full resolution, and
    the upsampled channels at low resolution (upsample_conv.py), added into the same output:
    2.25x fewer multiply-adds for those channels, and neither the upsampled tensor nor the
    concatenation is built. Elsewhere it upsamples, concatenates (into the padded
    buffer the convolution reads) and convolves, as the separate layers did.

    Shape:
        h (N, C_h, H, W), skip (N, C_skip, 2H, 2W) -> (N, C_out, 2H, 2W).
        backward(grad (N, C_out, 2H, 2W)) -> (grad_h (N, C_h, H, W), grad_skip (N, C_skip, 2H, 2W)).
    """

    def __init__(self, low_channels, skip_channels, out_channels, *, generator=None, dtype=torch.float32,
                 device=None):
        super().__init__(low_channels + skip_channels, out_channels, 3, padding=1, generator=generator, dtype=dtype,
                         device=device)
        self.low_channels, self.skip_channels = int(low_channels), int(skip_channels)
        self._skip_taps = tap_conv.use_taps(self.kernel_size, self.stride, self.padding, self.dilation)
        self._split_cache = None

    def low_resolution(self, device) -> bool:
        """Whether the upsampled channels run at low resolution on `device`: under the taps plan
        (a CPU's; measured there only), not under the gemm plan (CUDA's)."""
        return self.plan_for(device).path == "taps"

    def forward(self, h: Tensor, skip: Tensor, activation: Module | None = None) -> Tensor:
        """activation(conv(cat(upsample(h), skip))); `activation` as in Conv2d.forward (a fusable one
        runs on each block of output pixels as the low-resolution part completes them)."""
        if (h.dim() != 4 or h.shape[1] != self.low_channels
                or tuple(skip.shape) != (h.shape[0], self.skip_channels, 2 * h.shape[2], 2 * h.shape[3])):
            raise ValueError(f"{type(self).__name__} expects h (N, {self.low_channels}, H, W) and skip "
                             f"(N, {self.skip_channels}, 2H, 2W), got {tuple(h.shape)} and {tuple(skip.shape)}")
        if not self.low_resolution(h.device):
            self._split_cache = "joined" if self.training else None
            return super().forward(_padded_cat(resample.upsample_nearest_forward(h, 2), skip), activation)
        weight_h, weight_skip = self.weight.data.split((self.low_channels, self.skip_channels), dim=1)
        if self._skip_taps:
            y, skip_saved = tap_conv.tap_conv2d_forward(skip, weight_skip, self._bias(), self.padding, self.dilation)
        else:
            y, skip_saved = gemm_conv.conv2d_forward(skip, weight_skip, self._bias(), self.stride, self.padding,
                                                     self.dilation, keep_cols=self.training)
        fused = _fusable(activation)
        hp = upsample_conv.into(y.permute(0, 2, 3, 1), h, weight_h, None, accumulate=True,
                                epilogue=activation.activate_ if fused else None)
        self._split_cache = (hp, skip_saved, skip.shape) if self.training else None
        if activation is None:
            return y
        return activation.adopt(y) if fused else activation(y)

    def backward(self, grad_output: Tensor, skip_grad: bool = True) -> tuple[Tensor, Tensor | None]:
        """(grad_h, grad_skip); grad_skip None when `skip_grad` is False (the skip is the model's input)."""
        saved = self._saved(self._split_cache)
        self._split_cache = None
        if saved == "joined":
            grad = super().backward(grad_output)
            grad_up, grad_skip = grad.split((self.low_channels, self.skip_channels), dim=1)
            return resample.upsample_nearest_backward(grad_up, 2), (grad_skip if skip_grad else None)
        hp, skip_saved, skip_shape = saved
        weight_h, weight_skip = self.weight.data.split((self.low_channels, self.skip_channels), dim=1)
        if self._skip_taps:
            grad_skip, grad_ws, grad_b = tap_conv.tap_conv2d_backward(grad_output, skip_saved, weight_skip,
                                                                      self.padding, self.dilation, skip_grad)
        else:
            grad_skip, grad_ws, grad_b = gemm_conv.conv2d_backward(grad_output, skip_saved, skip_shape, weight_skip,
                                                                   self.stride, self.padding, self.dilation, skip_grad)
        grad_h, grad_wh, _ = upsample_conv.backward(grad_output, hp, weight_h, need_bias_grad=False)
        self._accumulate(torch.cat((grad_wh, grad_ws), dim=1), grad_b)
        return grad_h, grad_skip

    def _on_mode_change(self) -> None:
        self._cache = self._split_cache = None

    def extra_repr(self) -> str:
        return (f"{self.low_channels} (x2) + {self.skip_channels}, {self.out_channels}, "
                "kernel_size=(3, 3), padding=(1, 1)")


def _fusable(activation: Module | None) -> bool:
    """Whether `activation` can run fused into a convolution's output blocks (`activate_`, then `adopt`)."""
    return activation is not None and getattr(activation, "fusable", lambda: False)()


def _padded_cat(a: Tensor, b: Tensor) -> Tensor:
    """cat((a, b), dim=1) laid out for a convolution with padding 1 (skip.Concat(pad=1)'s buffer)."""
    return Concat(pad=1).eval()(a, b)
def set_conv_plan(model: Module, plan: conv_plan.ConvPlan | None) -> Module:
    """Run every Conv2d (and Upsampling) of `model` with `plan`, whatever the device; None: each
    device's own (conv_plan.plan_for). For tests and benchmarks of one path. Returns the model."""
    for module in model.modules():
        if isinstance(module, Conv2d):
            module.plan = plan
    return model
