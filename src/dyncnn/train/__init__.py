"""Training: the loop, checkpoints, distributed launch.

The names are resolved on first use (PEP 562), so that importing a model family that only needs the checkpoint or
RL helpers does not load the trainer and the distributed launcher."""
from importlib import import_module

_LAZY = {
    "TrainConfig": "trainer", "Trainer": "trainer", "TrainResult": "trainer", "default_loss": "trainer",
    "evaluate": "trainer", "save_checkpoint": "checkpoint", "load_checkpoint": "checkpoint",
    "read_checkpoint": "checkpoint", "resolve_device": "device", "module_device": "device",
}

__all__ = list(_LAZY)


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(import_module(f"{__name__}.{_LAZY[name]}"), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_LAZY))
