"""Neighbor2Neighbor's sub-sampler and loss (n2n_core.neighbor) against a direct reading of the paper and
against torch autograd in float64, on a grid of shapes."""
import itertools

import pytest
import torch

from n2n_core.neighbor import PAIRS, NeighborLoss, NeighborSubsampler, draw_pairs, unclipped_weight

SHAPES = [(1, 1, 2, 2), (2, 3, 4, 6), (3, 3, 8, 8), (1, 2, 10, 4)]


def _generators(n, seed=0):
    return [torch.Generator().manual_seed(seed + i) for i in range(n)]


def _by_loops(x, pairs):
    """The sub-samples written out cell by cell: g[.., i, j] = x at the pair's pixel of cell (i, j)."""
    n, c, h, w = x.shape
    g1, g2 = x.new_empty(n, c, h // 2, w // 2), x.new_empty(n, c, h // 2, w // 2)
    for b, i, j in itertools.product(range(n), range(h // 2), range(w // 2)):
        a, z = PAIRS[int(pairs[b, i, j])]
        g1[b, :, i, j] = x[b, :, 2 * i + a // 2, 2 * j + a % 2]
        g2[b, :, i, j] = x[b, :, 2 * i + z // 2, 2 * j + z % 2]
    return g1, g2


@pytest.mark.parametrize("shape", SHAPES)
def test_subsamples_are_the_chosen_neighbours(shape):
    n, c, h, w = shape
    x = torch.randn(shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    pairs = draw_pairs(_generators(n), h, w)
    g1, g2 = NeighborSubsampler()(x, pairs)
    e1, e2 = _by_loops(x, pairs)
    assert torch.equal(g1, e1) and torch.equal(g2, e2)


def test_the_pairs_are_adjacent_and_the_eight_are_drawn_evenly():
    assert sorted(PAIRS) == sorted({(a, b) for a in range(4) for b in range(4)
                                    if a != b and (a // 2 == b // 2 or a % 2 == b % 2)})  # same row or column
    pairs = draw_pairs(_generators(4), 200, 200)  # 40,000 cells
    counts = torch.bincount(pairs.flatten(), minlength=8).double()
    expected = pairs.numel() / 8
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    assert chi2 < 24.3, f"the 8 pairs are not drawn evenly: {counts.tolist()} (chi2 {chi2:.1f}, 7 dof, p=0.001)"
    again = draw_pairs(_generators(4), 200, 200)
    assert torch.equal(pairs, again), "the same generators must draw the same pairs"
    # the channels of a pixel share its cell's pair: sub-sampling a grey image replicated to RGB stays grey
    grey = torch.rand(4, 1, 200, 200).expand(4, 3, 200, 200)
    g1, _ = NeighborSubsampler()(grey, pairs)
    assert torch.equal(g1[:, 0], g1[:, 1]) and torch.equal(g1[:, 1], g1[:, 2])


def test_independent_noise_stays_independent_and_the_means_agree():
    """On pure noise the two sub-samples are uncorrelated and both keep its variance (the method's premise)."""
    noise = torch.randn(8, 3, 64, 64, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    g1, g2 = NeighborSubsampler()(noise, draw_pairs(_generators(8), 64, 64))
    corr = float(torch.corrcoef(torch.stack([g1.flatten(), g2.flatten()]))[0, 1])
    assert abs(corr) < 0.02, corr
    assert abs(float(g1.var()) - 1) < 0.03 and abs(float(g2.var()) - 1) < 0.03


@pytest.mark.parametrize("shape", SHAPES)
def test_subsampler_backward_matches_autograd(shape):
    n, c, h, w = shape
    g = torch.Generator().manual_seed(2)
    x = torch.randn(shape, dtype=torch.float64, generator=g)
    pairs = draw_pairs(_generators(n, 7), h, w)
    grad1 = torch.randn(n, c, h // 2, w // 2, dtype=torch.float64, generator=g)
    grad2 = torch.randn(n, c, h // 2, w // 2, dtype=torch.float64, generator=g)
    sub = NeighborSubsampler()
    sub(x, pairs)
    ours = sub.backward(grad1, grad2)
    ref = x.clone().requires_grad_(True)
    e1, e2 = _by_loops(ref, pairs)
    ((e1 * grad1).sum() + (e2 * grad2).sum()).backward()
    torch.testing.assert_close(ours, ref.grad, rtol=0, atol=0)


@pytest.mark.parametrize("shape", [(1, 1, 1, 1), (2, 3, 4, 5), (4, 3, 16, 16)])
@pytest.mark.parametrize("gamma", [0.0, 0.7, 2.0])
def test_loss_and_its_gradient_match_autograd(shape, gamma):
    g = torch.Generator().manual_seed(3)
    pred, g2y, g1fy, g2fy = (torch.randn(shape, dtype=torch.float64, generator=g) for _ in range(4))
    loss_fn = NeighborLoss()
    ours = loss_fn(pred, g2y, g1fy, g2fy, gamma)
    ref_pred = pred.clone().requires_grad_(True)
    diff = ref_pred - g2y
    ref = torch.mean(diff ** 2) + gamma * torch.mean((diff - (g1fy - g2fy)) ** 2)  # the authors' code
    ref.backward()
    torch.testing.assert_close(ours, ref.detach(), rtol=1e-14, atol=0)
    torch.testing.assert_close(loss_fn.backward(), ref_pred.grad, rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(loss_fn.backward(torch.tensor(3.0, dtype=torch.float64)), 3 * ref_pred.grad,
                               rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("shape", [(1, 1, 1, 1), (2, 3, 4, 5), (4, 3, 16, 16)])
@pytest.mark.parametrize("gamma", [0.0, 2.0])
@pytest.mark.parametrize("weights", ["binary", "real"])
def test_weighted_loss_and_its_gradient_match_autograd(shape, gamma, weights):
    g = torch.Generator().manual_seed(4)
    pred, g2y, g1fy, g2fy = (torch.randn(shape, dtype=torch.float64, generator=g) for _ in range(4))
    w = torch.rand(shape, dtype=torch.float64, generator=g)
    w = (w > 0.4).to(w.dtype) if weights == "binary" else w
    loss_fn = NeighborLoss()
    ours = loss_fn(pred, g2y, g1fy, g2fy, gamma, w)
    ref_pred = pred.clone().requires_grad_(True)
    diff = ref_pred - g2y
    ref = torch.mean((w * diff) ** 2) + gamma * torch.mean((w * (diff - (g1fy - g2fy))) ** 2)
    ref.backward()
    torch.testing.assert_close(ours, ref.detach(), rtol=1e-13, atol=0)
    torch.testing.assert_close(loss_fn.backward(), ref_pred.grad, rtol=1e-12, atol=1e-15)


def test_a_weight_of_ones_is_the_plain_loss_and_a_weight_of_zeros_learns_nothing():
    g = torch.Generator().manual_seed(5)
    pred, g2y, g1fy, g2fy = (torch.randn(2, 3, 6, 6, dtype=torch.float64, generator=g) for _ in range(4))
    plain, weighted = NeighborLoss(), NeighborLoss()
    torch.testing.assert_close(weighted(pred, g2y, g1fy, g2fy, 2.0, torch.ones_like(pred)),
                               plain(pred, g2y, g1fy, g2fy, 2.0), rtol=0, atol=0)
    torch.testing.assert_close(weighted.backward(), plain.backward(), rtol=0, atol=0)
    assert float(weighted(pred, g2y, g1fy, g2fy, 2.0, torch.zeros_like(pred))) == 0.0
    assert not weighted.backward().any()


def _unclipped_by_loops(x, radius, levels):
    n, c, h, w = x.shape
    out = torch.ones_like(x)
    for i, k, r, s in itertools.product(range(n), range(c), range(h), range(w)):
        window = x[i, k, max(0, r - radius):r + radius + 1, max(0, s - radius):s + radius + 1]
        if any((window == level).any() for level in levels):
            out[i, k, r, s] = 0
    return out


@pytest.mark.parametrize("radius", [0, 1, 2])
@pytest.mark.parametrize("levels", [(1.0,), (0.0, 1.0)])
def test_unclipped_weight_leaves_out_each_channels_neighbourhood_of_the_clip_levels(radius, levels):
    g = torch.Generator().manual_seed(6)
    x = torch.rand(2, 3, 9, 11, dtype=torch.float64, generator=g)
    x[x < 0.05] = 0.0  # clipped at black and at white, each channel on its own
    x[x > 0.95] = 1.0
    x[1, 1] = 0.5      # a channel without clipping keeps everything
    expected = _unclipped_by_loops(x, radius, levels)
    assert torch.equal(unclipped_weight(x, radius, levels), expected)
    assert expected[1, 1].all() and not expected.all()


def test_unclipped_weight_keeps_unclipped_float_noise_whole():
    g = torch.Generator().manual_seed(7)
    noisy = torch.rand(2, 3, 16, 16, generator=g) + 0.3 * torch.randn(2, 3, 16, 16, generator=g)  # beyond 0..1
    assert unclipped_weight(noisy).all()
    assert not unclipped_weight(noisy.clamp(0, 1)).all()
    assert unclipped_weight(noisy.clamp(0, None)).all()  # black is not a clip level unless asked


def test_bad_inputs_are_named():
    with pytest.raises(ValueError, match="even height and width"):
        draw_pairs(_generators(1), 5, 4)
    with pytest.raises(ValueError, match="needs pairs of shape"):
        NeighborSubsampler()(torch.zeros(1, 3, 4, 4), torch.zeros(1, 3, 2, dtype=torch.int64))
    with pytest.raises(ValueError, match="shapes differ"):
        NeighborLoss()(torch.zeros(1, 3, 2, 2), torch.zeros(1, 3, 2, 2), torch.zeros(1, 3, 2, 2),
                       torch.zeros(1, 3, 2, 1), 1.0)
    with pytest.raises(RuntimeError, match="without a training-mode forward"):
        NeighborLoss().backward()
    with pytest.raises(ValueError, match="weight .* is not the shape of pred"):
        NeighborLoss()(*(torch.zeros(1, 3, 2, 2) for _ in range(4)), 1.0, torch.ones(1, 1, 2, 2))
