"""Helpers of the training tests: tiny image folders, tiny configs, the in-process reference run.

The reference run is written out here on purpose (model, optimizer, loss and batches
built directly from n2n_core and pipeline.data.patches, one process, whole batch) so that
the Ray path is checked against something it does not share.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from n2n_core import Adam, MSELoss
from n2n_core.architectures import build_model
from pipeline.data.datasets import open_dataset
from pipeline.data.noise import parse_noise
from pipeline.data.patches import TrainingBatches
from pipeline.training import TrainConfig

TINY_ARCH = {"depth": 2, "width": 8}


def make_images(folder, count: int = 4, size: int = 24, seed: int = 0):
    """Write `count` smooth random RGB PNGs of size x size into `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(count):
        low = rng.random((4, 4, 3))
        img = np.kron(low, np.ones((size // 4, size // 4, 1)))[:size, :size]
        img = np.clip(img + 0.05 * rng.standard_normal(img.shape), 0, 1)
        Image.fromarray((img * 255).round().astype(np.uint8)).save(folder / f"img{i}.png")
    return folder


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """A module's training images: `make_images`' default folder (import it: `from train_support import images`)."""
    return make_images(tmp_path_factory.mktemp("images"))


def tiny_config(data, out, **changes) -> TrainConfig:
    values = dict(data=str(data), out=str(out), arch="unet", arch_args=dict(TINY_ARCH), noise="gaussian:25",
                  steps=20, batch_size=7, crop_size=8, lr=1e-2, dtype="float64", seed=3, checkpoint_every=5,
                  validate_every=10, validation_images=2, validation_size=16, progress=False, device="cpu")
    values.update(changes)
    return TrainConfig(**values)


def reference_weights(config: TrainConfig, steps: int | None = None, initial: dict | None = None
                      ) -> dict[str, torch.Tensor]:
    """Weights after `steps` steps of plain whole-batch training in this process (from `initial`
    weights when given, else the seed's initialization)."""
    model = build_model(config.arch, generator=torch.Generator().manual_seed(config.seed),
                        dtype=config.torch_dtype, **config.arch_args)
    if initial is not None:
        model.load_state_dict(initial)
    optimizer = Adam(model.parameters(), lr=config.lr)
    loss_fn = MSELoss()
    batches = TrainingBatches(open_dataset(config.data), parse_noise(config.noise), crop_size=config.crop_size,
                              batch_size=config.batch_size, seed=config.seed, target=config.target,
                              holdout=config.holdout)
    for step in range(config.steps if steps is None else steps):
        x, y = batches.batch(step)
        x, y = x.to(config.torch_dtype), y.to(config.torch_dtype)
        optimizer.lr = config.lr_at(step)
        model.zero_grad()
        loss_fn(model(x), y)
        model.backward(loss_fn.backward())
        optimizer.step()
    return {k: v.clone() for k, v in model.state_dict().items()}


def assert_weights_close(actual: dict, expected: dict, rtol: float = 1e-10, what: str = "") -> None:
    assert actual.keys() == expected.keys(), f"{what}: parameter names differ"
    for key in expected:
        a, e = actual[key], expected[key]
        scale = e.abs().max().clamp_min(1e-30)
        err = float((a - e).abs().max() / scale)
        assert err <= rtol, f"{what}: {key} differs, max relative error {err:.3g} > {rtol:g}"


class Interrupted(Exception):
    """What `interrupt_after` raises inside the training loop: the run stops as a crash would leave it."""


def interrupt_after(config: TrainConfig, step: int) -> None:
    """Run `train(config)` and break it off right after `step` (its checkpoints so far stay, the rest never
    comes): the first half of every resume test."""
    from pipeline.training import train

    def stop(done, model, placement):
        if done == step:
            raise Interrupted()

    with pytest.raises(Interrupted):
        train(config, on_step=stop)
