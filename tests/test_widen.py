"""`widen_unet`: a wider U-Net that computes exactly what the narrow one did (Net2WiderNet)."""
import pytest
import torch

from n2n_core import MSELoss, build_model, widen_unet


def _trained_looking(generator_seed: int, **kwargs):
    """A U-Net whose biases and weights are all non-zero, as after training (init zeroes the biases)."""
    model = build_model("unet", generator=torch.Generator().manual_seed(generator_seed), dtype=torch.float64,
                        **kwargs)
    noise = torch.Generator().manual_seed(generator_seed + 1)
    for p in model.parameters():
        p.data.add_(0.05 * torch.randn(p.shape, generator=noise, dtype=torch.float64))
    return model


GRID = [  # (depth, old width, new width, residual, in_channels, out_channels)
    (1, 3, 5, False, 3, 3),
    (2, 4, 9, True, 3, 3),
    (3, 8, 11, False, 1, 2),
    (4, 6, 6, True, 3, 3),  # the same width: a copy
    (4, 32, 44, True, 3, 3),  # the default model's shape, widened as its successor was trained
]


@pytest.mark.parametrize("depth, old, new, residual, cin, cout", GRID)
def test_widened_unet_has_the_same_output(depth, old, new, residual, cin, cout):
    narrow = _trained_looking(depth + old, depth=depth, width=old, residual=residual, in_channels=cin,
                              out_channels=cout)
    wide = widen_unet(narrow, new, seed=5)
    assert wide.config.kwargs == dict(narrow.config.kwargs, width=new)
    expected = build_model("unet", dtype=torch.float64, **wide.config.kwargs).state_dict()
    assert {k: v.shape for k, v in wide.state_dict().items()} == {k: v.shape for k, v in expected.items()}
    m = 2**depth
    x = torch.rand((2, cin, 2 * m, 3 * m), generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    before, after = narrow.forward(x), wide.forward(x)
    assert before.abs().max() > 0.1  # a network whose output is not trivially zero
    torch.testing.assert_close(after, before, rtol=0, atol=1e-12)
    # the first units are the narrow model's own, in order (enc_conv0 reads the image, which is never copied)
    torch.testing.assert_close(wide.state_dict()["enc_conv0.weight"][:old], narrow.state_dict()["enc_conv0.weight"])


def test_copies_get_different_gradients_so_they_part_ways():
    narrow = _trained_looking(7, depth=2, width=4, residual=True)
    wide = widen_unet(narrow, 8, seed=1)
    # enc_conv0 reads the image, which is never copied, so a copy's incoming weights equal its original's
    # (deeper layers read copied units with random shares: same function, other numbers)
    weight = wide.state_dict()["enc_conv0.weight"]  # (8, 3, 3, 3): units 4..7 copy units of 0..3
    bias = wide.state_dict()["enc_conv0.bias"]
    pairs = [(j, u) for j in range(4, 8) for u in range(4)
             if torch.equal(weight[j], weight[u]) and bias[j] == bias[u]]
    assert len(pairs) == 4, "each extra unit copies one original's incoming weights and bias"
    x = torch.rand((2, 3, 16, 16), generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    y = torch.rand((2, 3, 16, 16), generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    loss = MSELoss()
    loss.forward(wide.forward(x), y)
    wide.zero_grad()
    wide.backward(loss.backward())
    grad = dict(wide.named_parameters())["enc_conv0.weight"].grad
    for j, u in pairs:
        # with shares split evenly (or in proportion) the two gradients would be parallel to rounding (1e-16),
        # and Adam, which divides out a gradient's scale, would then move both copies alike for ever
        gj, gu = grad[j].flatten(), grad[u].flatten()
        off_parallel = (gj - (gj @ gu) / (gu @ gu) * gu).norm() / gj.norm()
        assert off_parallel > 1e-3, f"unit {j} copies unit {u} and gets a gradient parallel to its own"


def test_widen_refuses_a_narrower_width_and_other_models():
    narrow = build_model("unet", depth=2, width=8)
    with pytest.raises(ValueError, match=r"new width must be an int >= the model's \(8\)"):
        widen_unet(narrow, 6)
    with pytest.raises(ValueError, match="needs a unet"):
        widen_unet(build_model("seed"), 64)


def test_widen_keeps_dtype_and_is_reproducible():
    narrow = build_model("unet", depth=2, width=4, generator=torch.Generator().manual_seed(0))
    a, b = widen_unet(narrow, 7, seed=3), widen_unet(narrow, 7, seed=3)
    assert all(torch.equal(a.state_dict()[k], b.state_dict()[k]) for k in a.state_dict())
    assert a.state_dict()["dec_conv1.weight"].dtype == torch.float32
