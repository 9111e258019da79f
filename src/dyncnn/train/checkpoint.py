"""Checkpoints: one safetensors file (weights, optimizer tensors, RNG state) whose header also carries the JSON
description (model name and config, training state), plus a copy of that JSON beside it for people and scripts.

Every file is written to a temporary name in the same folder and renamed into place, so an interrupted write
never damages the previous checkpoint. Loading checks that the file is complete and that it belongs to the model
it is loaded into, and names what differs when it does not.
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from ..errors import CheckpointError

FORMAT = "dyncnn-checkpoint-1"
META_KEY = "dyncnn"


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def model_spec(model: nn.Module) -> dict:
    """The name and config that rebuild ``model`` with ``create_model`` (empty for unregistered models)."""
    model = getattr(model, "module", model)  # unwrap DistributedDataParallel
    return dict(getattr(model, "dyncnn_spec", {}) or {})


def _flatten_optimizer(state: dict) -> tuple[dict[str, Tensor], dict]:
    tensors, scalars = {}, {}
    for idx, entry in state["state"].items():
        for key, value in entry.items():
            if isinstance(value, Tensor):
                tensors[f"optim.{idx}.{key}"] = value.detach().cpu().contiguous()
            else:
                scalars[f"{idx}.{key}"] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def _unflatten_optimizer(tensors: dict[str, Tensor], meta: dict) -> dict:
    state: dict[int, dict[str, Any]] = {}
    for name, value in tensors.items():
        _, idx, key = name.split(".", 2)
        state.setdefault(int(idx), {})[key] = value
    for name, value in meta.get("scalars", {}).items():
        idx, key = name.split(".", 1)
        state.setdefault(int(idx), {})[key] = value
    return {"state": state, "param_groups": meta["param_groups"]}


def _dedupe_shared(state: dict[str, Tensor]) -> tuple[dict[str, Tensor], dict[str, str]]:
    """Tensors for safetensors, which refuses tensors that share memory: a module registered under two names
    (the shortcut that a routing cell's paths share) appears once, and ``aliases`` maps each other name to it."""
    kept: dict[tuple, str] = {}
    storages: set[int] = set()
    tensors, aliases = {}, {}
    for name, value in state.items():
        value = value.detach()
        ptr = value.untyped_storage().data_ptr()
        view = (ptr, value.storage_offset(), tuple(value.shape), value.stride(), value.dtype, value.device)
        if value.numel() and view in kept:
            aliases[name] = kept[view]
            continue
        kept[view] = name
        out = value.cpu().contiguous()
        tensors[name] = out.clone() if value.numel() and ptr in storages else out  # another view of saved memory
        storages.add(ptr)
    return tensors, aliases


def save_checkpoint(path: str | os.PathLike, model: nn.Module, optimizer: torch.optim.Optimizer | None = None,
                    train_state: dict | None = None, extra: dict | None = None) -> Path:
    """Write ``path`` (``.safetensors``) and ``path`` with ``.json``; both atomically."""
    path = Path(path)
    model = getattr(model, "module", model)
    tensors, aliases = _dedupe_shared({f"model.{k}": v for k, v in model.state_dict().items()})
    meta: dict[str, Any] = {"format": FORMAT, "model": model_spec(model), "train_state": train_state or {},
                            **(extra or {})}
    if aliases:
        meta["aliases"] = aliases
    if optimizer is not None:
        opt_tensors, meta["optimizer"] = _flatten_optimizer(optimizer.state_dict())
        tensors.update(opt_tensors)
    tensors["rng.torch"] = torch.get_rng_state()
    header = json.dumps(meta, sort_keys=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata={META_KEY: header})
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    atomic_write_text(path.with_suffix(".json"), json.dumps(meta, indent=2, sort_keys=True) + "\n")
    return path


def read_checkpoint(path: str | os.PathLike) -> tuple[dict[str, Tensor], dict]:
    """Return (tensors, metadata) of a checkpoint, or raise CheckpointError saying what is wrong with the file."""
    path = Path(path)
    if path.is_dir():
        path = path / "last.safetensors"
    if not path.exists():
        raise CheckpointError(f"checkpoint {path} does not exist (expected a .safetensors file written by dyncnn)")
    try:
        tensors = load_file(str(path))
        from safetensors import safe_open
        with safe_open(str(path), framework="pt") as f:
            header = (f.metadata() or {}).get(META_KEY)
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"checkpoint {path} is unreadable or truncated ({os.path.getsize(path)} bytes): {e}; "
                              f"expected a complete safetensors file") from None
    if header is None:
        raise CheckpointError(f"checkpoint {path} has no dyncnn metadata; expected a file written by "
                              f"dyncnn.train.save_checkpoint (a plain state dict loads with safetensors directly)")
    meta = json.loads(header)
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"checkpoint {path} has format {meta.get('format')!r}, expected {FORMAT!r}")
    for name, source in meta.get("aliases", {}).items():
        if source not in tensors:
            raise CheckpointError(f"checkpoint {path} names {name!r} an alias of {source!r}, which it does not hold")
        tensors[name] = tensors[source]
    return tensors, meta


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


def load_checkpoint(path: str | os.PathLike, model: nn.Module | None = None,
                    optimizer: torch.optim.Optimizer | None = None, restore_rng: bool = False,
                    ) -> tuple[nn.Module, dict]:
    """Load a checkpoint into ``model`` (built from the recorded name and config when None).

    Returns (model, metadata). A checkpoint of another model name, or with keys or shapes that differ, raises
    CheckpointError naming them; nothing is modified in that case.
    """
    tensors, meta = read_checkpoint(path)
    spec = meta.get("model") or {}
    if model is None:
        if not spec.get("name"):
            raise CheckpointError(f"checkpoint {path} records no model name; pass the model to load it into")
        from ..models import create_model
        model = create_model(spec["name"], **spec.get("cfg", {}))
    target = getattr(model, "module", model)
    own = model_spec(target)
    if own.get("name") and spec.get("name") and own["name"] != spec["name"]:
        raise CheckpointError(f"checkpoint {path} is of model {spec['name']!r} {spec.get('cfg', {})}, "
                              f"but the model given is {own['name']!r} {own.get('cfg', {})}")
    state = {k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")}
    check_state_dict(target, state, source=f"checkpoint {path}")
    target.load_state_dict(state)
    if optimizer is not None:
        if "optimizer" not in meta:
            raise CheckpointError(f"checkpoint {path} holds no optimizer state to resume from")
        optimizer.load_state_dict(_unflatten_optimizer(
            {k: v for k, v in tensors.items() if k.startswith("optim.")}, meta["optimizer"]))
    if restore_rng and "rng.torch" in tensors:
        torch.set_rng_state(tensors["rng.torch"])
    return model, meta


def init_from_checkpoint(model: nn.Module, path: str | os.PathLike) -> str:
    """Start ``model`` from the weights of a trained checkpoint (``dyncnn train --init``): the whole model when
    the checkpoint is of the same architecture, else its static part (``model.backbone``), as the dynamic-network
    papers start gated / glance models from a trained static network. Returns which part was initialised.
    """
    tensors, meta = read_checkpoint(path)
    state = {k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")}
    candidates = [("model", model)]
    if isinstance(getattr(model, "backbone", None), nn.Module):
        candidates.append(("model.backbone", model.backbone))
    problems = []
    for name, target in candidates:
        try:
            check_state_dict(target, state, source=f"checkpoint {path}")
        except CheckpointError as e:
            problems.append(e)
            continue
        target.load_state_dict(state)
        return name
    raise CheckpointError(_init_mismatch(model, path, meta, problems))


def _backbone_name(model: nn.Module) -> str | None:
    """The registered name of ``model.backbone``: the longest registered name that ends ``model``'s own
    (``skipnet_mobilenet_v2`` -> ``mobilenet_v2``) and builds the backbone's class."""
    from ..models import create_model, list_models
    own = model_spec(model).get("name") or ""
    backbone = getattr(model, "backbone", None)
    if not own or backbone is None:
        return None
    for name in sorted((n for n in list_models() if own.endswith("_" + n)), key=len, reverse=True):
        try:
            if type(create_model(name)) is type(backbone):
                return name
        except Exception:            # a candidate that needs arguments cannot be the backbone's plain name
            continue
    return None


def _init_mismatch(model: nn.Module, path, meta: dict, problems: list) -> str:
    """What checkpoint ``--init`` needs, said in a sentence (the key lists only when the architecture is right)."""
    spec = model_spec(model)
    own, have = spec.get("name"), (meta.get("model") or {}).get("name")
    backbone = _backbone_name(model) if len(problems) > 1 else None
    shape = {k: v for k, v in spec.get("cfg", {}).items() if k in ("num_classes", "in_chans", "width_mult")}
    with_cfg = f" with {', '.join(f'{k}={v}' for k, v in shape.items())}" if shape else ""
    if own is None:
        needs = f"a checkpoint of the same {type(model).__name__}"
    elif backbone:
        needs = f"a checkpoint of {own!r} or of its static backbone {backbone!r}{with_cfg}"
    else:
        needs = f"a checkpoint of {own!r}{with_cfg}"
    hint = f" (train one with `dyncnn train --model {backbone or own} ...`)" if own else ""
    if have and have not in (own, backbone):
        return f"--init {path}: the checkpoint is of model {have!r}; {own or type(model).__name__} needs {needs}{hint}"
    # the right architecture in another configuration: the differing keys say which
    detail = str(problems[-1] if have == backbone and backbone else problems[0])
    return f"--init {path}: the checkpoint does not fit; {own or type(model).__name__} needs {needs}{hint}: {detail}"
