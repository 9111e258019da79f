"""Training: the loop, checkpoints, distributed launch."""
from .checkpoint import load_checkpoint, read_checkpoint, save_checkpoint
from .trainer import TrainConfig, Trainer, TrainResult, default_loss, evaluate

__all__ = ["TrainConfig", "Trainer", "TrainResult", "default_loss", "evaluate", "save_checkpoint",
           "load_checkpoint", "read_checkpoint"]
