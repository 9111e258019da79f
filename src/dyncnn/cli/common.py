"""Helpers that several ``dyncnn`` subcommands share: help format, data arguments, ``--cfg``, output checks, model
loading, and the deployed model's shape, images and exit policy (export and bench)."""
from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

from ..errors import DyncnnError

# The one timing policy's thread count (profile.latency.DEFAULT_THREADS; not imported here: `--help` must not
# import torch).
THREADS = 2
FOLDER_DATASETS = ("folder", "imagefolder")     # the datasets whose image side is a setting (--image-size)


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Every option shows its default, unless its help already speaks of it or there is none to show."""

    def _get_help_string(self, action):
        text = action.help or ""
        if "default" in text or action.default is None or action.default is False or \
                action.default == argparse.SUPPRESS or not action.option_strings:
            return text
        return super()._get_help_string(action)


def _add_deployed_model_args(p: argparse.ArgumentParser) -> None:
    """The input, model-config and data arguments of the commands that export or time a checkpoint (bench,
    export)."""
    p.add_argument("--input-size", type=int, default=None, help="square input side (default: checkpoint's data "
                   "size, the model's published size, or 224)")
    p.add_argument("--in-chans", type=int, default=None, help="input channels (default: the model's)")
    p.add_argument("--cfg", nargs="*", metavar="KEY=VALUE", help="model keyword arguments")
    _add_data_args(p)
    p.add_argument("--dataset-override", action="store_true",
                   help="use --dataset/--data-root instead of the dataset recorded in the checkpoint")


def _add_data_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dataset", default="scaled_mnist",
                   help="embedded: mnist | scaled_mnist | scaled_mnist_large (128x128, small digits) | moving_digits "
                        "(clips) | mnist_rows (row sequences) | clip_features (clip frame sequences); local: "
                        "cifar10 | cifar100 | folder (an ImageFolder tree ROOT/[SPLIT/]CLASS/IMAGE, also called "
                        "imagefolder) (default: %(default)s)")
    p.add_argument("--data-root", default=None, help="folder of cifar10/cifar100/folder data (never downloaded)")
    p.add_argument("--image-size", type=int, default=224, help="folder: image side after resize and crop "
                   "(default: %(default)s)")
    p.add_argument("--canvas", type=int, default=64, help="scaled_mnist canvas side in pixels (default: %(default)s)")
    p.add_argument("--clutter", type=int, default=2, help="scaled_mnist clutter fragments (default: %(default)s)")
    p.add_argument("--frames", type=int, default=16, help="moving_digits frames per clip (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="data split and training seed (default: %(default)s)")


def _data_kwargs(args) -> dict:
    if args.dataset == "scaled_mnist":
        return {"canvas": args.canvas, "clutter": args.clutter}
    if args.dataset == "moving_digits":
        return {"canvas": args.canvas, "frames": args.frames}
    if args.dataset in FOLDER_DATASETS:
        return {"input_size": args.image_size}
    return {}


def _cli_data_cfg(args) -> dict:
    """The dataset configuration given on the command line."""
    return {"name": args.dataset, "root": args.data_root, "seed": args.seed, **_data_kwargs(args)}


def _data_cfg_for(args, meta: dict) -> dict:
    """The dataset a checkpoint was trained on (from its metadata), or the command line's with
    ``--dataset-override`` or when the checkpoint records none."""
    recorded = {k: v for k, v in (meta.get("data") or {}).items()
                if k != "input_size" or (meta.get("data") or {}).get("name") in FOLDER_DATASETS}
    return _cli_data_cfg(args) if getattr(args, "dataset_override", False) or not recorded else recorded


def _dataset(args, split: str, data_cfg: dict | None = None):
    from ..data import get_dataset
    cfg = data_cfg or _cli_data_cfg(args)
    cfg = dict(cfg)
    return get_dataset(cfg.pop("name"), split, **cfg)


def _parse_cfg(items: list[str] | None) -> dict:
    """KEY=VALUE pairs (values parsed as JSON when possible) into model keyword arguments."""
    cfg = {}
    for item in items or []:
        if "=" not in item:
            raise DyncnnError(f"--cfg expects KEY=VALUE, got {item!r}")
        key, value = item.split("=", 1)
        try:
            cfg[key] = json.loads(value)
        except json.JSONDecodeError:
            cfg[key] = value
    return cfg


def _is_bundle(spec: str) -> bool:
    """An exported bundle folder (``dyncnn export --out DIR``): it holds a manifest.json."""
    return (Path(spec) / "manifest.json").is_file()


def _not_a_bundle(spec: str, expected: str) -> None:
    """Refuse an exported bundle, a file of one or an exported graph where ``expected`` (a checkpoint, a model) is
    needed, saying what it is and which commands take it."""
    p = Path(spec)
    folder = p if _is_bundle(spec) else p.parent if p.is_file() and _is_bundle(str(p.parent)) else None
    if folder is not None:
        what = "a bundle (exported model)" if folder == p else f"a file of the bundle (exported model) {folder}"
        raise DyncnnError(f"{spec} is {what}, not {expected}: use `dyncnn bench {folder}` or "
                          f"`dyncnn profile {folder}`")
    if p.suffix in (".onnx", ".pte"):
        raise DyncnnError(f"{spec} is an exported graph ({p.suffix}), not {expected}: dyncnn runs exported models "
                          f"as bundles, the folder `dyncnn export` writes (with manifest.json): use `dyncnn bench "
                          f"DIR` or `dyncnn profile DIR`")


def _cfg_item(key: str, value) -> str:
    return f"{key}={value if isinstance(value, str) else json.dumps(value)}"


def _create_model(name: str, cfg: dict, fixed: dict | None = None, defaults: dict | None = None):
    """``create_model`` at the CLI boundary. ``fixed`` maps the keyword arguments that other flags set to (value,
    flag): a ``--cfg`` item for one of them is refused naming the flag. ``defaults`` are keyword arguments that
    ``--cfg`` may override. A ``--cfg`` value that the model rejects (its ValueError, TypeError or RuntimeError, or
    empty weights from a size of 0) is reported naming the ``--cfg`` items, not as a traceback."""
    import warnings

    from ..models import create_model
    from ..models.registry import UnknownModelError
    fixed = fixed or {}
    for key in cfg:
        if key in fixed:
            value, flag = fixed[key]
            raise DyncnnError(f"--cfg {_cfg_item(key, cfg[key])}: {key} is set by {flag} ({value}); drop it from --cfg")
    kwargs = {**(defaults or {}), **cfg, **{k: v for k, (v, _) in fixed.items()}}
    if not cfg:
        return create_model(name, **kwargs)

    def items(message: str) -> str:        # the items the message speaks of, else all of them
        named = [k for k in cfg if re.search(rf"\b{re.escape(k)}\b", message)] or list(cfg)
        return " ".join(_cfg_item(k, cfg[k]) for k in named)
    try:
        with warnings.catch_warnings():     # a size of 0: torch warns while it initialises the empty weights
            warnings.filterwarnings("ignore", message="Initializing zero-element tensors")
            model = create_model(name, **kwargs)
    except UnknownModelError:
        raise
    except (TypeError, ValueError, RuntimeError) as e:
        raise DyncnnError(f"--cfg {items(str(e))}: {e}") from e
    empty = [f"{n} {tuple(p.shape)}" for n, p in model.named_parameters() if p.numel() == 0]
    if empty:
        raise DyncnnError(f"--cfg {items('')}: {name} built with it has empty weights ({', '.join(empty[:2])}); "
                          f"expected sizes and counts of at least 1")
    return model


def _writable_folder(path: Path, flag: str = "--out") -> Path:
    """Check before any work that ``path`` can be a folder we write into: not an existing file, creatable,
    writable."""
    import os
    if path.exists() and not path.is_dir():
        raise DyncnnError(f"{flag} {path} is an existing file; expected a folder (new, or one to write into)")
    probe = path if path.exists() else next((p for p in path.parents if p.exists()), Path("."))
    if not probe.is_dir() or not os.access(probe, os.W_OK | os.X_OK):
        raise DyncnnError(f"{flag} {path}: cannot write into {probe} (permission denied or not a folder)")
    return path


def _writable_file(path: Path, flag: str = "--out") -> Path:
    """Check before any work that ``path`` can be written as a file: not a folder, its folder writable."""
    import os
    if path.is_dir():
        raise DyncnnError(f"{flag} {path} is a folder; expected a file name (e.g. {path / 'thresholds.json'})")
    parent = next((p for p in [path.parent, *path.parent.parents] if p.exists()), Path("."))
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK) or \
            (path.exists() and not os.access(path, os.W_OK)):
        raise DyncnnError(f"{flag} {path}: cannot write there (permission denied)")
    return path


def _file_sha256(path: str | Path) -> str | None:
    """SHA-256 of a checkpoint file (``last.safetensors`` of a folder), None when it is not a file."""
    from ..export.staged import sha256_file
    p = Path(path)
    p = p / "last.safetensors" if p.is_dir() else p
    return sha256_file(p) if p.is_file() else None


def _load_model(spec: str, num_classes: int | None = None, cfg: dict | None = None):
    """A registered model name, ``torchvision:``/``timm:`` name, or a checkpoint path."""
    _not_a_bundle(spec, "a model name or checkpoint")
    if spec.endswith(".safetensors") or Path(spec).is_dir():
        from ..train import load_checkpoint
        model, meta = load_checkpoint(spec)
        return model, meta
    fixed = {"num_classes": (num_classes, "the data")} if num_classes is not None else None
    return _create_model(spec, cfg or {}, fixed), {}


def _input_shape(model, input_size: int | None, in_chans: int | None, meta: dict) -> tuple[int, int, int]:
    data = meta.get("data", {})
    from ..dynamic.backbone import input_channels
    c = in_chans or input_channels(model, default=3)
    s = input_size or data.get("input_size") or 224
    return c, s, s


def _device(args):
    """The torch.device of ``--device`` (DyncnnError for an unknown or absent one)."""
    from ..train.device import resolve_device
    return resolve_device(args.device)


# `dyncnn export` and `dyncnn bench`: the input shape, real images and exit policy of the model deployed
def _deploy_shape(model, args, meta: dict) -> tuple[int, int, int]:
    """(C, H, W) of the export: --in-chans/--input-size, else the checkpoint's data size, the model's published
    input size, 224."""
    from ..models import published_figures
    name = (meta.get("model") or {}).get("name") or args.model
    size = args.input_size or (meta.get("data") or {}).get("input_size")
    if size is None and not name.startswith(("torchvision:", "timm:")) and not name.endswith(".safetensors"):
        size = published_figures(name).get("input_size")
    return _input_shape(model, size, args.in_chans, meta)


def _deploy_images(args, model, meta: dict, shape: tuple[int, int, int], split: str, n: int):
    """Up to ``n`` real images of ``split`` shaped ``shape``, and their labels: the checkpoint's dataset (or
    --dataset). Images of another size or a single channel are resized / channel-repeated to fit the model; the
    labels are then None (they mean nothing to such a model), as they are when the class counts differ."""
    import torch
    import torch.nn.functional as F
    data_cfg = _data_cfg_for(args, meta)
    ds = _dataset(args, split, data_cfg)
    idx = range(min(n, len(ds)))
    x = torch.stack([ds[i][0] for i in idx])
    y = torch.as_tensor([int(ds[i][1]) for i in idx])
    fits = tuple(x.shape[1:]) == tuple(shape) and getattr(model, "num_classes", None) == ds.num_classes
    if tuple(x.shape[2:]) != tuple(shape[1:]):
        x = F.interpolate(x, size=shape[1:], mode="bilinear", align_corners=False)
    if x.shape[1] != shape[0]:
        if x.shape[1] != 1:
            raise DyncnnError(f"cannot adapt {x.shape[1]}-channel images of {data_cfg['name']} to a "
                              f"{shape[0]}-channel model; pass --dataset with matching images")
        x = x.repeat(1, shape[0], 1, 1)
    return x.contiguous(), (y if fits else None)


def _deploy_policy(args, model, meta: dict):
    """The exit policy of a multi-exit model: --thresholds, else thresholds.json beside the checkpoint, else
    (``--budget``) thresholds calibrated on the validation split, else full depth. Returns (policy, source)."""
    import torch

    from ..dynamic.calibration import calibrate, load_thresholds
    from ..dynamic.policy import ExitPolicy
    path = Path(args.thresholds) if args.thresholds else None
    if path is None and Path(args.model).suffix == ".safetensors":
        beside = Path(args.model).with_name("thresholds.json")
        path = beside if beside.exists() else None
    if path is not None:
        ckpt = args.model if args.model.endswith(".safetensors") or Path(args.model).is_dir() else None
        return load_thresholds(path, model, checkpoint_sha256=_file_sha256(ckpt) if ckpt else None)[0], str(path)
    if not getattr(args, "calibrate", False):
        return ExitPolicy.never(model.num_exits), "full depth (no thresholds given)"
    x, y = _deploy_images(args, model, meta, _deploy_shape(model, args, meta), "val", 500)
    y = y if y is not None else torch.zeros(len(x), dtype=torch.int64)   # scores only: accuracy is not reported
    cum = model.exit_macs(x[:1])
    if args.budget is None:      # halfway between the first exit and full depth: feasible for any network
        target, what = (cum[0] + cum[-1]) / 2, "halfway between the first exit's and full-depth MACs"
    else:
        target, what = args.budget * cum[-1], f"{args.budget:.0%} of full-depth MACs"
    record = calibrate(model, list(zip(x, y.tolist())), target_macs=target)
    return (ExitPolicy(record["thresholds"], record["criterion"], record["temperatures"]),
            f"calibrated on the validation split for {what}")


def _takes_exit_policy(model) -> bool:
    """Multi-exit networks and glance-and-focus networks (exits between steps, their own bundle writer) both run
    under an exit policy: --thresholds / --budget apply to either."""
    from ..export import is_multi_exit, own_writer
    return is_multi_exit(model) or own_writer(model) is not None
