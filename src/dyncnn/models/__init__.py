"""Model families, one per module; importing this package registers every built-in model."""
import importlib
import pkgutil

from .base import Backbone, StageInfo
from .registry import create_model, list_models, model_class, published_figures, register_model

# Each family module registers its models on import; new families need no edit here.
for _info in pkgutil.iter_modules(__path__):
    if _info.name not in ("base", "registry"):
        importlib.import_module(f"{__name__}.{_info.name}")

__all__ = ["Backbone", "StageInfo", "create_model", "list_models", "model_class", "published_figures", "register_model"]
