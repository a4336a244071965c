"""Checks of layout.py's padded buffers (contract point 2) for the layer tests."""
from __future__ import annotations

import torch

from n2n_core import layout


def interior_rows(N: int, H: int, W: int, padding) -> torch.Tensor:
    """A bool mask over the flat rows of a padded buffer for N images of H x W: True at the pixels."""
    ph, pw = padding
    Hp, Wp = H + ph, W + pw
    mask = torch.zeros(layout.padded_rows(N, H, W, padding), dtype=torch.bool)
    mask[:N * Hp * Wp].view(N, Hp, Wp)[:, ph:, pw:] = True
    return mask


def assert_padded(buffer: torch.Tensor, padding, interior: torch.Tensor | None = None) -> None:
    """buffer (N, H + ph, W + pw, C) is a padded buffer: the grid's shape, every border row and
    column zero, the tail past the grid too; and, given `interior` (N, C, H, W), its pixels."""
    ph, pw = padding
    N, Hp, Wp, C = buffer.shape
    H, W = Hp - ph, Wp - pw
    rows = layout.flat_rows(buffer, padding)
    border = rows[~interior_rows(N, H, W, padding)]
    assert border.numel() and border.abs().sum() == 0, "a padded buffer's border is not zero"
    if interior is not None:
        assert interior.shape == (N, C, H, W)
        torch.testing.assert_close(buffer[:, ph:, pw:].permute(0, 3, 1, 2), interior, rtol=0, atol=0)
