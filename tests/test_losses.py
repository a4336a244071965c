"""MSELoss and L1Loss against torch.nn's losses and autograd, in float64."""
import pytest
import torch

from n2n_core import L1Loss, MSELoss

SHAPES = [(1,), (7,), (2, 3), (4, 3, 5, 7), (2, 1, 1, 1), (3, 3, 8, 9)]
PAIRS = [(MSELoss, torch.nn.MSELoss), (L1Loss, torch.nn.L1Loss)]


@pytest.mark.parametrize("ours, theirs", PAIRS, ids=["mse", "l1"])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_forward_and_grad_match_torch(ours, theirs, shape):
    pred = torch.randn(shape, dtype=torch.float64)
    target = torch.randn(shape, dtype=torch.float64)
    loss = ours()
    value = loss(pred, target)
    grad = loss.backward()

    p = pred.clone().requires_grad_(True)
    ref = theirs()(p, target)
    ref.backward()
    assert value.shape == ref.shape == ()
    torch.testing.assert_close(value, ref.detach(), rtol=1e-10, atol=0)
    torch.testing.assert_close(grad, p.grad, rtol=1e-10, atol=0)


@pytest.mark.parametrize("ours, theirs", PAIRS, ids=["mse", "l1"])
def test_grad_output_scales_gradient(ours, theirs):
    pred = torch.randn(3, 4, dtype=torch.float64)
    target = torch.randn(3, 4, dtype=torch.float64)
    loss = ours()
    loss(pred, target)
    grad = loss.backward(torch.tensor(2.5, dtype=torch.float64))
    p = pred.clone().requires_grad_(True)
    (theirs()(p, target) * 2.5).backward()
    torch.testing.assert_close(grad, p.grad, rtol=1e-10, atol=0)


def test_l1_gradient_at_zero_is_zero_like_torch():
    pred = torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=torch.float64)
    target = torch.tensor([1.0, 1.0, 3.0, 5.0], dtype=torch.float64)
    loss = L1Loss()
    loss(pred, target)
    grad = loss.backward()
    p = pred.clone().requires_grad_(True)
    torch.nn.L1Loss()(p, target).backward()
    assert grad[0] == 0 and grad[2] == 0
    torch.testing.assert_close(grad, p.grad, rtol=0, atol=0)


def test_mse_gradient_sign_points_uphill():
    # The course report's bug: 2(Y - Y_hat) has the wrong sign. A small step against
    # our gradient must lower the loss.
    pred = torch.randn(2, 3, 4, 4, dtype=torch.float64)
    target = torch.randn(2, 3, 4, 4, dtype=torch.float64)
    loss = MSELoss()
    before = loss(pred, target)
    after = loss(pred - 0.1 * loss.backward(), target)
    assert after < before


@pytest.mark.parametrize("cls", [MSELoss, L1Loss])
def test_errors(cls):
    loss = cls()
    with pytest.raises(ValueError, match="shape"):
        loss(torch.zeros(2, 3), torch.zeros(3, 2))
    loss.eval()
    loss(torch.zeros(2), torch.ones(2))
    with pytest.raises(RuntimeError, match="training-mode forward"):
        loss.backward()
