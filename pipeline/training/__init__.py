"""Data-parallel training on Ray: TrainConfig, GradientWorker actors, the driver loop.

    from pipeline.training import TrainConfig, train
    result = train(TrainConfig(data="images/", out="runs/a", workers=2, steps=100))
"""
from pipeline.training.config import TrainConfig
from pipeline.training.driver import TrainResult, train

__all__ = ["TrainConfig", "TrainResult", "train"]
