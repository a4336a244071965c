"""Training without Ray (`ray=False`, `n2n train --no-ray`) and the learning-rate ramp-down."""
import math
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from pipeline.training import TrainConfig, train
from pipeline.training.driver import list_checkpoints
from train_support import TINY_ARCH, assert_weights_close, images, reference_weights, tiny_config  # noqa: F401 (fixture)

ROOT = Path(__file__).resolve().parents[1]


def test_no_ray_equals_the_reference_and_never_imports_ray(images, tmp_path):
    # a fresh interpreter, so that `ray` in sys.modules can only come from this run
    script = textwrap.dedent(f"""
        import sys
        sys.path[:0] = [{str(ROOT)!r}, {str(ROOT / 'tests')!r}]
        import torch
        from pipeline.training import train
        from train_support import tiny_config
        result = train(tiny_config({str(images)!r}, {str(tmp_path / 'run')!r}, ray=False))
        assert "ray" not in sys.modules, "the no-Ray path imported ray"
        torch.save({{k: v for k, v in result.model.state_dict().items()}}, {str(tmp_path / 'w.pt')!r})
        print("workers", result.workers, "steps", result.steps, "device", result.placement[0]["device"])
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "workers 1 steps 20 device cpu" in done.stdout
    weights = torch.load(tmp_path / "w.pt")
    assert_weights_close(weights, reference_weights(tiny_config(images, tmp_path / "ref")), 1e-10, "no Ray")
    assert (tmp_path / "run" / "model.n2n").is_file() and (tmp_path / "run" / "training.png").is_file()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_no_ray_trains_on_the_gpu_like_the_cpu_reference(images, tmp_path):
    result = train(tiny_config(images, tmp_path / "run", ray=False, device="cuda"))
    assert result.placement[0]["device"] == "cuda:0"
    assert_weights_close(result.model.state_dict(), reference_weights(tiny_config(images, tmp_path / "ref")),
                         1e-8, "no Ray on CUDA")


def test_lr_ramp_down_schedule():
    config = TrainConfig(data="d", out="o", steps=100, lr=1e-3, lr_ramp_down=40)
    assert [config.lr_at(s) for s in (0, 30, 59)] == [1e-3] * 3
    assert config.lr_at(60) == pytest.approx(1e-3)  # k = 0: cos(0) = 1
    assert config.lr_at(80) == pytest.approx(0.5e-3)  # half way
    assert config.lr_at(99) == pytest.approx(1e-3 * 0.5 * (1 + math.cos(math.pi * 39 / 40)))
    rates = [config.lr_at(s) for s in range(60, 100)]
    assert all(a > b for a, b in zip(rates, rates[1:])) and 0 < rates[-1] < 1e-5
    assert TrainConfig(data="d", out="o", steps=10, lr=0.5).lr_at(9) == 0.5  # no ramp-down by default
    # longer than the run: the ramp-down covers all of it
    assert TrainConfig(data="d", out="o", steps=10, lr=1.0, lr_ramp_down=50).lr_at(5) == pytest.approx(0.5)


def test_ramp_down_run_equals_the_reference(images, tmp_path):
    config = tiny_config(images, tmp_path / "run", ray=False, lr_ramp_down=8)
    result = train(config)
    assert_weights_close(result.model.state_dict(), reference_weights(config), 1e-10, "ramp-down")
    # and it differs from the constant-rate run: the schedule was applied
    constant = reference_weights(tiny_config(images, tmp_path / "c"))
    diff = max(float((result.model.state_dict()[k] - constant[k]).abs().max()) for k in constant)
    assert diff > 1e-6


@pytest.mark.parametrize("changes, message", [({"ray": False, "workers": 2}, "workers"),
                                              ({"ray": False, "address": "auto"}, "needs Ray"),
                                              ({"lr_ramp_down": -1}, "lr_ramp_down")])
def test_bad_settings_are_named(changes, message):
    with pytest.raises(ValueError, match=message):
        TrainConfig(data="d", out="o", **changes)


@pytest.mark.slow
def test_a_run_switches_between_ray_and_no_ray_on_resume(images, tmp_path):
    out = tmp_path / "run"
    train(tiny_config(images, out, ray=False, steps=10))
    assert list_checkpoints(out)[-1][0] == 10
    from ray_support import private_ray  # imports ray: only here, so the rest runs where Ray is absent

    for _ in private_ray(num_cpus=2):
        result = train(tiny_config(images, out, workers=2, resume=True))
    assert result.steps == 20
    assert_weights_close(result.model.state_dict(), reference_weights(tiny_config(images, tmp_path / "ref")),
                         1e-10, "no Ray then Ray")


def test_resume_compares_noise_by_what_it_describes_not_its_spelling(images, tmp_path):
    from pipeline.data.noise import PRESETS

    out = tmp_path / "run"
    train(tiny_config(images, out, ray=False, steps=4, noise=PRESETS["photo"]))
    resumed = train(tiny_config(images, out, ray=False, steps=6, noise="photo", resume=True))  # the same noise
    assert resumed.steps == 6 and list_checkpoints(out)[-1][0] == 6
    with pytest.raises(ValueError, match="cannot resume with changed settings noise"):
        train(tiny_config(images, out, ray=False, steps=8, noise="gaussian:0-50", resume=True))


def test_init_from_starts_a_new_run_from_a_checkpoints_weights(images, tmp_path):
    first = train(tiny_config(images, tmp_path / "a", ray=False, steps=6))
    start = {k: v.clone() for k, v in first.model.state_dict().items()}
    tuned = train(tiny_config(images, tmp_path / "b", ray=False, steps=5, seed=9, noise="gaussian:0-50,8bit",
                              holdout=1, init_from=str(first.checkpoint)))
    expected = reference_weights(tiny_config(images, tmp_path / "ref", steps=5, seed=9, noise="gaussian:0-50,8bit",
                                             holdout=1), initial=start)
    assert_weights_close(tuned.model.state_dict(), expected, 1e-10, "init_from")
    assert tuned.steps == 5 and list_checkpoints(tmp_path / "b")[-1][0] == 5


def test_init_from_refuses_another_architecture(images, tmp_path):
    first = train(tiny_config(images, tmp_path / "a", ray=False, steps=2))
    with pytest.raises(ValueError, match="this run trains unet .*width.: 4"):
        train(tiny_config(images, tmp_path / "b", ray=False, steps=2, arch_args={"depth": 2, "width": 4},
                          init_from=str(first.checkpoint)))


def test_init_from_a_narrower_unet_widens_it_with_the_same_output(images, tmp_path):
    from n2n_core import load_checkpoint, widen_unet

    first = train(tiny_config(images, tmp_path / "a", ray=False, steps=3))
    seen = {}

    def first_step(step, model, placement):
        seen.setdefault("weights", {k: v.clone() for k, v in model.state_dict().items()})

    wide_args = dict(TINY_ARCH, width=TINY_ARCH["width"] + 5)
    train(tiny_config(images, tmp_path / "b", ray=False, steps=1, lr=1e-12, arch_args=wide_args, seed=4,
                      init_from=str(first.checkpoint)), on_step=first_step)
    narrow = load_checkpoint(first.checkpoint).model
    expected = widen_unet(narrow, wide_args["width"], seed=4).state_dict()  # the run's seed draws the copies
    for key, value in expected.items():
        assert torch.allclose(seen["weights"][key], value, rtol=0, atol=1e-9), key
    wide = load_checkpoint(tmp_path / "b" / "model.n2n").model
    x = torch.rand((1, 3, 8, 12), generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    torch.testing.assert_close(wide.forward(x), narrow.forward(x), rtol=0, atol=1e-9)  # one step of lr 1e-12


@pytest.mark.parametrize("arch_args", [dict(TINY_ARCH, depth=3), dict(TINY_ARCH, residual=True)])
def test_init_from_refuses_a_unet_that_differs_in_more_than_width(images, tmp_path, arch_args):
    first = train(tiny_config(images, tmp_path / "a", ray=False, steps=2))
    with pytest.raises(ValueError, match="or, for a unet, only a larger width"):
        train(tiny_config(images, tmp_path / "b", ray=False, steps=2, arch_args=dict(arch_args, width=12),
                          init_from=str(first.checkpoint)))


def test_init_from_default_starts_from_the_built_in_model(images, tmp_path):
    from n2n_core import load_checkpoint
    from pipeline.assets import default_model_path

    shipped = load_checkpoint(default_model_path())
    seen = {}

    def first_step(step, model, placement):
        seen.setdefault("weights", {k: v.clone() for k, v in model.state_dict().items()})

    config = tiny_config(images, tmp_path / "tuned", ray=False, steps=1, lr=1e-12, dtype="float32", crop_size=16,
                         batch_size=2, validation_images=1,
                         arch=shipped.model_config.name, arch_args=dict(shipped.model_config.kwargs),
                         init_from="default")
    train(config, on_step=first_step)
    for key, value in shipped.model.state_dict().items():  # Adam moves each weight by about lr: 1e-12
        assert torch.allclose(seen["weights"][key], value, rtol=0, atol=1e-9), key
        assert value.abs().max() > 0, key  # not a layer of zeros that any start would match
