"""n2n_core.workspace: large buffers kept and handed out again, never while a tensor can read them.

The models run under a workspace that pools every buffer (min_elements=1), so the small shapes
of these tests take the same reuse paths as a real step: gradients against autograd in
float64, training steps bit for bit against no workspace, outputs a caller keeps untouched.
"""
from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

from n2n_core import Adam, MSELoss, build_model, workspace
from n2n_core.layout import padded_interior
from n2n_core.workspace import Workspace
from pipeline.export.torch_twins import build_torch_model
from tests.test_architectures import CASES
from tests.torch_oracle import check_against_torch

LIKE = torch.empty(0)


def _pooled(**kwargs) -> Workspace:
    return Workspace(min_elements=1, **kwargs)


def test_a_free_buffer_is_handed_out_again():
    with _pooled() as ws:
        a = workspace.empty(LIKE, 4, 5)
        address = a.data_ptr()
        del a
        b = workspace.empty(LIKE, 4, 5)
        assert b.data_ptr() == address and b.shape == (4, 5) and b.is_contiguous()
        del b
        c = workspace.empty(LIKE, 3, 6)  # 18 of the buffer's 20 elements: best fit, another shape
        assert c.data_ptr() == address and c.shape == (3, 6)
    assert len(ws) == 1


@pytest.mark.parametrize("hold", ["tensor", "view", "transposed view", "numpy", "padded mark", "detached"])
def test_a_referenced_buffer_is_never_handed_out(hold):
    with _pooled():
        a = workspace.empty(LIKE, 1, 6, 6, 2)
        a.fill_(7.0)
        held = {
            "tensor": lambda: a,
            "view": lambda: a[:, 1:],
            "transposed view": lambda: a.permute(0, 3, 1, 2),
            "numpy": lambda: a.numpy(),
            "padded mark": lambda: padded_interior(a, (1, 1)),
            "detached": lambda: a.detach(),
        }[hold]()
        address = a.data_ptr()
        if hold != "tensor":
            del a
        b = workspace.empty(LIKE, 1, 6, 6, 2)
        assert b.data_ptr() != address
        b.fill_(-1.0)
        values = torch.as_tensor(np.asarray(held)) if hold == "numpy" else held
        assert bool((values == 7.0).all())


def test_best_fit_within_slack():
    with _pooled(slack=2.0) as ws:
        small, large = workspace.empty(LIKE, 100), workspace.empty(LIKE, 1000)
        small_at, large_at = small.data_ptr(), large.data_ptr()
        del small, large
        assert workspace.empty(LIKE, 90).data_ptr() == small_at  # the smallest that fits
        assert workspace.empty(LIKE, 600).data_ptr() == large_at  # 1000 <= 2 x 600
        fresh = workspace.empty(LIKE, 400)  # 1000 > 2 x 400, 100 < 400: a new buffer
        assert fresh.data_ptr() not in (small_at, large_at)
        assert len(ws) == 3


def test_idle_buffers_are_released_after_the_horizon():
    with _pooled(horizon=3, slack=2.0) as ws:
        workspace.empty(LIKE, 50)  # request 1, then free and idle
        held = [workspace.empty(LIKE, 10) for _ in range(2)]  # requests 2 and 3: misses, kept
        assert len(ws) == 3
        held.append(workspace.empty(LIKE, 10))  # a miss 3 requests after the 50's last: it goes
        assert sorted(b.tensor.numel() for b in ws._buffers) == [10] * 3
        assert ws.nbytes == 3 * 10 * 4


def test_plain_allocation_outside_a_workspace_and_for_small_buffers():
    ws = Workspace(min_elements=64)
    a = workspace.empty(LIKE, 100)  # no workspace entered
    with ws:
        b = workspace.empty(LIKE, 63)  # below min_elements
        c = workspace.empty(LIKE.double(), 64)
    assert a.shape == (100,) and b.shape == (63,) and c.dtype == torch.float64
    assert len(ws) == 1
    with pytest.raises(ValueError, match="min_elements"):
        Workspace(min_elements=0)


def test_dtype_is_part_of_the_fit():
    with _pooled() as ws:
        a = workspace.empty(LIKE, 10)
        del a
        b = workspace.empty(LIKE.double(), 10)
        assert b.dtype == torch.float64 and len(ws) == 2


def test_one_workspace_entered_by_two_threads_at_once():
    ws, inside, taken = _pooled(), threading.Barrier(2), threading.Barrier(2)
    errors = []

    def use():
        try:
            with ws:
                inside.wait(timeout=10)
                kept = workspace.empty(LIKE, 8)
                taken.wait(timeout=10)  # both hold theirs here
                assert workspace.current() is ws and kept.shape == (8,)
            assert workspace.current() is None
        except Exception as error:  # noqa: BLE001 - reported below
            errors.append(error)

    threads = [threading.Thread(target=use) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == [] and len(ws) == 2  # both buffers were held at once: two


def test_current_workspace_is_per_thread_and_nests():
    seen = []
    with _pooled() as ws:
        thread = threading.Thread(target=lambda: seen.append(workspace.current()))
        thread.start()
        thread.join()
        with _pooled() as inner:
            assert workspace.current() is inner
            with ws:
                assert workspace.current() is ws
            assert workspace.current() is inner
        assert workspace.current() is ws
    assert seen == [None] and workspace.current() is None


@pytest.mark.parametrize("name, kwargs, shape", CASES, ids=[f"{c[0]}-{c[1]}-{c[2]}" for c in CASES])
def test_gradients_match_autograd_with_every_buffer_pooled(name, kwargs, shape):
    model = build_model(name, generator=torch.Generator().manual_seed(1), dtype=torch.float64, **kwargs)
    twin = build_torch_model(name, dtype=torch.float64, **kwargs)
    with _pooled() as ws:
        for seed in (0, 1):  # the second pass runs on the first one's buffers
            x = torch.rand(shape, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
            twin.zero_grad(set_to_none=True)  # the oracle's twin accumulates across calls
            check_against_torch(model, twin, x, rtol=1e-10, atol=1e-12, seed=seed, label=f"{name} {kwargs}")
    assert ws.reused > 0


def _train(name, kwargs, steps: int, ws: Workspace | None):
    model = build_model(name, generator=torch.Generator().manual_seed(3), **kwargs)
    opt, loss = Adam(model.parameters(), lr=1e-3), MSELoss()
    g = torch.Generator().manual_seed(4)
    for _ in range(steps):
        x = torch.rand(2, 3, 16, 16, generator=g)
        with ws if ws is not None else _pooled():  # None: a new one each step
            opt.zero_grad()
            loss(model(x), (x + 0.1).clamp(0, 1))
            model.backward(loss.backward(), input_grad=False)
            opt.step()
    return model.state_dict()


@pytest.mark.parametrize("name, kwargs", [("unet", dict(depth=2, width=8, residual=True)), ("seed", dict(width=6))])
def test_training_is_bit_identical_under_a_workspace(name, kwargs):
    plain = build_model(name, generator=torch.Generator().manual_seed(3), **kwargs)
    opt, loss = Adam(plain.parameters(), lr=1e-3), MSELoss()
    g = torch.Generator().manual_seed(4)
    for _ in range(3):
        x = torch.rand(2, 3, 16, 16, generator=g)
        opt.zero_grad()
        loss(plain(x), (x + 0.1).clamp(0, 1))
        plain.backward(loss.backward(), input_grad=False)
        opt.step()
    ws = _pooled()
    for run in (ws, None):
        pooled = _train(name, kwargs, 3, run)
        for key, value in plain.state_dict().items():
            assert torch.equal(pooled[key], value), key
    assert ws.reused > 0


def test_outputs_a_caller_keeps_are_never_overwritten():
    model = build_model("unet", generator=torch.Generator().manual_seed(5), depth=2, width=8).eval()
    first, second = torch.rand(1, 3, 16, 16), torch.rand(1, 3, 16, 16)
    with _pooled():
        y1 = model(first)
        kept = y1.clone()
        y2 = model(second)
        assert torch.equal(y1, kept)
        assert not torch.equal(y2, kept)
        del y1, y2
        assert torch.equal(model(first), kept)  # the buffers came back, the result did not change
