"""Model registry: ``register_model``, ``create_model``, ``list_models``.

A registered entry is a function ``fn(num_classes=..., **cfg) -> nn.Module``. Names with the prefix
``torchvision:`` or ``timm:`` build that library's model, so every dyncnn command works on models people already
use (``create_model("torchvision:mobilenet_v2")``, ``create_model("timm:mobilenetv3_small_100")``); both take
``in_chans`` (torchvision's stem is swapped for one of that many channels, see ``dynamic.backbone``).
Nothing is downloaded: ``weights=PATH`` loads a state dict file the user has (or, for torchvision, a weight name
found in the torch hub cache), see ``models.pretrained``; ``pretrained=True`` is refused.
"""
from __future__ import annotations

import difflib
import fnmatch
import inspect
import re
import typing
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


def model_class(name: str) -> type | None:
    """The class registered model ``name`` builds: the builder itself when it is a class, else the class its return
    annotation names; None when it names none (the contract tests find the dynamic families through this)."""
    _ensure_models_loaded()
    if name not in _REGISTRY:
        raise _unknown(name, list(_REGISTRY))
    builder = _REGISTRY[name]
    if inspect.isclass(builder):
        return builder
    ret = typing.get_type_hints(builder).get("return")
    return ret if inspect.isclass(ret) else None


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


# Keyword arguments that would make torchvision or timm read a file or fetch weights: never passed on.
FILE_LOADING_KEYS = frozenset({"weights", "pretrained", "checkpoint_path", "pretrained_cfg", "pretrained_cfg_overlay",
                               "pretrained_strict", "cache_dir", "weights_backbone"})
# The keys a checkpoint header may give a torchvision / timm model (an allow-list: a header is untrusted input).
EXTERNAL_CFG_KEYS = frozenset({"num_classes", "in_chans", "drop_rate", "drop_path_rate", "global_pool", "dropout",
                               "width_mult", "aux_logits", "transform_input", "init_weights"})
_KIND_TOKENS = {"str": {"str"}, "number": {"int", "float", "bool"}, "seq": {"Sequence", "tuple", "list"},
                "map": {"dict", "Mapping"}}
_PLAIN_TOKENS = {"str", "int", "float", "bool", "None", "Sequence", "tuple", "list", "dict", "Mapping", "Optional"}


def _kind(value) -> str | None:
    if isinstance(value, str):
        return "str"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, (list, tuple)):
        return "seq"
    if isinstance(value, dict):
        return "map"
    return None


def _parameters(fn) -> tuple[dict[str, inspect.Parameter], bool]:
    """(named parameters, whether ``fn`` also takes **kwargs) of a builder or class."""
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):
        return {}, True
    params = {n: p for n, p in sig.parameters.items()
              if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL) and n != "self"}
    return params, any(p.kind == p.VAR_KEYWORD for p in sig.parameters.values())


def _callee_keys(builder, qualname: str) -> list[str]:
    """The named parameters of ``qualname`` (``TinyMobileNet.__init__``, from a TypeError) looked up in the
    builder's module: where a builder's ``**kwargs`` went."""
    obj = getattr(builder, "__globals__", {}).get(qualname.split(".")[0])
    for part in qualname.split(".")[1:]:
        obj = getattr(obj, part, None)
    return sorted(_parameters(obj)[0]) if callable(obj) else []


def model_cfg_keys(name: str) -> list[str] | None:
    """The configuration keys registered model ``name`` accepts (besides ``num_classes``); None when they cannot
    be listed (a builder that passes ``**kwargs`` on to something else, or a torchvision / timm model)."""
    _ensure_models_loaded()
    if name not in _REGISTRY:
        return None
    params, open_ = _parameters(_REGISTRY[name])
    return None if open_ else sorted(params)


def check_model_cfg(name: str, cfg: dict) -> None:
    """Raise DyncnnError for a key that model ``name`` does not take (listing the valid keys and the closest
    match) or a value of the wrong kind (a string where a number or list is expected, ...), naming the key."""
    _ensure_models_loaded()
    if name not in _REGISTRY:
        return
    builder = _REGISTRY[name]
    params, open_ = _parameters(builder)
    valid = sorted(params)
    typed = dict(params)
    ret = inspect.signature(builder).return_annotation if open_ else None
    if isinstance(ret, str) and inspect.isclass(getattr(builder, "__globals__", {}).get(ret)):
        # the class a **kwargs builder returns usually takes the rest: its annotations check their values' kinds
        typed = {**_parameters(builder.__globals__[ret].__init__)[0], **params}
    for key in cfg:
        if key not in params and not open_:
            close = difflib.get_close_matches(key, valid, n=1, cutoff=0.5)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise DyncnnError(f"model {name!r} has no config key {key!r}{hint} (valid keys: {', '.join(valid)})")
    for key, value in cfg.items():
        if key not in typed or value is None or _kind(value) is None:
            continue
        p = typed[key]
        ann = p.annotation if isinstance(p.annotation, str) else getattr(p.annotation, "__name__", "")
        top = ann or ""
        while re.search(r"\[[^\[\]]*\]", top):        # the outer types only: tuple[int, ...] -> tuple
            top = re.sub(r"\[[^\[\]]*\]", "", top)
        tokens = set(re.findall(r"[A-Za-z_]+", top))
        if tokens and tokens <= _PLAIN_TOKENS:
            accepted = {k for k, names in _KIND_TOKENS.items() if names & tokens}
            expected = ann
        elif not tokens and p.default is not p.empty and _kind(p.default) is not None:
            accepted, expected = {_kind(p.default)}, f"a {type(p.default).__name__} like {p.default!r}"
        else:
            continue
        if _kind(value) not in accepted:
            raise DyncnnError(f"model {name!r}: config key {key!r} expects {expected}, got {value!r} "
                              f"({type(value).__name__})")


def _build_torchvision(arch: str, num_classes: int | None, **cfg) -> nn.Module:
    import torchvision.models as tvm
    available = tvm.list_models(module=tvm)
    if arch not in available:
        raise _unknown(f"torchvision:{arch}", [f"torchvision:{n}" for n in available])
    if FILE_LOADING_KEYS & set(cfg):
        raise DyncnnError(f"torchvision:{arch}: refusing {sorted(FILE_LOADING_KEYS & set(cfg))}: dyncnn never loads "
                          f"weights through the model builder; pass weights=PATH to create_model instead")
    in_chans = cfg.pop("in_chans", None)
    if num_classes is not None:
        cfg["num_classes"] = num_classes
    try:
        model = tvm.get_model(arch, weights=None, **cfg)
    except TypeError as e:
        raise DyncnnError(f"torchvision:{arch} cannot be built with config "
                          f"{', '.join(f'{k}={v!r}' for k, v in cfg.items())}: {e}") from None
    if in_chans is not None:
        from ..dynamic.backbone import set_input_channels
        set_input_channels(model, in_chans)
    return model


def _build_timm(arch: str, num_classes: int | None, **cfg) -> nn.Module:
    try:
        import timm
    except ImportError:
        raise DyncnnError(f"model 'timm:{arch}' needs timm, which is not installed (pip install timm)") from None
    if cfg.pop("pretrained", False):
        raise DyncnnError("dyncnn never downloads weights at run time; pass weights=PATH (a state dict file)")
    if FILE_LOADING_KEYS & set(cfg):
        raise DyncnnError(f"timm:{arch}: refusing {sorted(FILE_LOADING_KEYS & set(cfg))}: dyncnn never loads "
                          f"weights through the model builder; pass weights=PATH to create_model instead")
    if not timm.list_models(arch):
        raise _unknown(f"timm:{arch}", [f"timm:{n}" for n in timm.list_models()])
    if num_classes is not None:
        cfg["num_classes"] = num_classes
    return timm.create_model(arch, pretrained=False, **cfg)


def create_model(name: str, num_classes: int | None = None, weights=None, **cfg) -> nn.Module:
    """Build a model by registered name, or ``torchvision:NAME`` / ``timm:NAME`` for those libraries' models.

    ``num_classes`` and ``cfg`` go to the builder. An unknown name raises an error listing the closest names.
    ``weights`` (a state dict file the user has; for torchvision models also a weight name such as ``"DEFAULT"``
    found in the torch hub cache) is loaded after building, by :func:`dyncnn.models.pretrained.load_weights`:
    the stem is adapted to ``in_chans`` and a classifier of another ``num_classes`` is dropped (kept freshly
    initialised); what it did is in ``model.dyncnn_weights``. Nothing is downloaded.
    """
    model = _create(name, num_classes, **cfg)
    if weights is not None:
        from .pretrained import load_weights
        model.dyncnn_weights = load_weights(model, weights, name)
    return model


def _create(name: str, num_classes: int | None = None, **cfg) -> nn.Module:
    if not isinstance(name, str) or not name:
        raise DyncnnError(f"model name must be a non-empty string, got {name!r}")
    prefix, _, arch = name.partition(":")
    if arch:
        if prefix == "torchvision":
            model = _build_torchvision(arch, num_classes, **cfg)
        elif prefix == "timm":
            model = _build_timm(arch, num_classes, **cfg)
        else:
            raise DyncnnError(f"unknown model source {prefix!r} in {name!r}; expected 'torchvision:' or 'timm:' "
                              f"or a registered dyncnn name")
        # how to rebuild it (checkpoints): only the keys a checkpoint header may give an external model
        spec_cfg = {k: v for k, v in cfg.items() if k in EXTERNAL_CFG_KEYS}
        model.dyncnn_spec = {"name": name, "cfg": {**spec_cfg, **({"num_classes": num_classes}
                                                                  if num_classes is not None else {})}}
        return model
    _ensure_models_loaded()
    if name not in _REGISTRY:
        raise _unknown(name, list(_REGISTRY))
    if num_classes is not None:
        cfg["num_classes"] = num_classes
    check_model_cfg(name, cfg)
    try:
        model = _REGISTRY[name](**cfg)
    except DyncnnError:
        raise
    except ValueError as e:
        if not cfg:
            raise
        raise DyncnnError(f"model {name!r} cannot be built with config "
                          f"{', '.join(f'{k}={v!r}' for k, v in cfg.items())}: {e}") from None
    except TypeError as e:
        match = re.search(r"(?:([\w.]+)\(\) )?got an unexpected keyword argument '(\w+)'", str(e))
        if not match:
            if not cfg:
                raise
            raise DyncnnError(f"model {name!r} cannot be built with config "
                              f"{', '.join(f'{k}={v!r}' for k, v in cfg.items())}: {e}") from None
        builder = _REGISTRY[name]
        valid = sorted(set(_parameters(builder)[0]) | set(_callee_keys(builder, match.group(1) or "")))
        close = difflib.get_close_matches(match.group(2), valid, n=1, cutoff=0.5)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise DyncnnError(f"model {name!r} has no config key {match.group(2)!r}{hint} (valid keys: "
                          f"{', '.join(valid)})") from None
    # Record how to rebuild the model (used by checkpoints).
    model.dyncnn_spec = {"name": name, "cfg": dict(cfg)}
    return model
