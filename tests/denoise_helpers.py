"""Test-only helpers for the denoising tests: a tiny fully convolutional Module
(torch.nn.functional inside; tests may use torch) and image-tree generators."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from n2n_core import Module, Parameter


class TinyUNet(Module):
    """Two pooling levels with skips; size_multiple 4. Forward only (inference tests).

    Shape: (N, 3, H, W) with H, W multiples of 4 -> (N, 3, H, W).
    """

    size_multiple = 4
    in_channels = 3

    def __init__(self, width: int = 8, seed: int = 0, dtype=torch.float32):
        super().__init__()
        g = torch.Generator().manual_seed(seed)

        def conv(cin, cout):
            w = torch.randn(cout, cin, 3, 3, generator=g, dtype=dtype) * (2.0 / (cin * 9)) ** 0.5
            return Parameter(w), Parameter(torch.randn(cout, generator=g, dtype=dtype) * 0.05)

        self.w0, self.b0 = conv(3, width)
        self.w1, self.b1 = conv(width, width)
        self.w2, self.b2 = conv(width, width)
        self.w3, self.b3 = conv(2 * width, width)
        self.w4, self.b4 = conv(width + 3, 3)
        self.calls = 0
        self.max_input = 0

    def forward(self, x):
        self.calls += 1
        self.max_input = max(self.max_input, x.shape[-1] * x.shape[-2])
        act = lambda t: F.leaky_relu(t, 0.1)
        e0 = act(F.conv2d(x, self.w0.data, self.b0.data, padding=1))
        e1 = act(F.conv2d(F.max_pool2d(e0, 2), self.w1.data, self.b1.data, padding=1))
        e2 = act(F.conv2d(F.max_pool2d(e1, 2), self.w2.data, self.b2.data, padding=1))
        d1 = torch.cat([F.interpolate(e2, scale_factor=2, mode="nearest"), e1], dim=1)
        d1 = act(F.conv2d(d1, self.w3.data, self.b3.data, padding=1))
        d0 = torch.cat([F.interpolate(d1, scale_factor=2, mode="nearest"), x], dim=1)
        return F.conv2d(d0, self.w4.data, self.b4.data, padding=1) * 0.2 + x
