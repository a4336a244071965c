"""The Module / Parameter contract: registration, state dicts, modes, devices."""
import pytest
import torch

from n2n_core import Module, Parameter, Sequential


class Scale(Module):
    """y = w * x with one scalar weight, for contract tests."""

    def __init__(self, value=2.0):
        super().__init__()
        self.weight = Parameter(torch.tensor([value], dtype=torch.float64))
        self._x = None

    def forward(self, x):
        self._x = x if self.training else None
        return x * self.weight.data

    def backward(self, grad_output):
        x = self._saved(self._x)
        self.weight.grad += (grad_output * x).sum().reshape(1)
        return grad_output * self.weight.data


def test_registration_order_and_dotted_keys():
    model = Sequential(Scale(1.0), Sequential(Scale(2.0), Scale(3.0)))
    assert list(model.state_dict()) == ["0.weight", "1.0.weight", "1.1.weight"]
    assert [p.data.item() for p in model.parameters()] == [1.0, 2.0, 3.0]
    assert model.num_parameters() == 3


def test_backward_accumulates_until_zero_grad():
    layer = Scale(3.0)
    x = torch.tensor([1.0, 2.0], dtype=torch.float64)
    for _ in range(2):
        layer(x)
        layer.backward(torch.ones(2, dtype=torch.float64))
    assert layer.weight.grad.item() == pytest.approx(6.0)
    layer.zero_grad()
    assert layer.weight.grad.item() == 0.0
    assert layer.weight.data.item() == 3.0


def test_sequential_backward_is_reverse_chain_rule():
    model = Sequential(Scale(2.0), Scale(5.0))
    x = torch.tensor([1.0, -1.0], dtype=torch.float64)
    y = model(x)
    assert torch.equal(y, x * 10)
    grad_x = model.backward(torch.ones(2, dtype=torch.float64))
    assert torch.equal(grad_x, torch.full((2,), 10.0, dtype=torch.float64))
    assert model[0].weight.grad.item() == pytest.approx(5.0 * 0.0)  # sum(1*5*x) = 5*(1-1)


def test_load_state_dict_strict_reports_keys_and_shapes():
    model = Sequential(Scale(1.0), Scale(1.0))
    with pytest.raises(KeyError, match=r"missing keys \['1.weight'\].*unexpected keys \['2.weight'\]"):
        model.load_state_dict({"0.weight": torch.ones(1), "2.weight": torch.ones(1)})
    with pytest.raises(ValueError, match=r"'0.weight' has shape \(2,\).*expects \(1,\)"):
        model.load_state_dict({"0.weight": torch.ones(2), "1.weight": torch.ones(1)})
    missing, unexpected = model.load_state_dict({"0.weight": torch.full((1,), 7.0)}, strict=False)
    assert missing == ["1.weight"] and unexpected == []
    assert model[0].weight.data.item() == 7.0


def test_eval_mode_keeps_nothing_for_backward():
    model = Sequential(Scale(2.0)).eval()
    assert not model[0].training
    model(torch.ones(1, dtype=torch.float64))
    with pytest.raises(RuntimeError, match="training-mode forward"):
        model.backward(torch.ones(1, dtype=torch.float64))
    assert model.train() is model and model[0].training


def test_to_moves_data_and_grad_together():
    model = Sequential(Scale(2.0)).to(dtype=torch.float32)
    p = model.parameters()[0]
    assert p.data.dtype == torch.float32 and p.grad.dtype == torch.float32


def test_sequential_rejects_non_modules():
    with pytest.raises(TypeError, match="item 1"):
        Sequential(Scale(), lambda x: x)


def test_post_accumulate_hooks_run_once_each_gradient_is_added():
    """Each parameter's hooks run after its layer added the pass's gradient, in backward order,
    with the gradient already in place (what a data-parallel worker sends a bucket on)."""
    from n2n_core import Conv2d, ReLU

    g = torch.Generator().manual_seed(0)
    model = Sequential(Conv2d(3, 4, 3, padding=1, generator=g), ReLU(), Conv2d(4, 2, 3, padding=1, generator=g))
    names = {id(p): name for name, p in model.named_parameters()}
    seen = []

    def hook(param):
        seen.append((names[id(param)], float(param.grad.abs().sum())))

    handles = [p.register_post_accumulate_grad_hook(hook) for p in model.parameters()]
    x = torch.randn(2, 3, 8, 8, generator=g)
    model(x)
    model.backward(torch.ones(2, 2, 8, 8))
    assert [name for name, _ in seen] == ["2.weight", "2.bias", "0.weight", "0.bias"]
    assert all(total > 0 for _, total in seen), "a hook ran before its gradient was added"
    handles[0].remove()
    seen.clear()
    model(x)
    model.backward(torch.ones(2, 2, 8, 8))
    assert [name for name, _ in seen] == ["2.weight", "2.bias", "0.bias"]
    with pytest.raises(TypeError, match="must be callable"):
        model.parameters()[0].register_post_accumulate_grad_hook(None)
