"""One training replica, built the same way from a TrainConfig by the driver and every worker.

Its model, loss, optimizer and deterministic training batches (`make_*`), and one shard's
forward and backward (`shard_backward`, `shard_gradients`). Workers build their own (the
dataset is opened where it is read; no pixels travel from the driver), so these must
depend on the config alone.
"""
from __future__ import annotations

import torch

from n2n_core import SGD, Adam, L1Loss, MSELoss
from n2n_core.architectures import build_model
from n2n_core.module import Module
from pipeline.data.datasets import is_pairs_table, open_dataset, open_pairs
from pipeline.data.noise import parse_noise
from pipeline.data.patches import TrainingBatches
from pipeline.training.config import TrainConfig


def make_model(config: TrainConfig, device=None) -> Module:
    """The architecture, initialized from `config.seed` (the same on every process)."""
    generator = torch.Generator().manual_seed(config.seed)
    model = build_model(config.arch, generator=generator, dtype=config.torch_dtype, **config.arch_args)
    if device is not None:
        model.to(device=device)
    return model


def make_loss(config: TrainConfig) -> Module:
    return MSELoss() if config.loss == "l2" else L1Loss()


def make_optimizer(config: TrainConfig, model: Module):
    if config.optimizer == "adam":
        return Adam(model.parameters(), lr=config.lr)
    return SGD(model.parameters(), lr=config.lr, momentum=config.momentum)


def make_batches(config: TrainConfig) -> TrainingBatches:
    """Open `config.data` (images or a pairs table) as deterministic, shardable batches."""
    if is_pairs_table(config.data):
        dataset, noise = open_pairs(config.data), None
    else:
        dataset, noise = open_dataset(config.data), parse_noise(config.noise)
    if len(dataset) == 0:
        raise ValueError(f"{config.data}: no images found")
    return TrainingBatches(dataset, noise, crop_size=config.crop_size, batch_size=config.rows_per_step,
                           seed=config.seed, target=config.target, holdout=config.holdout)


def shard_backward(model: Module, loss_fn: Module, inputs: torch.Tensor, targets: torch.Tensor) -> tuple[float, int]:
    """Forward and backward of the mean loss over one shard: the gradients land in each `p.grad`.

    Shape:
        inputs, targets: (n, C, H, W) on the model's device and dtype.
        returns (loss sum over the shard (float), n).
    """
    model.train()
    model.zero_grad()
    loss = loss_fn(model(inputs), targets)
    model.backward(loss_fn.backward(), input_grad=False)  # only the parameters' gradients
    n = inputs.shape[0]
    return float(loss) * n, n


def shard_gradients(model: Module, loss_fn: Module, inputs: torch.Tensor, targets: torch.Tensor):
    """Gradients of the mean loss over one shard, as a dict.

    Shape:
        inputs, targets: (n, C, H, W) on the model's device and dtype.
        returns ({parameter name: gradient (CPU)}, loss sum over the shard (float), n).
    """
    loss_sum, n = shard_backward(model, loss_fn, inputs, targets)
    grads = {name: p.grad.detach().to("cpu", copy=True) for name, p in model.named_parameters()}
    return grads, loss_sum, n
