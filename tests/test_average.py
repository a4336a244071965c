"""Weight averaging ("model soups"): the weighted mean in n2n_core, and `n2n average` on files."""
import os

import pytest
import torch
from click.testing import CliRunner

from n2n_core import Adam, average_models, build_model, load_checkpoint, save_checkpoint
from n2n_core.average import normalized_weights
from pipeline.cli import main


def _model(seed: int, dtype=torch.float64, **kwargs):
    kwargs = {"depth": 2, "width": 4, "residual": True, **kwargs}
    model = build_model("unet", generator=torch.Generator().manual_seed(seed), dtype=dtype, **kwargs)
    noise = torch.Generator().manual_seed(seed + 100)
    for p in model.parameters():  # non-zero biases too, as after training
        p.data.add_(0.1 * torch.randn(p.shape, generator=noise, dtype=dtype))
    return model


@pytest.mark.parametrize("weights, shares", [(None, (0.5, 0.5)), ((1, 3), (0.25, 0.75)), ((0.2, 0.0), (1.0, 0.0))])
def test_average_is_the_weighted_mean_of_every_tensor(weights, shares):
    a, b = _model(1), _model(2)
    mean = average_models([a, b], weights)
    assert mean.config == a.config and mean is not a and mean is not b
    state_a, state_b = a.state_dict(), b.state_dict()
    for key, value in mean.state_dict().items():
        assert not torch.equal(state_a[key], state_b[key]), key  # the test compares different models
        torch.testing.assert_close(value, shares[0] * state_a[key] + shares[1] * state_b[key], rtol=0, atol=1e-15)
    x = torch.rand((1, 3, 8, 8), generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    torch.testing.assert_close(average_models([a, a, a], (1, 2, 5)).forward(x), a.forward(x), rtol=0, atol=1e-12)


def test_float32_weights_are_summed_in_float64():
    a, b = _model(1, torch.float32), _model(2, torch.float32)
    mean = average_models([a, b], (1, 2))
    assert next(iter(mean.state_dict().values())).dtype == torch.float32
    differs = False
    for key, value in mean.state_dict().items():
        exact = (1 / 3) * a.state_dict()[key].double() + (2 / 3) * b.state_dict()[key].double()
        assert torch.equal(value, exact.float()), key
        single = (1 / 3) * a.state_dict()[key] + (2 / 3) * b.state_dict()[key]  # float32 arithmetic
        differs = differs or not torch.equal(single, value)
    assert differs, "float32 arithmetic gave the same numbers: the test cannot tell the two apart"


@pytest.mark.parametrize("weights, words", [((1,), "1 weights for 2 models"), ((1, -1), ">= 0"),
                                            ((0, 0), "not all be 0"), ((1, float("nan")), "finite")])
def test_bad_weights_are_refused(weights, words):
    with pytest.raises(ValueError, match=words):
        average_models([_model(1), _model(2)], weights)


def test_models_of_other_architectures_or_one_model_are_refused():
    with pytest.raises(ValueError, match="model 1 is unet .*width.: 6"):
        average_models([_model(1), _model(2, width=6)])
    with pytest.raises(ValueError, match="at least 2"):
        average_models([_model(1)])


# -- the command -------------------------------------------------------------------------
def _training_checkpoint(path, seed: int, step: int, **kwargs):
    model = _model(seed, torch.float32, **kwargs)
    optimizer = Adam(model.parameters())
    for p in model.parameters():
        p.grad.normal_()
    optimizer.step()
    save_checkpoint(path, model, optimizer, step=step, config={"noise": f"gaussian:{seed}"})
    return model


def test_average_command_writes_the_mean_model_and_where_it_came_from(tmp_path):
    a = _training_checkpoint(tmp_path / "a.n2n", 1, step=6500)
    b = _training_checkpoint(tmp_path / "b.n2n", 2, step=8000)
    out = tmp_path / "soups" / "mean.n2n"
    result = CliRunner().invoke(main, ["average", str(tmp_path / "a.n2n"), str(tmp_path / "b.n2n"),
                                       "--weights", "3,1", "--out", str(out)])
    assert result.exit_code == 0, result.output
    loaded = load_checkpoint(out)
    assert loaded.optimizer_state is None and loaded.step == 8000 and loaded.config is None
    assert loaded.extra == {"averaged_from": [
        {"file": "a.n2n", "step": 6500, "weight": 0.75, "config": {"noise": "gaussian:1"}},
        {"file": "b.n2n", "step": 8000, "weight": 0.25, "config": {"noise": "gaussian:2"}}]}
    expected = average_models([a, b], (3, 1)).state_dict()
    for key, value in loaded.model.state_dict().items():
        assert torch.equal(value, expected[key]), key
    assert sorted(os.listdir(out.parent)) == ["mean.n2n"]  # no temporary file left


def test_average_command_never_replaces_a_file_and_names_bad_input(tmp_path):
    _training_checkpoint(tmp_path / "a.n2n", 1, step=1)
    _training_checkpoint(tmp_path / "b.n2n", 2, step=2)
    _training_checkpoint(tmp_path / "wide.n2n", 3, step=3, width=6)
    (tmp_path / "broken.n2n").write_bytes(b"not a checkpoint")
    (tmp_path / "mine.n2n").write_bytes(b"the user's file")
    os.symlink(tmp_path / "mine.n2n", tmp_path / "link.n2n")
    os.symlink(tmp_path / "nowhere.n2n", tmp_path / "dangling.n2n")
    a, b = str(tmp_path / "a.n2n"), str(tmp_path / "b.n2n")
    runner = CliRunner()
    cases = [
        ([a, b, "--out", a], 2, "a.n2n: exists"),
        ([a, b, "--out", str(tmp_path / "mine.n2n")], 2, "mine.n2n: exists"),
        ([a, b, "--out", str(tmp_path / "link.n2n")], 2, "link.n2n: exists"),
        ([a, b, "--out", str(tmp_path / "dangling.n2n")], 2, "dangling.n2n: exists"),
        ([a, "--out", str(tmp_path / "new.n2n")], 2, "at least 2"),
        ([a, b, "--weights", "1", "--out", str(tmp_path / "new.n2n")], 2, "--weights: 1 weights for 2 models"),
        ([a, b, "--weights", "1,x", "--out", str(tmp_path / "new.n2n")], 2, "--weights"),
        ([a, str(tmp_path / "broken.n2n"), "--out", str(tmp_path / "new.n2n")], 2, "broken.n2n"),
        ([a, str(tmp_path / "missing.n2n"), "--out", str(tmp_path / "new.n2n")], 2, "missing.n2n"),
        ([a, str(tmp_path / "wide.n2n"), "--out", str(tmp_path / "new.n2n")], 2, "wide.n2n is unet"),
        ([a, b, "--out", "s3://bucket/mean.n2n"], 2, "local files only"),
        ([a, b, "--out", str(tmp_path / "mine.n2n" / "mean.n2n")], 2, "a folder on the way is a file"),
    ]
    for args, status, words in cases:
        result = runner.invoke(main, ["average", *args])
        assert result.exit_code == status, (args, result.output)
        assert words in result.output and "Traceback" not in result.output, (args, result.output)
        lines = [line for line in result.output.splitlines() if line.strip()]
        assert len(lines) <= 3 and lines[-1].startswith("Error: "), result.output  # one line (after click's usage hint)
    assert (tmp_path / "mine.n2n").read_bytes() == b"the user's file"
    assert not os.path.lexists(tmp_path / "nowhere.n2n") and not os.path.lexists(tmp_path / "new.n2n")
    assert not [name for name in os.listdir(tmp_path) if name.endswith(".tmp")]


def test_average_command_huge_weights_an_empty_out_and_other_architectures(tmp_path):
    """Issue 34, row 12: `--weights 1e308,1e308` said "weights must not all be 0"; `--out ''`
    averaged first and failed after; other architectures exited 1 instead of 2."""
    a = _training_checkpoint(tmp_path / "a.n2n", 1, step=1)
    b = _training_checkpoint(tmp_path / "b.n2n", 2, step=2)
    _training_checkpoint(tmp_path / "wide.n2n", 3, step=3, width=6)
    (tmp_path / "broken.n2n").write_bytes(b"not a checkpoint")
    runner = CliRunner()
    result = runner.invoke(main, ["average", str(tmp_path / "a.n2n"), str(tmp_path / "b.n2n"), "--weights",
                                  "1e308,1e308", "--out", str(tmp_path / "huge.n2n")])
    assert result.exit_code == 0, result.output
    expected = average_models([a, b]).state_dict()
    for key, value in load_checkpoint(tmp_path / "huge.n2n").model.state_dict().items():
        assert torch.equal(value, expected[key]), key
    assert normalized_weights((1e308, 1e308), 2) == [0.5, 0.5]
    for out in ("", str(tmp_path)):  # checked before any checkpoint is read: the broken one is not named
        result = runner.invoke(main, ["average", str(tmp_path / "a.n2n"), str(tmp_path / "broken.n2n"), "--out", out])
        assert result.exit_code == 2 and "--out" in result.output and "broken" not in result.output, result.output
    result = runner.invoke(main, ["average", str(tmp_path / "a.n2n"), str(tmp_path / "wide.n2n"),
                                  "--out", str(tmp_path / "new.n2n")])
    assert result.exit_code == 2 and "wide.n2n is unet" in result.output, result.output
    assert not (tmp_path / "new.n2n").exists()


def test_default_names_the_built_in_model(tmp_path):
    """`n2n average FINE_TUNE default`: the even mean of a fine-tune of the default and the default."""
    from pipeline.assets import default_model_path

    default = load_checkpoint(default_model_path()).model
    tuned = load_checkpoint(default_model_path()).model
    for p in tuned.parameters():
        p.data.add_(0.01)
    save_checkpoint(tmp_path / "tuned.n2n", tuned, step=7)
    out = tmp_path / "both.n2n"
    result = CliRunner().invoke(main, ["average", str(tmp_path / "tuned.n2n"), "default", "--out", str(out)])
    assert result.exit_code == 0, result.output
    loaded = load_checkpoint(out)
    assert [s["file"] for s in loaded.extra["averaged_from"]] == ["tuned.n2n", "default"]
    expected = average_models([tuned, default]).state_dict()
    for key, value in loaded.model.state_dict().items():
        assert torch.equal(value, expected[key]), key
