"""Neighbor2Neighbor (Huang et al., CVPR 2021): a denoiser trained on single noisy images.

From one noisy image y, a random neighbour sub-sampler makes two half-size images g1(y)
and g2(y): every 2x2 cell gives one pixel to each, two pixels next to each other in the
cell (horizontally or vertically), drawn at random per cell among the 8 ordered pairs, the
same pair for every channel of the cell. Their noise is independent and their clean
content almost the same, so a network f trained to map g1(y) to g2(y) learns to denoise;
the regulariser pulls f(g1(y)) - g2(y) towards g1(f(y)) - g2(f(y)), the same difference
seen through the denoised full image (computed without gradient):

    loss = mean((f(g1 y) - g2 y)^2) + gamma mean((f(g1 y) - g2 y - (g1 f(y) - g2 f(y)))^2)

with the means over every element, as the authors' code takes them. The training loop
(pipeline.training.worker) runs f(y) in eval mode, sub-samples y and f(y) with the same
cells' pairs, runs f on g1(y) and sends `NeighborLoss.backward()` into the model.

Cell pixels are numbered 0 (top left), 1 (top right), 2 (bottom left), 3 (bottom right);
`PAIRS[k]` is the k-th ordered pair, a choice of k in 0..7 per cell.
"""
from __future__ import annotations

import torch
from torch import Tensor

from n2n_core.module import Module

# the 8 ordered pairs of adjacent pixels of a 2x2 cell: 4 horizontal, 4 vertical
PAIRS = ((0, 1), (1, 0), (2, 3), (3, 2), (0, 2), (2, 0), (1, 3), (3, 1))


def draw_pairs(generators: list[torch.Generator], height: int, width: int) -> Tensor:
    """One pair choice per cell of each image: (N, H/2, W/2) int64 in 0..7, row i from generators[i]."""
    if height % 2 or width % 2:
        raise ValueError(f"neighbour sub-sampling needs an even height and width, got {height}x{width}")
    return torch.stack([torch.randint(0, len(PAIRS), (height // 2, width // 2), generator=g) for g in generators])


_TABLES: dict = {}


def _pair_table(device) -> Tensor:
    """PAIRS as an (8, 2) int64 tensor on `device`, made once per device."""
    device = torch.device(device)
    if device not in _TABLES:
        _TABLES[device] = torch.tensor(PAIRS, dtype=torch.int64, device=device)
    return _TABLES[device]


def _cells(x: Tensor) -> Tensor:
    """(N, C, H, W) -> (N, C, H/2, W/2, 4): the four pixels of each 2x2 cell, in cell order."""
    n, c, h, w = x.shape
    return x.reshape(n, c, h // 2, 2, w // 2, 2).permute(0, 1, 2, 4, 3, 5).reshape(n, c, h // 2, w // 2, 4)


def _uncells(cells: Tensor) -> Tensor:
    """The inverse of `_cells`: (N, C, H/2, W/2, 4) -> (N, C, H, W)."""
    n, c, h2, w2, _ = cells.shape
    return cells.reshape(n, c, h2, w2, 2, 2).permute(0, 1, 2, 4, 3, 5).reshape(n, c, 2 * h2, 2 * w2)


class NeighborSubsampler(Module):
    """g1, g2 = the two neighbour sub-samples of x for the given pair choices (no parameters).

    Shape:
        x: (N, C, H, W), H and W even; pairs: (N, H/2, W/2) int64 in 0..7 (`draw_pairs`).
        returns (g1, g2), each (N, C, H/2, W/2).
    backward(grad_g1, grad_g2) -> grad_x (N, C, H, W): each sub-sample's gradient back at its pixel.
    """

    def __init__(self):
        super().__init__()
        self._index = None  # (2, N, C, H/2, W/2, 1): the cell pixel of g1 and of g2

    def forward(self, x: Tensor, pairs: Tensor) -> tuple[Tensor, Tensor]:
        n, c, h, w = x.shape
        if pairs.shape != (n, h // 2, w // 2) or h % 2 or w % 2:
            raise ValueError(f"NeighborSubsampler: x {tuple(x.shape)} needs pairs of shape ({n}, {h // 2}, "
                             f"{w // 2}) and an even size, got {tuple(pairs.shape)}")
        index = _pair_table(x.device)[pairs].permute(3, 0, 1, 2).unsqueeze(2).unsqueeze(-1)  # (2, N, 1, H/2, W/2, 1)
        index = index.expand(2, n, c, h // 2, w // 2, 1)
        cells = _cells(x)  # (N, C, H/2, W/2, 4)
        g1 = torch.gather(cells, -1, index[0]).squeeze(-1)
        g2 = torch.gather(cells, -1, index[1]).squeeze(-1)
        if self.training:
            self._index = index
        return g1, g2

    def backward(self, grad_g1: Tensor, grad_g2: Tensor) -> Tensor:
        index = self._saved(self._index, "the pairs")
        n, c, h2, w2 = grad_g1.shape
        cells = grad_g1.new_zeros(n, c, h2, w2, 4)
        cells.scatter_add_(-1, index[0], grad_g1.unsqueeze(-1))
        cells.scatter_add_(-1, index[1], grad_g2.unsqueeze(-1))
        return _uncells(cells)

    def _on_mode_change(self) -> None:
        if not self.training:
            self._index = None


def unclipped_weight(g1_y: Tensor, radius: int = 2, levels: tuple[float, ...] = (1.0,)) -> Tensor:
    """1 where no pixel of g1(y) within `radius` (same channel) sits at a clip level, else 0.

    A photo stores min(1, x + noise): where the clean value x is within a few noise deviations
    of white, the stored pixel's mean is below x, and a target drawn there (g2(y)) would teach
    the network that clipped mean. The sub-sample g1(y) shows where that happens (its own
    pixels reach the clip level there) and its noise is independent of g2(y)'s, so weighting
    the loss by this mask leaves out those targets without biasing the others: how often the
    neighbourhood clips measures the distance to white in units of the local noise. Only
    white by default: a sensor saturates there, while at black a shot-noise photo's zeros are
    true values (a photon count of 0), not a clipped mean. Exact levels only: float data with
    unclipped noise keeps every pixel.

    Shape: g1_y (N, C, h, w) -> (N, C, h, w), same dtype, values 0 or 1.
    """
    clipped = torch.zeros_like(g1_y, dtype=torch.bool)
    for level in levels:
        clipped |= g1_y == level
    clipped = clipped.to(g1_y.dtype)
    n, c, h, w = clipped.shape
    padded = clipped.new_zeros(n, c, h + 2 * radius, w + 2 * radius)
    padded[:, :, radius:radius + h, radius:radius + w] = clipped
    rows = padded[:, :, :, 0:w].clone()  # the window's max, one axis at a time
    for dx in range(1, 2 * radius + 1):
        torch.maximum(rows, padded[:, :, :, dx:dx + w], out=rows)
    near = rows[:, :, 0:h].clone()
    for dy in range(1, 2 * radius + 1):
        torch.maximum(near, rows[:, :, dy:dy + h], out=near)
    return 1.0 - near


class NeighborLoss(Module):
    """The Neighbor2Neighbor loss of the network's output on g1(y) (see the module docstring).

    forward(pred, g2_y, g1_fy, g2_fy, gamma, weight=None) -> 0-d loss; backward() -> d loss / d pred.
    Only `pred` carries a gradient: g2(y) is data and f(y) was computed without one. `weight`
    (e.g. `unclipped_weight`'s 0/1) multiplies every element's two differences; the means stay over
    all elements, so a batch split into shards gives the same sum of gradients.

    Shape:
        pred, g2_y, g1_fy, g2_fy, weight: (N, C, H/2, W/2), all the same.
    """

    def __init__(self):
        super().__init__()
        self._diff = self._gap = self._weight = None
        self._gamma = 0.0

    def forward(self, pred: Tensor, g2_y: Tensor, g1_fy: Tensor, g2_fy: Tensor, gamma: float,
                weight: Tensor | None = None) -> Tensor:
        if not (pred.shape == g2_y.shape == g1_fy.shape == g2_fy.shape):
            raise ValueError(f"NeighborLoss: shapes differ: {tuple(pred.shape)}, {tuple(g2_y.shape)}, "
                             f"{tuple(g1_fy.shape)}, {tuple(g2_fy.shape)}")
        if not gamma >= 0:
            raise ValueError(f"NeighborLoss: gamma must be >= 0, got {gamma!r}")
        if pred.numel() == 0:
            raise ValueError(f"NeighborLoss: empty input (shape {tuple(pred.shape)}); the mean is undefined")
        if weight is not None and weight.shape != pred.shape:
            raise ValueError(f"NeighborLoss: weight {tuple(weight.shape)} is not the shape of pred {tuple(pred.shape)}")
        diff = pred - g2_y                # what the network gets wrong against the other sub-sample
        gap = diff - (g1_fy - g2_fy)      # ... beyond the difference the denoised image shows there
        if weight is not None:            # left-out elements count in the means as zeros
            diff, gap = diff * weight, gap * weight
        if self.training:
            self._diff, self._gap, self._gamma, self._weight = diff, gap, float(gamma), weight
        return (diff * diff).mean() + gamma * (gap * gap).mean()

    def backward(self, grad_output=None) -> Tensor:
        diff = self._saved(self._diff, "the differences")
        grad = (diff + self._gamma * self._gap) * (2.0 / diff.numel())
        if self._weight is not None:  # d/d pred of (w diff)^2 and (w gap)^2
            grad = grad * self._weight
        return grad if grad_output is None else grad * grad_output

    def _on_mode_change(self) -> None:
        if not self.training:
            self._diff = self._gap = self._weight = None
