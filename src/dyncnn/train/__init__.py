"""Training: the loop, checkpoints, distributed launch."""
from .checkpoint import load_checkpoint, read_checkpoint, save_checkpoint
from .device import module_device, resolve_device
from .trainer import TrainConfig, Trainer, TrainResult, default_loss, evaluate

__all__ = ["TrainConfig", "Trainer", "TrainResult", "default_loss", "evaluate", "save_checkpoint",
           "load_checkpoint", "read_checkpoint", "resolve_device", "module_device"]
