"""Model registry: ``register_model``, ``create_model``, ``list_models``.

A registered entry is a function ``fn(num_classes=..., **cfg) -> nn.Module``. Names with the prefix
``torchvision:`` or ``timm:`` build that library's model, so every dyncnn command works on models people already
use (``create_model("torchvision:mobilenet_v2")``, ``create_model("timm:mobilenetv3_small_100")``).
Nothing is downloaded: pretrained weights are refused.
"""
from __future__ import annotations

import difflib
import fnmatch
from typing import Callable

from torch import nn

from ..errors import DyncnnError

_REGISTRY: dict[str, Callable[..., nn.Module]] = {}
_PUBLISHED: dict[str, dict] = {}


class UnknownModelError(DyncnnError, KeyError):
    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0])


def register_model(fn: Callable[..., nn.Module] | None = None, *, name: str | None = None,
                   published: dict | None = None):
    """Register a model builder under ``name`` (default: the function's name).

    ``published`` holds the paper's figures (e.g. ``{"macs": 300.8e6, "params": 3.5e6, "input_size": 224}``) that
    ``dyncnn zoo`` prints next to the measured ones. Usable as ``@register_model`` or
    ``@register_model(name=..., published=...)``.
    """
    def deco(f: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        key = name or f.__name__
        if key in _REGISTRY and _REGISTRY[key] is not f:
            raise ValueError(f"model name {key!r} is already registered")
        _REGISTRY[key] = f
        if published:
            _PUBLISHED[key] = dict(published)
        return f
    return deco(fn) if fn is not None else deco


def _ensure_models_loaded() -> None:
    # Importing the package registers the built-in families.
    from .. import models  # noqa: F401


def list_models(pattern: str = "*", include_external: bool = False) -> list[str]:
    """Sorted names of registered models matching a shell-style ``pattern`` (``"mobilenet*"``).

    With ``include_external`` also lists ``torchvision:`` classification models (and ``timm:`` ones when timm is
    installed), which makes the list long.
    """
    _ensure_models_loaded()
    names = sorted(n for n in _REGISTRY if fnmatch.fnmatch(n, pattern))
    if include_external:
        names += [n for n in _external_names() if fnmatch.fnmatch(n, pattern)]
    return names


def published_figures(name: str) -> dict:
    _ensure_models_loaded()
    return dict(_PUBLISHED.get(name, {}))


def _external_names() -> list[str]:
    import torchvision.models as tvm
    names = [f"torchvision:{n}" for n in tvm.list_models(module=tvm)]
    try:
        import timm
        names += [f"timm:{n}" for n in timm.list_models()]
    except ImportError:
        pass
    return names


def _unknown(name: str, candidates: list[str]) -> UnknownModelError:
    close = difflib.get_close_matches(name, candidates, n=5, cutoff=0.5)
    hint = f"; closest registered names: {', '.join(close)}" if close else ""
    return UnknownModelError(f"unknown model {name!r}{hint} (see `dyncnn zoo` or dyncnn.list_models())")


def _build_torchvision(arch: str, num_classes: int | None, **cfg) -> nn.Module:
    import torchvision.models as tvm
    available = tvm.list_models(module=tvm)
    if arch not in available:
        raise _unknown(f"torchvision:{arch}", [f"torchvision:{n}" for n in available])
    if cfg.get("weights") not in (None,):
        raise DyncnnError("dyncnn never downloads weights at run time; load a local state dict instead")
    cfg.pop("weights", None)
    if num_classes is not None:
        cfg["num_classes"] = num_classes
    return tvm.get_model(arch, weights=None, **cfg)


def _build_timm(arch: str, num_classes: int | None, **cfg) -> nn.Module:
    try:
        import timm
    except ImportError:
        raise DyncnnError(f"model 'timm:{arch}' needs timm, which is not installed (pip install timm)") from None
    if cfg.pop("pretrained", False):
        raise DyncnnError("dyncnn never downloads weights at run time; load a local state dict instead")
    if not timm.list_models(arch):
        raise _unknown(f"timm:{arch}", [f"timm:{n}" for n in timm.list_models()])
    if num_classes is not None:
        cfg["num_classes"] = num_classes
    return timm.create_model(arch, pretrained=False, **cfg)


def create_model(name: str, num_classes: int | None = None, **cfg) -> nn.Module:
    """Build a model by registered name, or ``torchvision:NAME`` / ``timm:NAME`` for those libraries' models.

    ``num_classes`` and ``cfg`` go to the builder. An unknown name raises an error listing the closest names.
    """
    if not isinstance(name, str) or not name:
        raise DyncnnError(f"model name must be a non-empty string, got {name!r}")
    prefix, _, arch = name.partition(":")
    if arch:
        if prefix == "torchvision":
            return _build_torchvision(arch, num_classes, **cfg)
        if prefix == "timm":
            return _build_timm(arch, num_classes, **cfg)
        raise DyncnnError(f"unknown model source {prefix!r} in {name!r}; expected 'torchvision:' or 'timm:' "
                          f"or a registered dyncnn name")
    _ensure_models_loaded()
    if name not in _REGISTRY:
        raise _unknown(name, list(_REGISTRY))
    if num_classes is not None:
        cfg["num_classes"] = num_classes
    model = _REGISTRY[name](**cfg)
    # Record how to rebuild the model (used by checkpoints).
    model.dyncnn_spec = {"name": name, "cfg": dict(cfg)}
    return model
