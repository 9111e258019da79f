"""The ``dyncnn`` command: zoo, profile, train, eval, demo."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .errors import DyncnnError


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


def cmd_zoo(args) -> int:
    import torch
    from tqdm.auto import tqdm

    from .models import create_model, list_models, published_figures
    from .profile import count_macs
    rows = []
    for name in tqdm(list_models(args.pattern), desc="profiling", leave=False, disable=args.json):
        pub = published_figures(name)
        # e.g. CondenseNet: the published figures are those of the converted inference network
        model = create_model(name, **pub.get("profile_cfg", {}))
        size = args.input_size or pub.get("input_size", 224)
        x = torch.randn(1, getattr(model, "in_chans", 3), size, size)
        r = count_macs(model, x)
        rows.append({"model": name, "input": size, "params_m": r.params / 1e6, "macs_m": r.total / 1e6,
                     "published_params_m": pub["params"] / 1e6 if "params" in pub else None,
                     "published_macs_m": pub["macs"] / 1e6 if "macs" in pub else None})
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0

    def fmt(v):
        return f"{v:.2f}" if v is not None else "-"
    print("| model | input | params (M) | MACs (M) | published params (M) | published MACs (M) |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['input']} | {fmt(r['params_m'])} | {fmt(r['macs_m'])} | "
              f"{fmt(r['published_params_m'])} | {fmt(r['published_macs_m'])} |")
    return 0


def cmd_profile(args) -> int:
    import torch

    from .profile import count_macs, measure_latency, peak_memory
    model, meta = _load_model(args.model, cfg=_parse_cfg(args.cfg))
    shape = _input_shape(model, args.input_size, args.in_chans, meta)
    x = torch.randn(1, *shape)
    macs = count_macs(model, x)
    mem = peak_memory(model, x)
    result = {"model": args.model, "input_shape": list(shape), "macs": macs.total, "params": macs.params,
              "peak_activation_mb": mem.peak_activation_bytes / 2**20, "param_mb": mem.param_bytes / 2**20,
              "threads": args.threads, "latency": []}
    backends = ["eager"] + ([] if args.no_onnx else ["onnxruntime"])
    for backend in backends:
        stats = measure_latency(model, x, args.batch_sizes, threads=args.threads, backend=backend,
                                min_time_s=args.min_time)
        result["latency"] += [s.as_dict() for s in stats.values()]
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    print(f"model: {args.model}   input: 1x{shape[0]}x{shape[1]}x{shape[2]}   threads: {args.threads}")
    print(f"MACs: {macs.total / 1e6:.2f}M   params: {macs.params / 1e6:.3f}M   "
          f"peak activations (batch 1): {result['peak_activation_mb']:.2f} MiB   weights: {result['param_mb']:.2f} MiB")
    print("| backend | batch | median ms | IQR ms | ms/sample | runs |")
    print("|---|---|---|---|---|---|")
    for s in result["latency"]:
        print(f"| {s['backend']} | {s['batch_size']} | {s['median_ms']:.2f} | {s['spread_ms']:.2f} | "
              f"{s['median_ms'] / s['batch_size']:.3f} | {s['runs']} |")
    return 0


def cmd_train(args) -> int:
    from .models import create_model
    from .train import TrainConfig, Trainer
    train_set, val_set = _dataset(args, "train"), _dataset(args, "val")
    cfg = _parse_cfg(args.cfg)
    if not args.model.startswith(("torchvision:", "timm:")):
        cfg.setdefault("in_chans", train_set.in_chans)   # dyncnn models take in_chans; external ones may not
        if hasattr(train_set, "frames"):                  # clips: the temporal models are built for T frames
            cfg.setdefault("frames", train_set.frames)
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
    if hasattr(model, "fit_stages"):
        # Multi-stage training (e.g. glance-and-focus: encoders, then the policy, then fine-tuning), each stage a
        # Trainer run of its own in a subfolder of --out; the last stage's checkpoint is the model's.
        result = model.fit_stages(train_set, val_set, config, out_dir=args.out, resume=args.resume, extra=extra)
    else:
        trainer = Trainer(model, train_set, val_set, config, out_dir=args.out, extra=extra)
        result = trainer.fit(resume=args.resume)
    print(f"trained {args.model} for {result.steps} steps in {result.seconds:.1f}s: "
          f"final val acc {result.final_val_acc:.4f}, best {result.best_val_acc:.4f}; checkpoints in {args.out}")
    return 0


def cmd_eval(args) -> int:
    from .train import evaluate, load_checkpoint, resolve_device
    model, meta = load_checkpoint(args.checkpoint)
    model.to(resolve_device(args.device))          # evaluation follows the model's device
    data_cfg = _data_cfg_for(args, meta)
    dataset = _dataset(args, args.split, data_cfg)
    if args.budget or args.anytime:
        return _eval_dynamic(args, model, dataset)
    from .dynamic.evaluation import evaluate_dynamic, format_dynamic, is_gated
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
    if not hasattr(model, "infer"):
        raise DyncnnError(f"--budget/--anytime need a multi-exit network; {type(model).__name__} has no exits")
    out: dict = {"checkpoint": str(args.checkpoint), "split": args.split}
    if args.anytime:
        logits, targets = collect_exit_logits(model, dataset)
        cum = model.exit_macs(dataset[0][0].unsqueeze(0).to(next(model.parameters()).device))
        out["anytime"] = [{"exit": k + 1, "macs": m, "accuracy": a}
                          for k, (m, a) in enumerate(anytime(logits.argmax(-1) == targets, cum))]
    if args.budget:
        policy, record = load_thresholds(args.budget, model)
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
    from .train import load_checkpoint, resolve_device
    model, meta = load_checkpoint(args.checkpoint)
    model.to(resolve_device(args.device))
    data_cfg = _data_cfg_for(args, meta)
    val = _dataset(args, "val", data_cfg)
    record = calibrate(model, val, target_macs=_parse_macs(args.budget_macs) if args.budget_macs else None,
                       target_fraction=args.budget, target_accuracy=args.target_accuracy, criterion=args.criterion)
    out = Path(args.out) if args.out else Path(args.checkpoint).with_name("thresholds.json")
    save_thresholds(record, out)
    print(f"thresholds for {record['num_exits']} exits written to {out}: val accuracy {record['val_accuracy']:.4f} "
          f"at {record['val_mean_macs'] / 1e6:.3f}M mean MACs ({record['val_mean_macs'] / record['exit_macs'][-1]:.0%}"
          f" of full depth)")
    return 0


def cmd_demo(args) -> int:
    from .demo import run_demo
    run_demo(out_dir=Path(args.out), epochs=args.epochs, threads=args.threads, naive=not args.no_naive)
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
        return load_thresholds(path, model)[0], str(path)
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


def cmd_export(args) -> int:
    from .export import export_bundle, is_multi_exit
    model, meta = _load_model(args.model, cfg=_parse_cfg(args.cfg))
    model.eval()
    shape = _deploy_shape(model, args, meta)
    policy, source = (_deploy_policy(args, model, meta) if is_multi_exit(model) else (None, None))
    if hasattr(model, "export_bundle"):      # glance-and-focus: glance/focus graphs + a driver that crops patches
        if args.runtime != "onnxruntime":
            raise DyncnnError(f"--runtime {args.runtime} is not available for {type(model).__name__} bundles "
                              f"(their patch-cropping driver runs ONNX graphs)")
        if args.quantize or args.single_graph:
            raise DyncnnError(f"--quantize and --single-graph are not available for {type(model).__name__} bundles")
        real, _ = _deploy_images(args, model, meta, shape, "val", 16)
        manifest = model.export_bundle(args.out, policy=policy, check_inputs=[real[:16]], input_size=shape[1])
        print(json.dumps(manifest, indent=2, allow_nan=True) if args.json else
              f"exported {args.model} (glance, {len(manifest['graphs'])} ONNX graphs) to {args.out}; max relative "
              f"error against eager {manifest['check']['max_rel_err']:.1e}; exit policy: {source}")
        return 0
    real, _ = _deploy_images(args, model, meta, shape, "val", max(args.calib_images, 16))
    manifest = export_bundle(model, args.out, shape, policy=policy, check_inputs=[real[:16]],
                             quantize=args.quantize, calibration=real[:args.calib_images],
                             single_graph=args.single_graph, runtime=args.runtime, max_batch=args.max_batch)
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
    portable = (manifest.get("executorch") or {}).get("portable_ops")
    if portable:
        print("not delegated to XNNPACK (ExecuTorch portable kernels): "
              + ", ".join(f"{r['op']} from {r['module']}" for r in portable))
    return 0


def cmd_bench(args) -> int:
    from .export import is_multi_exit
    from .export.bench import bench_model, format_table
    model, meta = _load_model(args.model, cfg=_parse_cfg(args.cfg))
    model.eval()
    shape = _deploy_shape(model, args, meta)
    policy, source = (_deploy_policy(args, model, meta) if is_multi_exit(model) else (None, None))
    images, labels = _deploy_images(args, model, meta, shape, "test", args.images)
    calib, _ = _deploy_images(args, model, meta, shape, "val", 128)
    runtimes = list(dict.fromkeys(args.runtimes))
    if "executorch" in runtimes and hasattr(model, "export_bundle"):
        raise DyncnnError(f"--runtimes executorch is not available for {type(model).__name__} bundles")
    result = bench_model(model, images, labels, policy=policy, threads=args.threads, batch_sizes=args.batch_sizes,
                         quantize=not args.no_quantize, calibration=calib, min_time_s=args.min_time,
                         runtimes=runtimes)
    result.update(model=args.model, policy_source=source)
    if args.json:
        print(json.dumps(result, indent=2, allow_nan=True))
        return 0
    print(f"model: {args.model} ({result['kind']})" + (f"   exit policy: {source}" if source else ""))
    print(format_table(result))
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dyncnn", description="Efficient mobile CNNs and dynamic networks that "
                                "execute the computation they save: build, train, profile, evaluate.")
    sub = p.add_subparsers(dest="command", required=True)

    z = sub.add_parser("zoo", help="table of registered models with measured parameters and MACs",
                       description="List registered models with parameters and MACs measured by FlopCounterMode "
                                   "at the published input size (or --input-size), beside published figures.")
    z.add_argument("--pattern", default="*", help="shell pattern over model names (default: all)")
    z.add_argument("--input-size", type=int, default=None, help="square input side (default: each model's own)")
    z.add_argument("--json", action="store_true", help="print JSON instead of a table")
    z.set_defaults(func=cmd_zoo)

    pr = sub.add_parser("profile", help="MACs, parameters, memory and latency (eager and ONNX Runtime)",
                        description="Profile MODEL (registered name, torchvision:NAME, timm:NAME or a checkpoint): "
                                    "MACs, parameters, peak activation memory, and latency in eager PyTorch and "
                                    "ONNX Runtime at each batch size with a fixed thread count.")
    pr.add_argument("model")
    pr.add_argument("--input-size", type=int, default=None, help="square input side (default 224, or the "
                    "checkpoint's data size)")
    pr.add_argument("--in-chans", type=int, default=None, help="input channels (default: the model's)")
    pr.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 32])
    pr.add_argument("--threads", type=int, default=2)
    pr.add_argument("--min-time", type=float, default=1.0, help="seconds of timed runs per point")
    pr.add_argument("--no-onnx", action="store_true", help="skip the ONNX Runtime measurement")
    pr.add_argument("--cfg", nargs="*", metavar="KEY=VALUE", help="model keyword arguments")
    pr.add_argument("--json", action="store_true")
    pr.set_defaults(func=cmd_profile)

    t = sub.add_parser("train", help="train a model on a dataset, with checkpoints and --resume",
                       description="Train MODEL on DATASET; writes last/best checkpoints (safetensors + JSON) and "
                                   "metrics.jsonl to --out. Under torchrun, trains with DistributedDataParallel.")
    t.add_argument("--model", required=True)
    _add_data_args(t)
    t.add_argument("--epochs", type=int, default=10)
    t.add_argument("--batch-size", type=int, default=64)
    t.add_argument("--lr", type=float, default=0.05)
    t.add_argument("--optimizer", choices=["sgd", "adamw"], default="sgd")
    t.add_argument("--weight-decay", type=float, default=5e-4)
    t.add_argument("--label-smoothing", type=float, default=0.0)
    t.add_argument("--warmup-epochs", type=float, default=0.0)
    t.add_argument("--cfg", nargs="*", metavar="KEY=VALUE", help="model keyword arguments")
    t.add_argument("--out", required=True, help="output folder")
    t.add_argument("--resume", action="store_true", help="continue from OUT/last.safetensors if present")
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
    e.add_argument("checkpoint")
    _add_data_args(e)
    e.add_argument("--split", default="test", choices=["train", "val", "test"])
    e.add_argument("--dataset-override", action="store_true",
                   help="use --dataset/--data-root instead of the dataset recorded in the checkpoint")
    e.add_argument("--budget", default=None, metavar="THRESHOLDS_JSON",
                   help="real early-exit evaluation with thresholds from `dyncnn calibrate`")
    e.add_argument("--anytime", action="store_true", help="accuracy of every exit with its cumulative MACs")
    e.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda, cuda:N or mps")
    e.add_argument("--json", action="store_true")
    e.set_defaults(func=cmd_eval)

    c = sub.add_parser("calibrate", help="solve exit thresholds for a target budget on the validation split",
                       description="Fit per-exit temperatures and solve the early-exit thresholds of a multi-exit "
                                   "CHECKPOINT on the validation split for a target mean MACs (MSDNet protocol + "
                                   "bisection); writes a thresholds JSON for `dyncnn eval --budget`.")
    c.add_argument("checkpoint")
    _add_data_args(c)
    target = c.add_mutually_exclusive_group(required=True)
    target.add_argument("--budget", type=float, help="target mean MACs as a fraction of full depth, e.g. 0.5")
    target.add_argument("--budget-macs", help="target mean MACs per image, e.g. 1.2M")
    target.add_argument("--target-accuracy", type=float, help="cheapest thresholds reaching this val accuracy")
    c.add_argument("--criterion", default="max_prob", choices=["max_prob", "entropy", "margin"])
    c.add_argument("--dataset-override", action="store_true")
    c.add_argument("--out", default=None, help="thresholds file (default: thresholds.json beside the checkpoint)")
    c.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda, cuda:N or mps")
    c.set_defaults(func=cmd_calibrate)

    d = sub.add_parser("demo", help="the main job on the embedded data: train, evaluate, profile, report",
                       description="Train a small network on ScaledMNIST with clutter, evaluate it, measure its "
                                   "MACs and latency, and write report.md and plots to --out.")
    d.add_argument("--out", default="runs/demo")
    d.add_argument("--epochs", type=int, default=None, help="override the demo's epoch count")
    d.add_argument("--threads", type=int, default=2)
    d.add_argument("--no-naive", action="store_true", help="skip the naive multi-exit comparison network")
    d.set_defaults(func=cmd_demo)

    ex = sub.add_parser("export", help="export a model to ONNX or ExecuTorch: one graph, or one per stage/exit + "
                                       "manifest",
                        description="Export MODEL (registered name, torchvision:NAME, timm:NAME or a checkpoint) to "
                                    "the bundle folder --out: a static model as one ONNX graph, a multi-exit network "
                                    "as one graph per stage with its exit head and a manifest (policy, per-stage "
                                    "MACs) that `dyncnn.export.load_bundle` runs with ONNX Runtime. Checked "
                                    "against eager on random and real (validation) images.")
    ex.add_argument("model")
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
    ex.add_argument("--in-chans", type=int, default=None)
    ex.add_argument("--cfg", nargs="*", metavar="KEY=VALUE", help="model keyword arguments")
    _add_data_args(ex)
    ex.add_argument("--dataset-override", action="store_true")
    ex.add_argument("--json", action="store_true", help="print the manifest")
    ex.set_defaults(func=cmd_export)

    be = sub.add_parser("bench", help="deployment latency: eager vs ONNX Runtime vs ExecuTorch, FP32 vs INT8, "
                                      "batch 1 and 64",
                        description="Latency table of MODEL in eager PyTorch, ONNX Runtime and ExecuTorch (XNNPACK) "
                                    "(FP32 and INT8), at "
                                    "fixed threads, median and IQR; for multi-exit networks also the realized "
                                    "speedup of the exits against the same bundle forced to full depth, beside the "
                                    "MAC speedup, and the driver's overhead.")
    be.add_argument("model")
    be.add_argument("--thresholds", default=None, help="exit thresholds file (multi-exit)")
    be.add_argument("--budget", type=float, default=None, help="without thresholds: calibrate for this fraction "
                    "of full-depth MACs on the validation split (default: halfway between the first exit's and "
                    "full-depth MACs)")
    be.set_defaults(calibrate=True)
    be.add_argument("--threads", type=int, default=1)
    be.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 64])
    be.add_argument("--images", type=int, default=256, help="test images used (accuracy, dynamic timings)")
    be.add_argument("--min-time", type=float, default=0.5, help="seconds of timed runs per point")
    be.add_argument("--no-quantize", action="store_true", help="skip the INT8 rows")
    be.add_argument("--runtimes", nargs="+", choices=["onnxruntime", "executorch"], default=["onnxruntime"],
                    help="bundle runtimes timed beside eager, e.g. `--runtimes onnxruntime executorch` for "
                         "ExecuTorch (XNNPACK) rows beside ONNX Runtime's (default: onnxruntime)")
    be.add_argument("--input-size", type=int, default=None)
    be.add_argument("--in-chans", type=int, default=None)
    be.add_argument("--cfg", nargs="*", metavar="KEY=VALUE", help="model keyword arguments")
    _add_data_args(be)
    be.add_argument("--dataset-override", action="store_true")
    be.add_argument("--json", action="store_true")
    be.set_defaults(func=cmd_bench)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (DyncnnError, FileNotFoundError, ValueError) as e:
        print(f"dyncnn {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
