"""Training: configuration and recipes, the loop, checkpoints, DDP and the ``perception-train`` CLI."""

from perception.train.config import RECIPES, TrainConfig, build_config
from perception.train.loop import train
from perception.train.loss import SegmentationLoss

__all__ = ["TrainConfig", "RECIPES", "build_config", "train", "SegmentationLoss"]
