"""Hyperparameter sweeps on Ray Tune: trials are `n2n train` runs compared on held-out photos.

    from pipeline.sweep import SweepConfig, SearchSpace, parse_option, run_sweep
    space = SearchSpace((parse_option("grid", "width=16,32,48"), parse_option("loguniform", "lr=1e-4:3e-3")))
    result = run_sweep(SweepConfig(out="sweeps/a", train=TrainConfig(data="photos/", out="", holdout=40), space=space))
"""
from pipeline.sweep.config import SweepConfig
from pipeline.sweep.runner import SweepResult, run_sweep
from pipeline.sweep.space import Dimension, SearchSpace, parse_option

__all__ = ["Dimension", "SearchSpace", "SweepConfig", "SweepResult", "parse_option", "run_sweep"]
