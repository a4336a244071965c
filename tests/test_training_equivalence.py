"""Training equivalence: n2n models and their torch.nn twins, same initial weights and
the same batches, trained with SGD in float64, have the same loss curves (1e-8 relative).

The default suite runs 100 steps on small versions (a few seconds); the paper-sized
U-Net (depth 5, width 48) is marked slow.
"""
import pytest
import torch


from pipeline.export.torch_twins import torch_twin
from n2n_core import SGD, MSELoss, build_model

CASES = {  # architecture, its arguments, SGD lr (momentum 0.9; seed's sigmoid output needs a larger step)
    "unet": ("unet", dict(depth=2, width=6), 0.02),
    "seed": ("seed", dict(width=8), 0.3),
    "unet-paper": ("unet", dict(depth=5, width=48), 0.01),
    "seed-paper": ("seed", dict(), 0.3),
}


def _batches(step, shape):
    g = torch.Generator().manual_seed(10_000 + step)
    n, c, h, w = shape
    coarse = torch.rand(n, c, h // 4, w // 4, generator=g, dtype=torch.float64)
    clean = torch.nn.functional.interpolate(coarse, size=(h, w), mode="bilinear", align_corners=False)  # smooth
    noisy_in = clean + 0.1 * torch.randn(shape, generator=g, dtype=torch.float64)
    noisy_target = clean + 0.1 * torch.randn(shape, generator=g, dtype=torch.float64)
    return noisy_in, noisy_target


def _curves(case, steps, momentum=0.9, shape=(4, 3, 16, 16)):
    name, kwargs, lr = CASES[case]
    model = build_model(name, generator=torch.Generator().manual_seed(0), dtype=torch.float64, **kwargs)
    twin = torch_twin(model)
    opt = SGD(model.parameters(), lr=lr, momentum=momentum)
    ref = torch.optim.SGD(twin.parameters(), lr=lr, momentum=momentum)
    loss_fn, ref_loss_fn = MSELoss(), torch.nn.MSELoss()
    ours, theirs = [], []
    for step in range(steps):
        x, y = _batches(step, shape)
        opt.zero_grad()
        loss = loss_fn(model(x), y)
        model.backward(loss_fn.backward())
        opt.step()
        ours.append(loss.item())

        ref.zero_grad()
        ref_loss = ref_loss_fn(twin(x), y)
        ref_loss.backward()
        ref.step()
        theirs.append(ref_loss.item())
    return torch.tensor(ours, dtype=torch.float64), torch.tensor(theirs, dtype=torch.float64), model, twin


def _check(name, steps, shape=(4, 3, 16, 16)):
    ours, theirs, model, twin = _curves(name, steps, shape=shape)
    torch.testing.assert_close(ours, theirs, rtol=1e-8, atol=0, msg=lambda m: f"{name} loss curves: {m}")
    assert torch.isfinite(ours).all() and ours[-10:].mean() < ours[0], f"{name} did not learn: {ours.tolist()}"
    twin_params = dict(twin.named_parameters())
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.data, twin_params[n].detach(), rtol=1e-7, atol=1e-10)


@pytest.mark.parametrize("name", ["unet", "seed"])
def test_training_equivalence_100_steps(name):
    _check(name, 100)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["unet-paper", "seed-paper"])
def test_training_equivalence_paper_sizes(name):
    _check(name, 100, shape=(1, 3, 32, 32))
