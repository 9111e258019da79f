"""The ``dyncnn`` command: zoo, profile, train, eval, demo."""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from .errors import DyncnnError

# The one timing policy's thread count (profile.latency.DEFAULT_THREADS; not imported here: `--help` must not
# import torch).
THREADS = 2


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Every option shows its default, unless its help already speaks of it or there is none to show."""

    def _get_help_string(self, action):
        text = action.help or ""
        if "default" in text or action.default is None or action.default is False or \
                action.default == argparse.SUPPRESS or not action.option_strings:
            return text
        return super()._get_help_string(action)


def _add_data_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dataset", default="scaled_mnist",
                   help="embedded: mnist | scaled_mnist | scaled_mnist_large (128x128, small digits) | moving_digits "
                        "(clips) | mnist_rows (row sequences) | clip_features (clip frame sequences); local: cifar10 | cifar100 | imagefolder "
                        "(default: %(default)s)")
    p.add_argument("--data-root", default=None, help="folder of cifar10/cifar100/imagefolder data (never downloaded)")
    p.add_argument("--canvas", type=int, default=64, help="scaled_mnist canvas side in pixels (default: %(default)s)")
    p.add_argument("--clutter", type=int, default=2, help="scaled_mnist clutter fragments (default: %(default)s)")
    p.add_argument("--frames", type=int, default=16, help="moving_digits frames per clip (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="data split and training seed (default: %(default)s)")


def _data_kwargs(args) -> dict:
    if args.dataset == "scaled_mnist":
        return {"canvas": args.canvas, "clutter": args.clutter}
    if args.dataset == "moving_digits":
        return {"canvas": args.canvas, "frames": args.frames}
    return {}


def _cli_data_cfg(args) -> dict:
    """The dataset configuration given on the command line."""
    return {"name": args.dataset, "root": args.data_root, "seed": args.seed, **_data_kwargs(args)}


def _data_cfg_for(args, meta: dict) -> dict:
    """The dataset a checkpoint was trained on (from its metadata), or the command line's with
    ``--dataset-override`` or when the checkpoint records none."""
    recorded = {k: v for k, v in (meta.get("data") or {}).items() if k != "input_size"}
    return _cli_data_cfg(args) if getattr(args, "dataset_override", False) or not recorded else recorded


def _dataset(args, split: str, data_cfg: dict | None = None):
    from .data import get_dataset
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


RUN_FILES = ("last.safetensors", "last.json", "best.safetensors", "best.json", "metrics.jsonl")


def _existing_run(out: Path) -> list[str]:
    """The files of an earlier training run in ``out`` (or in its stage subfolders, for multi-stage models)."""
    if not out.is_dir():
        return []
    found = [f for f in RUN_FILES if (out / f).exists()]
    found += [f"{d.name}/{f}" for d in sorted(out.iterdir()) if d.is_dir() for f in RUN_FILES if (d / f).exists()]
    return found


def _check_train_out(args) -> None:
    """Refuse to train into a folder that holds another run unless told what to do with it; with
    ``--overwrite``, remove that run's files first (nothing else in the folder is touched)."""
    out = _writable_folder(Path(args.out))
    found = _existing_run(out)
    if not found or args.resume:
        return
    if not args.overwrite:
        raise DyncnnError(f"--out {out} already holds a training run ({', '.join(found[:4])}); pass --resume to "
                          f"continue it, --init {out / 'last.safetensors'} with a new --out to start a new run from "
                          f"its weights, or --overwrite to replace it")
    for f in found:
        (out / f).unlink(missing_ok=True)


def _file_sha256(path: str | Path) -> str | None:
    """SHA-256 of a checkpoint file (``last.safetensors`` of a folder), None when it is not a file."""
    from .export.staged import sha256_file
    p = Path(path)
    p = p / "last.safetensors" if p.is_dir() else p
    return sha256_file(p) if p.is_file() else None


def _load_model(spec: str, num_classes: int | None = None, cfg: dict | None = None):
    """A registered model name, ``torchvision:``/``timm:`` name, or a checkpoint path."""
    from .models import create_model
    if spec.endswith(".safetensors") or Path(spec).is_dir():
        from .train import load_checkpoint
        model, meta = load_checkpoint(spec)
        return model, meta
    return create_model(spec, num_classes=num_classes, **(cfg or {})), {}


def _input_shape(model, input_size: int | None, in_chans: int | None, meta: dict) -> tuple[int, int, int]:
    data = meta.get("data", {})
    c = in_chans or getattr(model, "in_chans", None) or 3
    s = input_size or data.get("input_size") or 224
    return c, s, s


def _zoo_row(name: str, input_size: int | None) -> dict:
    """Parameters and MACs of one registered model at its own default input (image, clip or sequence)."""
    import torch

    from .models import create_model, published_figures
    from .profile import count_macs, example_input
    pub = published_figures(name)
    # e.g. CondenseNet: the published figures are those of the converted inference network
    model = create_model(name, **pub.get("profile_cfg", {}))
    kind, shape = example_input(model, input_size, pub.get("input_size"))
    r = count_macs(model, torch.randn(1, *shape))
    return {"model": name, "input_kind": kind, "input_shape": list(shape),
            "input": shape[-1] if kind != "sequence" else None, "params_m": r.params / 1e6, "macs_m": r.total / 1e6,
            "published_params_m": pub["params"] / 1e6 if "params" in pub else None,
            "published_macs_m": pub["macs"] / 1e6 if "macs" in pub else None}


def zoo_cache_dir() -> Path:
    """Where ``dyncnn zoo`` keeps its measured rows: ``$XDG_CACHE_HOME/dyncnn``, else ``~/.cache/dyncnn``."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "dyncnn"


def _zoo_cache_file(torch_version: str) -> Path:
    """One file per dyncnn and torch version: a new release (or torch) never reads an older one's figures."""
    from . import __version__
    safe = "".join(ch if ch.isalnum() or ch in ".-" else "_" for ch in f"{__version__}-torch{torch_version}")
    return zoo_cache_dir() / f"zoo-{safe}.json"


def _zoo_cache_key(name: str, input_size: int | None) -> str:
    """Model name and requested input side (``default``: the model's own input, which its code fixes)."""
    return f"{name}@{input_size if input_size is not None else 'default'}"


def _read_zoo_cache(path: Path) -> dict[str, dict]:
    """The cached rows, or none when the file is missing or unreadable (a cache is never worth an error)."""
    try:
        rows = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return rows if isinstance(rows, dict) else {}


def _write_zoo_cache(path: Path, rows: dict[str, dict]) -> None:
    """Write to a temporary file in the same folder, then rename it over the cache: a reader (or a second
    ``dyncnn zoo``) sees the old file or the new one, never half of one. Failing to write only costs the cache."""
    import tempfile
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile("w", dir=path.parent, prefix=path.name + ".", suffix=".tmp",
                                         delete=False) as f:
            tmp = f.name
            json.dump(rows, f, indent=1, sort_keys=True)
        os.replace(tmp, path)
    except OSError as e:
        print(f"dyncnn zoo: cannot write the cache {path}: {e.strerror or e}", file=sys.stderr)
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)


def cmd_zoo(args) -> int:
    import contextlib

    import torch
    from tqdm.auto import tqdm

    from .models import list_models
    cache_path = _zoo_cache_file(torch.__version__)
    cache = {} if args.no_cache else _read_zoo_cache(cache_path)
    rows, failed = [], []
    # stdout carries the table or the JSON only: progress, warnings and anything a model prints go to stderr;
    # the bar shows only when stderr is a terminal (disable=None), so logs get no carriage-return fragments
    with contextlib.redirect_stdout(sys.stderr):
        for name in tqdm(list_models(args.pattern), desc="profiling", leave=False, file=sys.stderr, disable=None):
            key = _zoo_cache_key(name, args.input_size)
            if key in cache:
                rows.append(cache[key])
                continue
            try:
                row = _zoo_row(name, args.input_size)
            except Exception as e:  # noqa: BLE001 - one model that cannot be profiled must not hide the others
                failed.append(name)
                rows.append({"model": name, "error": f"{type(e).__name__}: {e}"})
                print(f"dyncnn zoo: {name}: {type(e).__name__}: {e}", file=sys.stderr)
                continue
            rows.append(row)
            cache[key] = row
            _write_zoo_cache(cache_path, cache)     # after each model: an interrupted listing keeps what it measured
    if args.json:
        print(json.dumps(rows, indent=2))
        return 1 if failed else 0

    def fmt(v):
        return f"{v:.2f}" if v is not None else "-"
    print("| model | input | params (M) | MACs (M) | published params (M) | published MACs (M) |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        if "error" in r:
            print(f"| {r['model']} | - | - | - | - | - |")
            continue
        shape = "x".join(map(str, r["input_shape"]))
        print(f"| {r['model']} | {r['input_kind']} {shape} | {fmt(r['params_m'])} | {fmt(r['macs_m'])} | "
              f"{fmt(r['published_params_m'])} | {fmt(r['published_macs_m'])} |")
    return 1 if failed else 0


def _device(args):
    """The torch.device of ``--device`` (DyncnnError for an unknown or absent one)."""
    from .train.device import resolve_device
    return resolve_device(args.device)


def cmd_profile(args) -> int:
    import torch

    from .profile import count_macs, measure_latency, peak_memory
    if _is_bundle(args.model):
        return _profile_bundle(args)
    model, meta = _load_model(args.model, cfg=_parse_cfg(args.cfg))
    shape = _input_shape(model, args.input_size, args.in_chans, meta)
    x = torch.randn(1, *shape)
    macs = count_macs(model, x)
    mem = peak_memory(model, x)
    result = {"model": args.model, "input_shape": list(shape), "macs": macs.total, "params": macs.params,
              "peak_activation_mb": mem.peak_activation_bytes / 2**20, "param_mb": mem.param_bytes / 2**20,
              "threads": args.threads, "latency": []}
    backends = ["eager"] + (["optimized"] if args.optimize else []) + ([] if args.no_onnx else ["onnxruntime"])
    device = _device(args)
    result["device"] = device.type
    for backend in backends:
        timed = model
        if backend == "optimized":                  # the same eager model, BatchNorm folded, channels-last
            from .layers.fusion import optimize_for_inference
            timed = optimize_for_inference(model.eval())
        stats = measure_latency(timed, x, args.batch_sizes, threads=args.threads,
                                backend="onnxruntime" if backend == "onnxruntime" else "eager",
                                min_time_s=args.min_time, device=device if backend != "onnxruntime" else "cpu")
        rows = [s.as_dict() for s in stats.values()]
        if backend == "optimized":
            for r in rows:
                r["mode"] = "BN folded, channels-last"
        result["latency"] += rows
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    print(f"model: {args.model}   input: 1x{shape[0]}x{shape[1]}x{shape[2]}   threads: {args.threads}"
          + (f"   eager on {device}" if device.type != "cpu" else ""))
    print(f"MACs: {macs.total / 1e6:.2f}M   params: {macs.params / 1e6:.3f}M   "
          f"peak activations (batch 1): {result['peak_activation_mb']:.2f} MiB   weights: {result['param_mb']:.2f} MiB")
    _print_latency(result["latency"])
    return 0


def _print_latency(rows: list[dict]) -> None:
    """The latency table of `dyncnn profile`, and the one-line warning when the spread is large."""
    from .profile.latency import spread_warning
    print("| backend | batch | median ms | IQR ms | ms/sample | runs |")
    print("|---|---|---|---|---|---|")
    for s in rows:
        print(f"| {s['backend']}{' (' + s['mode'] + ')' if s.get('mode') else ''} | {s['batch_size']} | "
              f"{s['median_ms']:.2f} | {s['spread_ms']:.2f} | {s['median_ms'] / s['batch_size']:.3f} | {s['runs']} |")
    warning = spread_warning(rows)
    if warning:
        print(warning)


def _profile_bundle(args) -> int:
    """`dyncnn profile DIR` of an exported bundle: the manifest's MACs and ONNX Runtime latency."""
    from .export.bench import profile_bundle
    from .export.runtime import _read_manifest
    if args.cfg or args.no_onnx:
        raise DyncnnError("--cfg and --no-onnx do not apply to an exported bundle (its graphs are fixed, and ONNX "
                          "Runtime is what runs them)")
    shape = [int(s) for s in _read_manifest(Path(args.model))["input"]["shape"][1:]]
    if (args.input_size not in (None, shape[1])) or (args.in_chans not in (None, shape[0])):
        raise DyncnnError(f"bundle {args.model} was exported for inputs {'x'.join(map(str, shape))}; its input size "
                          f"is fixed (drop --input-size/--in-chans, or export again)")
    result = profile_bundle(args.model, args.batch_sizes, threads=args.threads, min_time_s=args.min_time)
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    print(f"bundle: {args.model} ({result['bundle_kind']}, {result['model_class']})   input: 1x{shape[0]}x{shape[1]}"
          f"x{shape[2]}   threads: {args.threads}   ONNX Runtime, median and IQR of repeated runs after warm-up")
    exits = (f" at full depth; per exit (cumulative): {', '.join(f'{m / 1e6:.2f}M' for m in result['exit_macs'])}"
             if result["exit_macs"] else "")
    print(f"MACs (from the manifest): {result['macs'] / 1e6:.2f}M{exits}")
    print(f"weights in the FP32 graphs: {result['params'] / 1e6:.3f}M   bundle on disk: {result['bundle_mb']:.2f} MiB")
    _print_latency(result["latency"])
    if result["exit_macs"]:
        print(f"(random inputs at full depth; `dyncnn bench {args.model}` times the exit policy on real images)")
    return 0


def cmd_train(args) -> int:
    import torch

    from .models import create_model
    from .train import TrainConfig
    _check_train_out(args)
    train_set, val_set = _dataset(args, "train"), _dataset(args, "val")
    cfg = _parse_cfg(args.cfg)
    if not args.model.startswith(("torchvision:", "timm:")):
        cfg.setdefault("in_chans", train_set.in_chans)   # dyncnn models take in_chans; external ones may not
        if hasattr(train_set, "frames"):                  # clips: the temporal models are built for T frames
            cfg.setdefault("frames", train_set.frames)
    torch.manual_seed(args.seed)         # the initial weights are part of what --seed fixes
    model = create_model(args.model, num_classes=train_set.num_classes, **cfg)
    if args.init:
        from .train.checkpoint import init_from_checkpoint
        part = init_from_checkpoint(model, args.init)
        print(f"initialised {part} from {args.init}")
    config = TrainConfig(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, optimizer=args.optimizer,
                         weight_decay=args.weight_decay, label_smoothing=args.label_smoothing, seed=args.seed,
                         warmup_epochs=args.warmup_epochs, find_unused_parameters=args.find_unused_parameters,
                         device=args.device, amp=args.amp, num_workers=args.workers)
    data_cfg = _cli_data_cfg(args)
    extra = {"data": {**data_cfg, "input_size": train_set.input_size}}
    # One Trainer run, or the family's recipe (e.g. glance-and-focus: encoders, then the policy, then fine-tuning,
    # each stage in a subfolder of --out; the last stage's checkpoint is the model's).
    from .train.recipes import fit_model
    result = fit_model(model, train_set, val_set, config, out_dir=args.out, resume=args.resume, extra=extra)
    from .train.distributed import is_main_process
    if not is_main_process():       # under torchrun: the other processes have no validation figures to report
        return 0
    print(f"trained {args.model} for {result.steps} steps in {result.seconds:.1f}s: "
          f"final val acc {result.final_val_acc:.4f}, best {result.best_val_acc:.4f}; checkpoints in {args.out}")
    return 0


def cmd_eval(args) -> int:
    from .train import evaluate, load_checkpoint
    model, meta = load_checkpoint(args.checkpoint)
    model.to(_device(args))          # evaluation follows the model's device
    data_cfg = _data_cfg_for(args, meta)
    dataset = _dataset(args, args.split, data_cfg)
    if args.budget or args.anytime:
        return _eval_dynamic(args, model, dataset)
    from .dynamic.evaluation import evaluate_dynamic, format_dynamic
    from .dynamic.protocols import is_gated
    if is_gated(model):       # layer skipping, channel gating, experts, routing, pixel masks: executed inference
        result = evaluate_dynamic(model, dataset, progress=True)
        result.update(checkpoint=str(args.checkpoint), split=args.split, dataset=data_cfg["name"])
        print(json.dumps(result, indent=2) if args.json else
              f"{args.checkpoint}: {data_cfg['name']} {args.split}: " + format_dynamic(result))
        return 0
    result = evaluate(model, dataset)
    result.update(checkpoint=str(args.checkpoint), split=args.split, dataset=data_cfg["name"])
    print(json.dumps(result, indent=2) if args.json else
          f"{args.checkpoint}: {data_cfg['name']} {args.split}: accuracy {result['acc']:.4f}, "
          f"loss {result['loss']:.4f} on {result['n']} samples")
    return 0


def _eval_dynamic(args, model, dataset) -> int:
    import torch
    from torch.utils.data import DataLoader

    from .dynamic.budget import anytime, collect_exit_logits
    from .dynamic.calibration import load_thresholds
    from .dynamic.protocols import HasExits
    if not isinstance(model, HasExits):
        raise DyncnnError(f"--budget/--anytime need a multi-exit network; {type(model).__name__} has no exits")
    out: dict = {"checkpoint": str(args.checkpoint), "split": args.split}
    if args.anytime:
        logits, targets = collect_exit_logits(model, dataset)
        cum = model.exit_macs(dataset[0][0].unsqueeze(0).to(next(model.parameters()).device))
        out["anytime"] = [{"exit": k + 1, "macs": m, "accuracy": a}
                          for k, (m, a) in enumerate(anytime(logits.argmax(-1) == targets, cum))]
    if args.budget:
        policy, record = load_thresholds(args.budget, model, checkpoint_sha256=_file_sha256(args.checkpoint))
        correct, macs, exits = 0, [], []
        device = next(model.parameters()).device
        for x, y in DataLoader(dataset, batch_size=256):
            r = model.infer(x.to(device), policy)
            correct += int((r.logits.argmax(1).cpu() == torch.as_tensor(y)).sum())
            macs.append(r.macs.cpu())
            exits.append(r.exit_index.cpu())
        macs, exits = torch.cat(macs), torch.cat(exits)
        out["budget"] = {"thresholds_file": str(args.budget), "accuracy": correct / len(macs),
                         "mean_macs": float(macs.double().mean()), "full_macs": record["exit_macs"][-1],
                         "exit_histogram": torch.bincount(exits, minlength=model.num_exits).tolist(),
                         "n": len(macs)}
    if args.json:
        print(json.dumps(out, indent=2))
        return 0
    if "anytime" in out:
        print("| exit | cumulative MACs | accuracy |\n|---|---|---|")
        for r in out["anytime"]:
            print(f"| {r['exit']} | {r['macs'] / 1e6:.3f}M | {r['accuracy']:.4f} |")
    if "budget" in out:
        b = out["budget"]
        print(f"budgeted ({args.budget}): accuracy {b['accuracy']:.4f}, mean MACs {b['mean_macs'] / 1e6:.3f}M "
              f"({b['mean_macs'] / b['full_macs']:.0%} of full depth), exits {b['exit_histogram']} on {b['n']} samples")
    return 0


def _parse_macs(text: str) -> float:
    """'1.5M', '300k', '2e6' -> MACs."""
    scale = {"k": 1e3, "m": 1e6, "g": 1e9}.get(text[-1].lower(), 1.0)
    try:
        return float(text[:-1] if scale != 1.0 else text) * scale
    except ValueError:
        raise DyncnnError(f"--budget-macs expects a number such as 1.5M or 300k, got {text!r}") from None


def cmd_calibrate(args) -> int:
    from .dynamic.calibration import calibrate, save_thresholds
    from .train import load_checkpoint
    ckpt = Path(args.checkpoint)
    # beside the checkpoint, inside the run folder (a folder given as the checkpoint is the run folder)
    out = _writable_file(Path(args.out) if args.out else
                         (ckpt / "thresholds.json" if ckpt.is_dir() else ckpt.with_name("thresholds.json")))
    model, meta = load_checkpoint(args.checkpoint)
    model.to(_device(args))
    data_cfg = _data_cfg_for(args, meta)
    val = _dataset(args, "val", data_cfg)
    latency = None
    if args.budget_ms is not None:
        if args.budget_ms <= 0:
            raise DyncnnError(f"--budget-ms must be a positive number of milliseconds, got {args.budget_ms}")
        latency = _exit_latency_table(model, val, args)
    record = calibrate(model, val, target_macs=_parse_macs(args.budget_macs) if args.budget_macs else None,
                       target_fraction=args.budget, target_accuracy=args.target_accuracy, criterion=args.criterion,
                       target_ms=args.budget_ms, latency_ms=latency)
    record["checkpoint_sha256"] = _file_sha256(ckpt)     # eval/export refuse it for another checkpoint
    save_thresholds(record, out)
    print(f"thresholds for {record['num_exits']} exits written to {out}: val accuracy {record['val_accuracy']:.4f} "
          f"at {record['val_mean_macs'] / 1e6:.3f}M mean MACs ({record['val_mean_macs'] / record['exit_macs'][-1]:.0%}"
          f" of full depth)")
    if latency is not None:
        print(f"predicted mean latency on the validation split: {record['val_predicted_ms']:.4f} ms per image "
              f"(batch 1, ONNX Runtime, {args.threads} thread(s); full depth {latency[-1]:.4f} ms)")
    return 0


def _exit_latency_table(model, val, args) -> list[float]:
    """Cumulative batch-1 ONNX Runtime latency of leaving at each exit: read from ``--bundle`` when it holds a
    measurement for ``--threads``, else measured on the validation images (and stored in that bundle, or in a
    temporary export)."""
    import tempfile
    import torch
    from .export import export_bundle, load_bundle
    from .export.runtime import record_stage_latency, stage_latency_table
    images = torch.stack([val[i][0] for i in range(min(64, len(val)))])
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(args.bundle) if args.bundle else Path(tmp) / "bundle"
        if not args.bundle:
            export_bundle(model, folder, tuple(images.shape[1:]))
        else:
            from .export.runtime import _read_manifest
            table = stage_latency_table(_read_manifest(folder), args.threads)
            if table is not None:
                print(f"exit latencies from {folder}/manifest.json ({args.threads} thread(s)): "
                      + ", ".join(f"{t:.4f}" for t in table) + " ms")
                return table
        bundle = load_bundle(folder, threads=args.threads)
        with torch.inference_mode():
            ms = bundle.stage_latency_ms(images.numpy(), repeats=3)
        manifest = record_stage_latency(folder, ms, args.threads)
        table = stage_latency_table(manifest, args.threads)
        print(f"measured exit latencies ({args.threads} thread(s), batch 1, ONNX Runtime, {len(images)} validation "
              f"images): " + ", ".join(f"{t:.4f}" for t in table) + " ms")
        return table


def cmd_frontier(args) -> int:
    from .frontier.runner import FrontierSettings, merge_runs, run_frontier
    if args.merge:
        merge_runs(args.merge, args.out)
        print((Path(args.out) / "frontier.md").read_text().split("\n## ")[0])
        return 0
    canvas = args.canvas or (128 if args.preset == "phone" else 64)
    settings = FrontierSettings(out=Path(args.out), preset=args.preset, canvas=canvas, clutter=args.clutter,
                                data_seed=args.seed, seeds=tuple(args.seeds), epochs=args.epochs,
                                threads=tuple(args.threads), batch_sizes=tuple(args.batch_sizes),
                                rounds=args.rounds, single_images=args.single_images,
                                batch_images=args.batch_images, eager=not args.no_eager,
                                device=args.device, only_train=args.only_train, lr=args.lr,
                                test_repeats=args.test_repeats, runtime=args.runtime)
    run_frontier(settings)
    return 0


def cmd_demo(args) -> int:
    from .demo import run_demo
    run_demo(out_dir=Path(args.out), epochs=args.epochs, threads=args.threads)
    return 0


def _deploy_shape(model, args, meta: dict) -> tuple[int, int, int]:
    """(C, H, W) of the export: --in-chans/--input-size, else the checkpoint's data size, the model's published
    input size, 224."""
    from .models import published_figures
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

    from .dynamic.calibration import calibrate, load_thresholds
    from .dynamic.policy import ExitPolicy
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
    from .export import is_multi_exit, own_writer
    return is_multi_exit(model) or own_writer(model) is not None


def _untrained_warning(spec: str) -> None:
    if not (spec.endswith(".safetensors") or Path(spec).is_dir()):
        print(f"warning: {spec} is a model name, not a checkpoint: the bundle holds its initial (random, untrained) "
              f"weights; pass a checkpoint from `dyncnn train` (e.g. OUT/best.safetensors) to export a trained "
              f"model", file=sys.stderr)


def _list_files(folder: str) -> None:
    """The files of a bundle folder with their sizes (a user should not find a 30 MB single.onnx by surprise)."""
    files = sorted(f for f in Path(folder).rglob("*") if f.is_file())
    total = sum(f.stat().st_size for f in files)
    print(f"wrote {len(files)} files, {_size(total)} in all:")
    for f in files:
        print(f"  {f.relative_to(folder)}  {_size(f.stat().st_size)}")


def _size(n: int) -> str:
    return f"{n / 2**20:.1f} MB" if n >= 2**20 else f"{n / 2**10:.1f} kB" if n >= 2**10 else f"{n} B"


def cmd_export(args) -> int:
    from .export import export_bundle, own_writer
    _writable_folder(Path(args.out))
    model, meta = _load_model(args.model, cfg=_parse_cfg(args.cfg))
    _untrained_warning(args.model)
    model.eval()
    shape = _deploy_shape(model, args, meta)
    policy, source = (_deploy_policy(args, model, meta) if _takes_exit_policy(model) else (None, None))
    if own_writer(model) is not None:       # glance-and-focus: glance/focus graphs + a driver that crops patches
        real, _ = _deploy_images(args, model, meta, shape, "val", 16)
        # export_bundle refuses what such a bundle cannot hold (another runtime, INT8, the single graph)
        manifest = export_bundle(model, args.out, shape, policy=policy, check_inputs=[real[:16]],
                                 quantize=args.quantize, single_graph=args.single_graph,
                                 runtime=args.runtime, data=meta.get("data"))
        print(json.dumps(manifest, indent=2, allow_nan=True) if args.json else
              f"exported {args.model} (glance, {len(manifest['graphs'])} ONNX graphs) to {args.out}; max relative "
              f"error against eager {manifest['check']['max_rel_err']:.1e}; exit policy: {source}")
        if not args.json:
            _list_files(args.out)
        return 0
    real, _ = _deploy_images(args, model, meta, shape, "val", max(args.calib_images, 16))
    manifest = export_bundle(model, args.out, shape, policy=policy, check_inputs=[real[:16]],
                             quantize=args.quantize, calibration=real[:args.calib_images],
                             single_graph=args.single_graph, runtime=args.runtime, max_batch=args.max_batch,
                             data=meta.get("data"))
    if args.json:
        print(json.dumps(manifest, indent=2, allow_nan=True))
        return 0
    graphs = sum(1 for e in manifest.get("stages", []) if e["files"]) or 1
    unit = "ExecuTorch (XNNPACK) program" if args.runtime == "executorch" else "ONNX graph"
    print(f"exported {args.model} ({manifest['kind']}, input {'x'.join(map(str, shape))}, {graphs} {unit}"
          f"{'s' if graphs > 1 else ''}{', + INT8' if args.quantize else ''}) to {args.out}; max relative error "
          f"against eager {manifest['check']['max_rel_err']:.1e} on {manifest['check']['batches']} batches")
    if policy is not None:
        print(f"exit policy: {source}; thresholds {[round(t, 4) for t in policy.thresholds]}")
    _list_files(args.out)
    portable = (manifest.get("executorch") or {}).get("portable_ops")
    if portable:
        print("not delegated to XNNPACK (ExecuTorch portable kernels): "
              + ", ".join(f"{r['op']} from {r['module']}" for r in portable))
    return 0


def cmd_bench(args) -> int:
    from .export import own_writer
    from .export.bench import bench_model, format_table
    if _is_bundle(args.model):
        return _bench_bundle(args)
    model, meta = _load_model(args.model, cfg=_parse_cfg(args.cfg))
    model.eval()
    shape = _deploy_shape(model, args, meta)
    policy, source = (_deploy_policy(args, model, meta) if _takes_exit_policy(model) else (None, None))
    images, labels = _deploy_images(args, model, meta, shape, "test", args.images)
    calib, _ = _deploy_images(args, model, meta, shape, "val", 128)
    runtimes = list(dict.fromkeys(args.runtimes))
    if "executorch" in runtimes and own_writer(model) is not None:
        raise DyncnnError(f"--runtimes executorch is not available for {type(model).__name__} bundles")
    result = bench_model(model, images, labels, policy=policy, threads=args.threads, batch_sizes=args.batch_sizes,
                         quantize=not args.no_quantize, calibration=calib, min_time_s=args.min_time,
                         runtimes=runtimes, device=_device(args))
    result.update(model=args.model, policy_source=source)
    if args.json:
        print(json.dumps(result, indent=2, allow_nan=True))
        return 0
    print(f"model: {args.model} ({result['kind']})" + (f"   exit policy: {source}" if source else ""))
    print(format_table(result))
    return 0


def _bench_bundle(args) -> int:
    """`dyncnn bench DIR` of an exported bundle: its own ONNX Runtime rows (every precision it holds) on real
    images of the dataset its manifest records (the checkpoint's; else, or with --dataset-override, --dataset),
    resized to the bundle's input; the exit policy is the manifest's."""
    from types import SimpleNamespace

    from .export.bench import bench_bundle, format_table
    from .export.runtime import _read_manifest
    if args.thresholds or args.budget is not None or args.cfg:
        raise DyncnnError("--thresholds, --budget and --cfg do not apply to an exported bundle: its exit policy is "
                          "the one in its manifest.json (export again to change it)")
    manifest = _read_manifest(Path(args.model))
    shape = tuple(int(s) for s in manifest["input"]["shape"][1:])
    labelled = SimpleNamespace(num_classes=int(manifest.get("num_classes") or 0))
    recorded = {"data": manifest.get("data")}
    images, labels = _deploy_images(args, labelled, recorded, shape, "test", args.images)
    result = bench_bundle(args.model, images, labels, threads=args.threads, batch_sizes=args.batch_sizes,
                          min_time_s=args.min_time)
    if args.json:
        print(json.dumps(result, indent=2, allow_nan=True))
        return 0
    policy = manifest.get("policy")
    print(f"bundle: {args.model} ({result['kind']}, {result['model_class']})" +
          (f"   exit policy (manifest): thresholds {[round(t, 4) for t in policy['thresholds']]}" if policy else ""))
    print(f"images: {len(images)} of the test split of {_data_cfg_for(args, recorded)['name']}"
          + ("" if manifest.get("data") else " (the bundle records no dataset: --dataset)"))
    print(format_table(result))
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dyncnn", description="Efficient mobile CNNs and dynamic networks that "
                                "execute the computation they save: build, train, profile, evaluate.")
    sub = p.add_subparsers(dest="command", required=True)

    z = sub.add_parser("zoo", help="table of registered models with measured parameters and MACs",
                       description="List registered models with parameters and MACs measured by FlopCounterMode "
                                   "at each model's own default input (images at the published size, clips and "
                                   "sequences at the shape the model declares; --input-size sets the side of "
                                   "images and frames), beside published figures. Measured rows are cached per "
                                   "dyncnn version (--no-cache measures again). Progress goes to stderr, and "
                                   "shows only on a terminal.")
    z.add_argument("--pattern", default="*", help="shell pattern over model names (default: all)")
    z.add_argument("--input-size", type=int, default=None, help="square image / frame side (default: each "
                   "model's own)")
    z.add_argument("--json", action="store_true", help="print JSON instead of a table")
    z.add_argument("--no-cache", action="store_true", help="profile every model again and refresh the cache "
                   "(rows are cached per dyncnn and torch version, model and input size under "
                   "$XDG_CACHE_HOME/dyncnn or ~/.cache/dyncnn)")
    z.set_defaults(func=cmd_zoo)

    pr = sub.add_parser("profile", help="MACs, parameters, memory and latency (eager and ONNX Runtime)",
                        description="Profile MODEL (registered name, torchvision:NAME, timm:NAME or a checkpoint): "
                                    "MACs, parameters, peak activation memory, and latency in eager PyTorch and "
                                    "ONNX Runtime at each batch size with a fixed thread count.")
    pr.add_argument("model", help="registered name, torchvision:NAME, timm:NAME, checkpoint (.safetensors) or an "
                    "exported bundle folder (with manifest.json)")
    pr.add_argument("--input-size", type=int, default=None, help="square input side (default 224, or the "
                    "checkpoint's data size)")
    pr.add_argument("--in-chans", type=int, default=None, help="input channels (default: the model's)")
    pr.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 32], help="batch sizes timed")
    pr.add_argument("--threads", type=int, default=THREADS, help="intra-op threads of eager PyTorch and ONNX Runtime")
    pr.add_argument("--min-time", type=float, default=1.0, help="seconds of timed runs per point")
    pr.add_argument("--no-onnx", action="store_true", help="skip the ONNX Runtime measurement")
    pr.add_argument("--optimize", action="store_true", help="also time the eager model after "
                    "optimize_for_inference (BatchNorm folded into the convolutions, channels-last weights)")
    pr.add_argument("--device", default="auto", help="where the eager rows run: auto (CUDA when available), cpu, "
                    "cuda, cuda:N or mps (ONNX Runtime runs on the CPU)")
    pr.add_argument("--cfg", nargs="*", metavar="KEY=VALUE", help="model keyword arguments")
    pr.add_argument("--json", action="store_true", help="print JSON instead of tables")
    pr.set_defaults(func=cmd_profile)

    t = sub.add_parser("train", help="train a model on a dataset, with checkpoints and --resume",
                       description="Train MODEL on DATASET; writes last/best checkpoints (safetensors + JSON) and "
                                   "metrics.jsonl to --out. Under torchrun, trains with DistributedDataParallel.")
    t.add_argument("--model", required=True, help="registered name (see `dyncnn zoo`), torchvision:NAME or timm:NAME")
    _add_data_args(t)
    t.add_argument("--epochs", type=int, default=10, help="passes over the training split")
    t.add_argument("--batch-size", type=int, default=64, help="global batch size (split across torchrun processes)")
    t.add_argument("--lr", type=float, default=0.05, help="peak learning rate of the cosine schedule")
    t.add_argument("--optimizer", choices=["sgd", "adamw"], default="sgd", help="sgd: momentum 0.9, Nesterov")
    t.add_argument("--weight-decay", type=float, default=5e-4, help="weight decay (not on norms and biases)")
    t.add_argument("--label-smoothing", type=float, default=0.0, help="cross-entropy label smoothing")
    t.add_argument("--warmup-epochs", type=float, default=0.0, help="linear learning-rate warm-up, in epochs")
    t.add_argument("--cfg", nargs="*", metavar="KEY=VALUE", help="model keyword arguments")
    t.add_argument("--out", required=True, help="output folder")
    t.add_argument("--resume", action="store_true", help="continue from OUT/last.safetensors if present")
    t.add_argument("--overwrite", action="store_true", help="replace the training run already in --out (its "
                   "checkpoints and metrics); without it, an existing run is refused unless --resume is given")
    t.add_argument("--find-unused-parameters", action="store_true",
                   help="under torchrun: for networks that skip layers, experts or paths (DistributedDataParallel)")
    t.add_argument("--device", default="auto", help="auto (CUDA when available, else CPU), cpu, cuda, cuda:N or "
                   "mps; under torchrun, cuda gives each process the GPU of its local rank (NCCL)")
    t.add_argument("--amp", action="store_true", help="bf16 autocast for forward and loss (mixed precision)")
    t.add_argument("--workers", type=int, default=0, help="DataLoader worker processes that assemble batches")
    t.add_argument("--init", default=None, metavar="CHECKPOINT", help="start from the weights of a trained "
                   "checkpoint: the same model, or the static backbone of a dynamic one (e.g. SkipNet from ResNet)")
    t.set_defaults(func=cmd_train)

    e = sub.add_parser("eval", help="accuracy of a checkpoint on a data split",
                       description="Evaluate CHECKPOINT on a split of the dataset it was trained on (or --dataset).")
    e.add_argument("checkpoint", help="a .safetensors checkpoint written by `dyncnn train`")
    _add_data_args(e)
    e.add_argument("--split", default="test", choices=["train", "val", "test"], help="data split evaluated")
    e.add_argument("--dataset-override", action="store_true",
                   help="use --dataset/--data-root instead of the dataset recorded in the checkpoint")
    e.add_argument("--budget", default=None, metavar="THRESHOLDS_JSON",
                   help="real early-exit evaluation with thresholds from `dyncnn calibrate`")
    e.add_argument("--anytime", action="store_true", help="accuracy of every exit with its cumulative MACs")
    e.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda, cuda:N or mps")
    e.add_argument("--json", action="store_true", help="print JSON instead of text")
    e.set_defaults(func=cmd_eval)

    c = sub.add_parser("calibrate", help="solve exit thresholds for a target budget on the validation split",
                       description="Fit per-exit temperatures and solve the early-exit thresholds of a multi-exit "
                                   "CHECKPOINT on the validation split for a target mean MACs (MSDNet protocol + "
                                   "bisection); writes a thresholds JSON for `dyncnn eval --budget`.")
    c.add_argument("checkpoint", help="a multi-exit .safetensors checkpoint written by `dyncnn train`")
    _add_data_args(c)
    target = c.add_mutually_exclusive_group(required=True)
    target.add_argument("--budget", type=float, help="target mean MACs as a fraction of full depth, e.g. 0.5")
    target.add_argument("--budget-macs", help="target mean MACs per image, e.g. 1.2M")
    target.add_argument("--target-accuracy", type=float, help="cheapest thresholds reaching this val accuracy")
    target.add_argument("--budget-ms", type=float, help="target mean latency in ms per image (batch 1, ONNX "
                        "Runtime), predicted from per-exit latencies measured on this machine")
    c.add_argument("--criterion", default="max_prob", choices=["max_prob", "entropy", "margin"],
                   help="exit confidence: top softmax probability, negative entropy or top-2 margin")
    c.add_argument("--dataset-override", action="store_true",
                   help="use --dataset/--data-root instead of the dataset recorded in the checkpoint")
    c.add_argument("--out", default=None, help="thresholds file (default: thresholds.json beside the checkpoint)")
    c.add_argument("--bundle", default=None, help="with --budget-ms: an exported bundle of this checkpoint whose "
                   "manifest holds (or receives) the measured exit latencies")
    c.add_argument("--threads", type=int, default=1, help="with --budget-ms: ONNX Runtime threads (default: 1)")
    c.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda, cuda:N or mps")
    c.set_defaults(func=cmd_calibrate)

    f = sub.add_parser("frontier", help="dynamic networks against the static accuracy-latency front (ONNX Runtime)",
                       description="Train a static front (zoo networks at several widths and input resolutions) "
                                   "and dynamic candidates with one training budget, choose each dynamic operating "
                                   "point on the validation split, time everything in ONNX Runtime (interleaved "
                                   "rounds, median and IQR) and write frontier.json / .md / .png with the speedup "
                                   "at equal accuracy.")
    f.add_argument("--preset", default="demo", choices=["demo", "full", "phone"],
                   help="model set: demo (3 static, 2 cascades), full (8 static, 7 dynamic), phone (128x128 "
                        "canvas, 1-73M MAC networks); full and phone include a cascade whose members are searched "
                        "on validation")
    f.add_argument("--dataset", default="scaled_mnist", choices=["scaled_mnist"], help="data (the embedded digits)")
    f.add_argument("--canvas", type=int, default=None, help="image side (default: 64, 128 for --preset phone)")
    f.add_argument("--clutter", type=int, default=2, help="clutter fragments per image")
    f.add_argument("--seed", type=int, default=0, help="data split and rendering seed")
    f.add_argument("--seeds", type=int, nargs="+", default=[0], help="training seeds (every model trained with each)")
    f.add_argument("--epochs", type=int, default=5, help="epochs for every model")
    f.add_argument("--lr", type=float, default=0.1, help="peak learning rate (cosine schedule) for every model")
    f.add_argument("--test-repeats", type=int, default=3, help="renderings of each test digit")
    f.add_argument("--device", default="cpu", help="training device: cpu, cuda, mps or auto (timing is on the CPU)")
    f.add_argument("--runtime", choices=["onnxruntime", "executorch"], default="onnxruntime",
                   help="runtime the bundles are timed in (executorch: XNNPACK, needs dyncnn[mobile])")
    f.add_argument("--threads", type=int, nargs="+", default=[1, 2], help="runtime thread counts timed")
    f.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 64], help="batch sizes timed")
    f.add_argument("--rounds", type=int, default=7, help="interleaved timing rounds (median and IQR over them)")
    f.add_argument("--single-images", type=int, default=200, help="test images timed one at a time per round")
    f.add_argument("--batch-images", type=int, default=640, help="test images timed in batches per round")
    f.add_argument("--no-eager", action="store_true", help="skip the eager PyTorch timings")
    f.add_argument("--only-train", action="store_true", help="train (or resume) every model and stop")
    f.add_argument("--merge", nargs="+", default=None, metavar="RUN_DIR",
                   help="instead of running: one report from finished runs of other seeds (same settings)")
    f.add_argument("--out", default="runs/frontier", help="output folder (checkpoints are reused from it)")
    f.set_defaults(func=cmd_frontier)

    d = sub.add_parser("demo", help="the main job on the embedded data: static front vs resolution cascades",
                       description="Train a small static front on ScaledMNIST with clutter, build resolution "
                                   "cascades from it, calibrate them on the validation split, time everything in "
                                   "ONNX Runtime and write report.md and plots to --out (a small `dyncnn "
                                   "frontier`).")
    d.add_argument("--out", default="runs/demo", help="output folder")
    d.add_argument("--epochs", type=int, default=None, help="override the demo's epoch count (5)")
    d.add_argument("--threads", type=int, default=THREADS, help="torch threads for training; ONNX Runtime is timed with "
                   "1 and this many threads")
    d.set_defaults(func=cmd_demo)

    ex = sub.add_parser("export", help="export a model to ONNX or ExecuTorch: one graph, or one per stage/exit + "
                                       "manifest",
                        description="Export MODEL (registered name, torchvision:NAME, timm:NAME or a checkpoint) to "
                                    "the bundle folder --out: a static model as one ONNX graph, a multi-exit network "
                                    "as one graph per stage with its exit head and a manifest (policy, per-stage "
                                    "MACs) that `dyncnn.export.load_bundle` runs with ONNX Runtime. Checked "
                                    "against eager on random and real (validation) images.")
    ex.add_argument("model", help="registered name, torchvision:NAME, timm:NAME or a checkpoint (.safetensors)")
    ex.add_argument("--out", required=True, help="bundle folder (new, empty, or an older bundle to replace)")
    ex.add_argument("--quantize", action="store_true", help="also write INT8 graphs (static post-training "
                    "quantization calibrated on validation images)")
    ex.add_argument("--thresholds", default=None, help="exit thresholds from `dyncnn calibrate` (default: "
                    "thresholds.json beside the checkpoint if present, else full depth)")
    ex.add_argument("--single-graph", action="store_true",
                    help="also write single.onnx: the torch.cond form with a per-batch exit condition")
    ex.add_argument("--runtime", choices=["onnxruntime", "executorch"], default="onnxruntime",
                    help="onnxruntime: ONNX graphs; executorch: ExecuTorch programs lowered to XNNPACK (.pte, "
                         "needs dyncnn[mobile]); same manifest and driver, `load_bundle` reads which")
    ex.add_argument("--max-batch", type=int, default=None, help="executorch: the largest batch of one program "
                    "call (memory is planned for it; larger batches run in chunks; default 64)")
    ex.add_argument("--calib-images", type=int, default=256, help="validation images for INT8 calibration")
    ex.add_argument("--input-size", type=int, default=None, help="square input side (default: checkpoint's data "
                    "size, the model's published size, or 224)")
    ex.add_argument("--in-chans", type=int, default=None, help="input channels (default: the model's)")
    ex.add_argument("--cfg", nargs="*", metavar="KEY=VALUE", help="model keyword arguments")
    _add_data_args(ex)
    ex.add_argument("--dataset-override", action="store_true",
                    help="use --dataset/--data-root instead of the dataset recorded in the checkpoint")
    ex.add_argument("--json", action="store_true", help="print the manifest")
    ex.set_defaults(func=cmd_export)

    be = sub.add_parser("bench", help="deployment latency: eager vs ONNX Runtime vs ExecuTorch, FP32 vs INT8, "
                                      "batch 1 and 64",
                        description="Latency table of MODEL in eager PyTorch, ONNX Runtime and ExecuTorch (XNNPACK) "
                                    "(FP32 and INT8), at "
                                    "fixed threads, median and IQR; for multi-exit networks also the realized "
                                    "speedup of the exits against the same bundle forced to full depth, beside the "
                                    "MAC speedup, and the driver's overhead.")
    be.add_argument("model", help="registered name, torchvision:NAME, timm:NAME, checkpoint (.safetensors) or an "
                    "exported bundle folder (with manifest.json)")
    be.add_argument("--thresholds", default=None, help="exit thresholds file (multi-exit)")
    be.add_argument("--budget", type=float, default=None, help="without thresholds: calibrate for this fraction "
                    "of full-depth MACs on the validation split (default: halfway between the first exit's and "
                    "full-depth MACs)")
    be.set_defaults(calibrate=True)
    be.add_argument("--threads", type=int, default=THREADS, help="intra-op threads of eager PyTorch and ONNX Runtime")
    be.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 64], help="batch sizes timed")
    be.add_argument("--images", type=int, default=256, help="test images used (accuracy, dynamic timings)")
    be.add_argument("--min-time", type=float, default=0.5, help="seconds of timed runs per point")
    be.add_argument("--no-quantize", action="store_true", help="skip the INT8 rows")
    be.add_argument("--device", default="auto", help="where the eager rows run: auto (CUDA when available), cpu, "
                    "cuda, cuda:N or mps (bundles run on the CPU)")
    be.add_argument("--runtimes", nargs="+", choices=["onnxruntime", "executorch"], default=["onnxruntime"],
                    help="bundle runtimes timed beside eager, e.g. `--runtimes onnxruntime executorch` for "
                         "ExecuTorch (XNNPACK) rows beside ONNX Runtime's (default: onnxruntime)")
    be.add_argument("--input-size", type=int, default=None, help="square input side (default: checkpoint's data "
                    "size, the model's published size, or 224)")
    be.add_argument("--in-chans", type=int, default=None, help="input channels (default: the model's)")
    be.add_argument("--cfg", nargs="*", metavar="KEY=VALUE", help="model keyword arguments")
    _add_data_args(be)
    be.add_argument("--dataset-override", action="store_true",
                    help="use --dataset/--data-root instead of the dataset recorded in the checkpoint")
    be.add_argument("--json", action="store_true", help="print JSON instead of tables")
    be.set_defaults(func=cmd_bench)
    for sp in sub.choices.values():
        sp.formatter_class = _HelpFormatter
    return p


# Commands that time models: their process keeps freed activations for reuse (profile.latency.retain_freed_memory)
TIMING_COMMANDS = ("profile", "bench", "frontier", "demo")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command in TIMING_COMMANDS:
        from .profile.latency import retain_freed_memory
        retain_freed_memory()
    try:
        code = args.func(args)
        sys.stdout.flush()          # a closed pipe shows here, inside the handlers below, not at exit
        return code
    except (DyncnnError, FileNotFoundError, ValueError) as e:
        print(f"dyncnn {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"dyncnn {args.command}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # the reader went away (`dyncnn ... | head -1`): stop quietly, as `yes | head -1` does; stdout now points
        # at /dev/null so that the interpreter's last flush does not fail again
        try:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
        except (OSError, ValueError, AttributeError):
            pass
        return 141
    except OSError as e:          # permission denied, disk full, read-only file system: say which file
        where = f" {e.filename}" if e.filename else ""
        print(f"dyncnn {args.command}: error: cannot access{where}: {e.strerror or e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
