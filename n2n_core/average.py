"""Average the weights of models of one architecture (a "model soup", as in stochastic
weight averaging).

`average_models([a, b], [0.5, 0.5])` returns a new model whose every weight is the
weighted mean of the models' weights. This is meaningful only for models that lie in one
basin of the loss: fine-tunes of one starting point, or checkpoints along one run
(Izmailov et al., "Averaging Weights Leads to Wider Optima and Better Generalization",
2018; Wortsman et al., "Model soups", 2022). Two independently trained networks are not such
a pair (their units are permuted against each other) and their mean is a poor model.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from n2n_core.architectures import build_model
from n2n_core.module import Module

__all__ = ["average_models", "normalized_weights"]


def normalized_weights(weights: Sequence[float] | None, count: int) -> list[float]:
    """`weights` (one per model, >= 0, finite, not all 0) scaled to sum to 1; None: equal weights."""
    if weights is None:
        return [1.0 / count] * count
    weights = [float(w) for w in weights]
    if len(weights) != count:
        raise ValueError(f"{len(weights)} weights for {count} models")
    if any(not math.isfinite(w) or w < 0 for w in weights):
        raise ValueError(f"weights must be finite and >= 0, got {weights}")
    total = sum(weights)
    if total <= 0:
        raise ValueError("weights must not all be 0")
    if not math.isfinite(total):  # e.g. 1e308 + 1e308: scale by the largest first (only then, so the
        largest = max(weights)   # shares of ordinary weights keep their exact arithmetic)
        weights = [w / largest for w in weights]
        total = sum(weights)
    return [w / total for w in weights]


def average_models(models: Sequence[Module], weights: Sequence[float] | None = None, *,
                   names: Sequence[str] | None = None) -> Module:
    """A new model (the first one's architecture, dtype and device) with the weighted mean of the models' tensors.

    Args:
        models: two or more models built by `build_model` with the same architecture and
            arguments (`model.config`), so their state dicts have the same keys and shapes.
        weights: one per model (scaled to sum to 1); None: the plain mean.
        names: what errors call each model (e.g. its file); None: "model 0", "model 1", ...
    Floating tensors are averaged in float64 and cast back; any other tensor must be equal
    in every model. Raises ValueError naming the first model that does not fit.
    """
    if len(models) < 2:
        raise ValueError(f"averaging needs at least 2 models, got {len(models)}")
    shares = normalized_weights(weights, len(models))
    names = list(names) if names is not None else [f"model {i}" for i in range(len(models))]
    if len(names) != len(models):
        raise ValueError(f"{len(names)} names for {len(models)} models")
    first = models[0]
    config = getattr(first, "config", None)
    if config is None:
        raise TypeError(f"average_models: {names[0]} has no .config; build it with n2n_core.build_model")
    states = [m.state_dict() for m in models]
    for i, (model, state) in enumerate(zip(models, states)):
        other = getattr(model, "config", None)
        if other is None or other.name != config.name or dict(other.kwargs) != dict(config.kwargs):
            raise ValueError(f"{names[i]} is {other.name if other else '?'} {dict(other.kwargs) if other else ''}, "
                             f"{names[0]} is {config.name} {dict(config.kwargs)}: only one architecture averages")
        if set(state) != set(states[0]):
            raise ValueError(f"{names[i]} has other tensors than {names[0]}")
    averaged = {}
    for key, reference in states[0].items():
        tensors = [state[key] for state in states]
        for i, t in enumerate(tensors):
            if t.shape != reference.shape or t.dtype != reference.dtype:
                raise ValueError(f"{names[i]}: {key!r} is {t.dtype} {list(t.shape)}, "
                                 f"{names[0]} has {reference.dtype} {list(reference.shape)}")
        if reference.dtype.is_floating_point:
            total = torch.zeros(reference.shape, dtype=torch.float64, device=reference.device)
            for share, t in zip(shares, tensors):
                total += share * t.to(device=reference.device, dtype=torch.float64)
            averaged[key] = total.to(reference.dtype)
        else:
            if any(not torch.equal(t.to(reference.device), reference) for t in tensors[1:]):
                raise ValueError(f"{key!r} ({reference.dtype}) differs between the models and cannot be averaged")
            averaged[key] = reference.clone()
    floating = next((t for t in states[0].values() if t.dtype.is_floating_point), None)
    if floating is None:
        raise ValueError("the models have no floating-point weights")
    result = build_model(config.name, generator=torch.Generator().manual_seed(0), dtype=floating.dtype,
                         device=floating.device, **config.kwargs)
    result.load_state_dict(averaged, strict=True)
    return result
