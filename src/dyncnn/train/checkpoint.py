"""Checkpoints: one safetensors file (weights, optimizer tensors, RNG state) whose header also carries the JSON
description (model name and config, training state), plus a copy of that JSON beside it for people and scripts.

Every file is written to a temporary name in the same folder and renamed into place, so an interrupted write
never damages the previous checkpoint. Loading checks that the file is complete and that it belongs to the model
it is loaded into, and names what differs when it does not.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from ..errors import CheckpointError, DyncnnError
from ..files import MAX_JSON_BYTES, apply_umask, atomic_write_text, model_spec, parse_json, read_bounded
from ..models.pretrained import check_state_dict

FORMAT = "dyncnn-checkpoint-1"
META_KEY = "dyncnn"
MAX_CHECKPOINT_BYTES = 16 << 30     # the mobile networks' checkpoints are megabytes; a larger file is refused unread


def remove_stale_temporaries(folder: str | os.PathLike) -> list[Path]:
    """Delete the ``.NAME.*.tmp`` files that an interrupted atomic write left in ``folder`` (call it when a run
    starts, holding the folder's ``files.output_lock`` as ``Trainer.fit`` does: no other writer is then running);
    returns what was removed."""
    folder = Path(folder)
    removed = []
    if folder.is_dir():
        for p in folder.glob(".*.tmp"):
            if p.is_file() and not p.is_symlink():
                p.unlink(missing_ok=True)
                removed.append(p)
    return removed


def sync_json_copies(folder: str | os.PathLike) -> list[Path]:
    """Rewrite every ``NAME.json`` of ``folder`` whose content differs from the header of ``NAME.safetensors``
    (a write killed between the two files leaves the copy one step behind); returns the files rewritten."""
    from safetensors import safe_open
    fixed = []
    for ckpt in sorted(Path(folder).glob("*.safetensors")):
        try:
            with safe_open(str(ckpt), framework="pt") as f:
                header = (f.metadata() or {}).get(META_KEY)
            meta = parse_json(header, f"checkpoint {ckpt}", CheckpointError) if header else None
        except (SafetensorError, OSError, ValueError, RuntimeError):
            continue
        if not isinstance(meta, dict) or meta.get("format") != FORMAT:
            continue
        text = json.dumps(meta, indent=2, sort_keys=True) + "\n"
        copy = ckpt.with_suffix(".json")
        if not copy.is_file() or copy.stat().st_size != len(text.encode()) or \
                read_bounded(copy, len(text.encode()), "checkpoint copy") != text.encode():
            atomic_write_text(copy, text)
            fixed.append(copy)
    return fixed


def payload_sha256(tensors: dict[str, Tensor]) -> str:
    """SHA-256 over every tensor's name, dtype, shape and bytes (in name order): recorded in the header at save
    time and checked at load time, so that flipped bytes in the tensor data are found."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        h.update(f"{name}|{str(t.dtype)}|{tuple(t.shape)}|".encode())
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


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
    meta["payload_sha256"] = payload_sha256(tensors)
    header = json.dumps(meta, sort_keys=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata={META_KEY: header})
        apply_umask(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    atomic_write_text(path.with_suffix(".json"), json.dumps(meta, indent=2, sort_keys=True) + "\n")
    return path


def _is_dyncnn_checkpoint(path: str | os.PathLike) -> bool:
    """Whether ``path`` is (meant as) a dyncnn checkpoint: a folder (its last.safetensors), or a .safetensors file
    whose header carries dyncnn's metadata; anything else is a plain state dict file."""
    path = Path(path)
    if path.is_dir() or path.suffix != ".safetensors":
        return path.is_dir() or path.suffix not in (".pth", ".pt", ".bin")
    if not path.is_file():
        return True                  # read_checkpoint says it does not exist
    from safetensors import safe_open
    try:
        with safe_open(str(path), framework="pt") as f:
            return META_KEY in (f.metadata() or {})
    except (SafetensorError, OSError, ValueError, RuntimeError):
        return True                  # read_checkpoint says what is wrong with it


def read_checkpoint(path: str | os.PathLike) -> tuple[dict[str, Tensor], dict]:
    """Return (tensors, metadata) of a checkpoint, or raise CheckpointError saying what is wrong with the file."""
    path = Path(path)
    if path.is_dir():
        path = path / "last.safetensors"
    if not path.exists():
        raise CheckpointError(f"checkpoint {path} does not exist (expected a .safetensors file written by dyncnn)")
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} is not a regular file (expected a .safetensors file written by "
                              f"dyncnn)")
    if path.stat().st_size > MAX_CHECKPOINT_BYTES:
        raise CheckpointError(f"checkpoint {path} has {path.stat().st_size} bytes, more than the "
                              f"{MAX_CHECKPOINT_BYTES} a checkpoint may have; refusing to load it")
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
    if len(header) > MAX_JSON_BYTES:
        raise CheckpointError(f"checkpoint {path}: its dyncnn header has {len(header)} characters, more than the "
                              f"{MAX_JSON_BYTES} a header may have")
    meta = parse_json(header, f"checkpoint {path}: its dyncnn header", CheckpointError)
    if not isinstance(meta, dict):
        raise CheckpointError(f"checkpoint {path}: its dyncnn header is a JSON {type(meta).__name__}, expected "
                              f"an object")
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"checkpoint {path} has format {meta.get('format')!r}, expected {FORMAT!r}")
    recorded = meta.get("payload_sha256")
    if recorded is not None and payload_sha256(tensors) != recorded:
        raise CheckpointError(f"checkpoint {path} is corrupted: its tensor data does not match the checksum in "
                              f"its header (sha256 {str(recorded)[:12]}...); restore it from a copy or retrain")
    for name, source in meta.get("aliases", {}).items():
        if source not in tensors:
            raise CheckpointError(f"checkpoint {path} names {name!r} an alias of {source!r}, which it does not hold")
        tensors[name] = tensors[source]
    return tensors, meta


def model_from_header(path: str | os.PathLike, spec: object, state: dict[str, Tensor]) -> nn.Module:
    """Build the model a checkpoint header names, treating the header as untrusted input: the name must be a
    registered, torchvision or timm model; the config an object of keys that the builder takes (torchvision and
    timm: only ``registry.EXTERNAL_CFG_KEYS``, never one that makes them read a file); and the model is first
    built on the meta device and compared with the tensors stored in the file, so that a header asking for huge
    widths is refused before anything is allocated."""
    from ..models import create_model
    from ..models.registry import EXTERNAL_CFG_KEYS
    if not isinstance(spec, dict) or not isinstance(spec.get("name"), str) or not spec["name"]:
        raise CheckpointError(f"checkpoint {path} records no model name; pass the model to load it into")
    name, cfg = spec["name"], spec.get("cfg", {})
    if not isinstance(cfg, dict):
        raise CheckpointError(f"checkpoint {path}: the header's model config is a {type(cfg).__name__}, expected "
                              f"an object of keyword arguments")
    if name.startswith(("torchvision:", "timm:")) and set(cfg) - EXTERNAL_CFG_KEYS:
        raise CheckpointError(f"checkpoint {path}: the header gives {name} the config keys "
                              f"{sorted(set(cfg) - EXTERNAL_CFG_KEYS)}; a checkpoint may only set "
                              f"{sorted(EXTERNAL_CFG_KEYS)} for torchvision/timm models")
    try:
        with torch.device("meta"):
            skeleton = create_model(name, **cfg)
    except (DyncnnError, TypeError, ValueError, RuntimeError, NotImplementedError) as e:
        raise CheckpointError(f"checkpoint {path}: the model its header describes ({name!r} {cfg}) cannot be "
                              f"built: {e}") from None
    check_state_dict(skeleton, state, source=f"checkpoint {path}")
    return create_model(name, **cfg)


def load_checkpoint(path: str | os.PathLike, model: nn.Module | None = None,
                    optimizer: torch.optim.Optimizer | None = None, restore_rng: bool = False,
                    ) -> tuple[nn.Module, dict]:
    """Load a checkpoint into ``model`` (built from the recorded name and config when None).

    Returns (model, metadata). A checkpoint of another model name, or with keys or shapes that differ, raises
    CheckpointError naming them; nothing is modified in that case.
    """
    tensors, meta = read_checkpoint(path)
    spec = meta.get("model") or {}
    state = {k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")}
    if model is None:
        model = model_from_header(path, spec, state)
    if not isinstance(spec, dict):
        raise CheckpointError(f"checkpoint {path}: the header's model entry is a {type(spec).__name__}, expected "
                              f"an object with the model's name and config")
    target = getattr(model, "module", model)
    own = model_spec(target)
    if own.get("name") and spec.get("name") and own["name"] != spec["name"]:
        raise CheckpointError(f"checkpoint {path} is of model {spec['name']!r} {spec.get('cfg', {})}, "
                              f"but the model given is {own['name']!r} {own.get('cfg', {})}")
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
    A file that is not a dyncnn checkpoint -- a torchvision / timm state dict (``.pth``, ``.pt``, ``.bin``, or a
    ``.safetensors`` without dyncnn's header) -- is loaded by :func:`dyncnn.models.pretrained.load_weights` (stem
    adapted, a classifier of other classes dropped; exits take their backbone's file).
    """
    if not _is_dyncnn_checkpoint(path):
        from ..models.pretrained import load_weights
        done = load_weights(model, path, model_spec(model).get("name", "model"))
        notes = [f"stem adapted: {', '.join(done['adapted_stem'])}" if done["adapted_stem"] else "",
                 f"classifier left new: {', '.join(done['dropped_classifier'])}" if done["dropped_classifier"] else ""]
        return done["into"] + "".join(f"; {n}" for n in notes if n)
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
