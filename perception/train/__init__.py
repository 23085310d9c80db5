"""Training: configuration and recipes, the loop, checkpoints, DDP and the ``perception-train`` CLI."""

from .config import RECIPES, TrainConfig, build_config
from .loop import train
from .loss import SegmentationLoss

__all__ = ["TrainConfig", "RECIPES", "build_config", "train", "SegmentationLoss"]
