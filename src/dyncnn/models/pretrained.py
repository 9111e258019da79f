"""Pretrained weights the user already has on disk, loaded into torchvision / timm / dyncnn models. Nothing is
downloaded, ever.

``load_weights(model, weights)`` takes

- a state dict file: ``.pth`` / ``.pt`` / ``.bin`` (read with ``torch.load(weights_only=True)``, so a file cannot
  run code) or ``.safetensors``; a training checkpoint that wraps the state dict under ``state_dict`` / ``model``
  (timm's, torchvision's reference scripts') and keys prefixed ``module.`` (DistributedDataParallel) or
  ``_orig_mod.`` (torch.compile) are unwrapped;
- exits attached to a backbone (``multi_exit``, :func:`~dyncnn.dynamic.attach_exits`) take the backbone's file;
- for ``torchvision:`` models, a weight name (``"DEFAULT"``, ``"IMAGENET1K_V1"`` or
  ``"MobileNet_V3_Small_Weights.IMAGENET1K_V1"``), read from the torch hub cache where torchvision itself keeps
  downloads (``$TORCH_HOME/hub/checkpoints/<file>``); when the file is not there, the error says the exact path
  and the URL to fetch it from -- no connection is attempted;
- for ``timm:`` models, ``"DEFAULT"``: the model's default pretrained weights where timm stores a download (the
  Hugging Face cache, else the torch hub cache), with the same error when absent.

The state dict must fit the model, with two adaptations:

- the stem convolution (the first ``nn.Conv2d``) of another input-channel count is adapted the way timm adapts
  pretrained stems (:func:`dyncnn.dynamic.backbone.adapt_input_weight`: RGB filters summed for one channel,
  repeated and rescaled for more);
- the classifier (the model's last module with parameters: torchvision's ``fc`` / ``classifier.N``, timm's
  ``get_classifier()``) of another number of classes is dropped: the model keeps its freshly initialised
  classifier, as when fine-tuning on new classes. Its keys are reported.

Anything else that differs -- missing, unexpected or mis-shaped keys -- is a CheckpointError listing them.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import Tensor, nn

from ..dynamic.backbone import adapt_input_weight, first_conv
from ..errors import CheckpointError, DyncnnError
from ..files import model_spec

STATE_DICT_SUFFIXES = (".pth", ".pt", ".bin", ".safetensors")
_WRAPPERS = ("state_dict", "model", "module", "net")
_PREFIXES = ("module.", "_orig_mod.")


def check_state_dict(model: nn.Module, state: dict[str, Tensor], source: str = "checkpoint") -> None:
    """Raise CheckpointError naming missing, unexpected and mis-shaped keys if ``state`` does not fit ``model``."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = sorted(f"{k}: model {tuple(own[k].shape)} vs {source} {tuple(state[k].shape)}"
                    for k in set(own) & set(state) if own[k].shape != state[k].shape)
    if missing or unexpected or shapes:
        def few(items):
            return ", ".join(items[:8]) + (f" (+{len(items) - 8} more)" if len(items) > 8 else "")
        parts = [f"missing keys: {few(missing)}" if missing else "",
                 f"unexpected keys: {few(unexpected)}" if unexpected else "",
                 f"shape mismatches: {few(shapes)}" if shapes else ""]
        raise CheckpointError(f"{source} does not match the model ({type(model).__name__}): "
                              + "; ".join(p for p in parts if p))


def read_state_dict(path: str | os.PathLike) -> dict[str, Tensor]:
    """The tensors of a state dict file (see the module docstring), unwrapped and with DDP / compile prefixes
    removed; a DyncnnError says what came when the file is not one."""
    path = Path(path)
    if not path.is_file():
        raise DyncnnError(f"weights file {path} does not exist (expected a state dict: "
                          f"{', '.join(STATE_DICT_SUFFIXES)})")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError, safe_open
        from safetensors.torch import load_file
        try:
            state = load_file(str(path))
            with safe_open(str(path), framework="pt") as f:
                dyncnn_header = "dyncnn" in (f.metadata() or {})
        except (SafetensorError, OSError, ValueError, RuntimeError) as e:
            raise DyncnnError(f"weights file {path} is not a readable safetensors file: {e}") from None
        if dyncnn_header:          # a dyncnn checkpoint: its weights are the "model." entries
            state = {k[len("model."):]: v for k, v in state.items() if k.startswith("model.")}
    else:
        try:
            state = torch.load(str(path), map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - pickle, zip and torch errors all mean "not a state dict"
            raise DyncnnError(f"weights file {path} is not a state dict torch.load(weights_only=True) can read "
                              f"({type(e).__name__}: {str(e)[:200]}); expected a file saved with "
                              f"torch.save(model.state_dict(), PATH)") from None
        while isinstance(state, dict) and not any(isinstance(v, Tensor) for v in state.values()) and \
                any(isinstance(state.get(w), dict) for w in _WRAPPERS):
            state = next(state[w] for w in _WRAPPERS if isinstance(state.get(w), dict))
    if not isinstance(state, dict) or not state or not all(isinstance(v, Tensor) for v in state.values()):
        raise DyncnnError(f"weights file {path} holds a {type(state).__name__}"
                          f"{' without tensors' if isinstance(state, dict) else ''}; expected a state dict "
                          f"(parameter name -> tensor)")
    for prefix in _PREFIXES:
        if all(k.startswith(prefix) for k in state):
            state = {k[len(prefix):]: v for k, v in state.items()}
    return state


def classifier_path(model: nn.Module) -> str | None:
    """Path of the model's classifier: timm's ``get_classifier()``, else its last module with parameters."""
    get = getattr(model, "get_classifier", None)
    if callable(get):
        try:
            head = get()
        except Exception:  # noqa: BLE001 - a model whose get_classifier needs arguments: use the general rule
            head = None
        for path, module in model.named_modules():
            if head is not None and module is head and next(module.parameters(), None) is not None:
                return path
    last = None
    for path, module in model.named_modules():
        if next(module.parameters(recurse=False), None) is not None:
            last = path
    return last


def hub_weights_path(arch: str, name: str) -> tuple[Path, str]:
    """(path in the torch hub cache, download URL) of torchvision weights ``name`` of model ``arch``."""
    import torchvision.models as tvm
    try:
        enum = tvm.get_model_weights(arch)
    except (ValueError, KeyError):
        raise DyncnnError(f"torchvision:{arch} has no published weights") from None
    short = name.split(".")[-1]
    if name.count(".") == 1 and name.split(".")[0] != enum.__name__:
        raise DyncnnError(f"weights {name!r} are not torchvision:{arch}'s ({enum.__name__})")
    try:
        weights = enum.DEFAULT if short == "DEFAULT" else enum[short]
    except KeyError:
        raise DyncnnError(f"torchvision:{arch} has no weights {name!r}; expected DEFAULT or one of "
                          f"{', '.join(w.name for w in enum)} (or the path of a state dict file)") from None
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(weights.url), weights.url


def hf_hub_cache() -> Path:
    """The Hugging Face hub cache folder, as ``huggingface_hub`` finds it (``$HF_HUB_CACHE``, ``$HF_HOME/hub``,
    ``$XDG_CACHE_HOME/huggingface/hub``, ``~/.cache/huggingface/hub``), without importing it."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"])
    home = os.environ.get("HF_HOME") or os.path.join(os.environ.get("XDG_CACHE_HOME") or
                                                     os.path.join(os.path.expanduser("~"), ".cache"), "huggingface")
    return Path(home) / "hub"


def timm_cached_weights(model: nn.Module, name: str) -> Path:
    """The default pretrained weights of timm model ``model`` where timm would have stored a download: the Hugging
    Face cache (``models--timm--ARCH.TAG/snapshots/REVISION/model.safetensors``), else the torch hub cache (its
    ``url``'s file). Nothing is downloaded: when neither holds it, the error names both places."""
    cfg = getattr(model, "pretrained_cfg", None) or {}
    places, sources = [], []
    if cfg.get("hf_hub_id"):
        repo = hf_hub_cache() / f"models--{cfg['hf_hub_id'].replace('/', '--')}"
        ref = repo / "refs" / "main"
        snapshots = [repo / "snapshots" / ref.read_text().strip()] if ref.is_file() else \
            sorted((repo / "snapshots").glob("*"))
        for snap in snapshots:
            for f in ("model.safetensors", "pytorch_model.bin"):
                if (snap / f).is_file():
                    return snap / f
        places.append(f"{repo}/snapshots/REVISION/model.safetensors")
        sources.append(f"https://huggingface.co/{cfg['hf_hub_id']}")
    if cfg.get("url"):
        path = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(cfg["url"])
        if path.is_file():
            return path
        places.append(str(path))
        sources.append(cfg["url"])
    if not places:
        raise DyncnnError(f"{name} has no published pretrained weights; give the path of a state dict file")
    raise DyncnnError(f"the DEFAULT weights of {name} are not in the Hugging Face or torch hub cache: expected "
                      f"{' or '.join(places)}. dyncnn never downloads weights at run time; fetch them yourself "
                      f"({' or '.join(sources)}) and put the file there, or pass its path with weights=PATH")


def resolve_weights(name: str, weights: str | os.PathLike, model: nn.Module | None = None) -> Path:
    """The file ``weights`` stands for in ``create_model(name, weights=...)``: a path; for ``torchvision:`` models
    a weight name looked up in the torch hub cache; for ``timm:`` models ``"DEFAULT"``, looked up where timm keeps
    downloads (:func:`timm_cached_weights`). Never downloads."""
    text = os.fspath(weights)
    looks_like_path = os.sep in text or "/" in text or text.endswith(STATE_DICT_SUFFIXES) or Path(text).exists()
    if looks_like_path:
        return Path(text)
    if name.startswith("timm:") and text == "DEFAULT" and model is not None:
        return timm_cached_weights(model, name)
    if not name.startswith("torchvision:"):
        raise DyncnnError(f"{name}: weights={text!r} is not a file; give the path of a state dict file "
                          f"({', '.join(STATE_DICT_SUFFIXES)}) -- weights by name are looked up in the caches for "
                          f"torchvision: models (a weight name) and timm: models (DEFAULT) only")
    path, url = hub_weights_path(name.partition(":")[2], text)
    if not path.is_file():
        raise DyncnnError(f"weights {text!r} of {name} are not in the torch hub cache: expected the file {path}. "
                          f"dyncnn never downloads weights at run time; fetch {url} yourself and put it at that path "
                          f"(or pass the path of the file with weights=PATH)")
    return path


def load_weights(model: nn.Module, weights: str | os.PathLike | dict, name: str = "model") -> dict:
    """Load a state dict file (or a state dict) into ``model``, adapting the stem to the model's input channels
    and dropping a classifier of another class count (see the module docstring). Returns what was done:
    ``{"file", "into", "adapted_stem", "dropped_classifier"}`` (the file read; ``into``: "model", or "backbone"
    for exits attached to one; the keys concerned)."""
    source = f"weights {weights}" if not isinstance(weights, dict) else "the state dict"
    backbone = getattr(model, "source_backbone", None)
    if isinstance(backbone, nn.Module):
        name = model_spec(model).get("cfg", {}).get("backbone", name)
    path = None if isinstance(weights, dict) else \
        resolve_weights(name, weights, backbone if isinstance(backbone, nn.Module) else model)
    state = dict(weights) if path is None else read_state_dict(path)
    into = "model"
    if isinstance(backbone, nn.Module) and not set(state) & set(model.state_dict()):
        model, into = backbone, "backbone"   # exits attached to a backbone: a file of its own keys is its weights
    own = model.state_dict()
    adapted, dropped = [], []
    stem = first_conv(model)
    if stem is not None:
        key = f"{stem[0]}.weight" if stem[0] else "weight"
        theirs, mine = state.get(key), own.get(key)
        if theirs is not None and mine is not None and theirs.dim() == 4 and theirs.shape[1] != mine.shape[1] and \
                (theirs.shape[0], *theirs.shape[2:]) == (mine.shape[0], *mine.shape[2:]):
            state[key] = adapt_input_weight(theirs, mine.shape[1])
            adapted.append(key)
    head = classifier_path(model)
    if head is not None:
        for key in [k for k in state if k.rpartition(".")[0] == head and k in own]:
            if state[key].shape != own[key].shape:
                dropped.append(key)
        if dropped:      # the whole classifier: its weight and bias together
            dropped = sorted(k for k in state if k.rpartition(".")[0] == head and k in own)
            for key in dropped:
                state[key] = own[key]
    check_state_dict(model, state, source=source)
    model.load_state_dict(state)
    return {"file": None if path is None else str(path), "into": into, "adapted_stem": adapted,
            "dropped_classifier": dropped}
