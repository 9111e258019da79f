"""``dyncnn calibrate``: exit thresholds of a multi-exit checkpoint for a target budget on the validation split."""
from __future__ import annotations

from pathlib import Path

from ..errors import DyncnnError
from .common import _add_data_args, _data_cfg_for, _dataset, _device, _file_sha256, _not_a_bundle, _writable_file


def add_parser(sub) -> None:
    p = sub.add_parser("calibrate", help="solve exit thresholds for a target budget on the validation split",
                       description="Fit per-exit temperatures and solve the early-exit thresholds of a multi-exit "
                                   "CHECKPOINT on the validation split for a target mean MACs (MSDNet protocol + "
                                   "bisection); writes a thresholds JSON for `dyncnn eval --budget`.")
    p.add_argument("checkpoint", help="a multi-exit .safetensors checkpoint written by `dyncnn train`")
    _add_data_args(p)
    target = p.add_mutually_exclusive_group(required=True)
    target.add_argument("--budget", type=float, help="target mean MACs as a fraction of full depth, e.g. 0.5")
    target.add_argument("--budget-macs", help="target mean MACs per image, e.g. 1.2M")
    target.add_argument("--target-accuracy", type=float, help="cheapest thresholds reaching this val accuracy")
    target.add_argument("--budget-ms", type=float, help="target mean latency in ms per image (batch 1, ONNX "
                        "Runtime), predicted from per-exit latencies measured on this machine")
    p.add_argument("--criterion", default="max_prob", choices=["max_prob", "entropy", "margin"],
                   help="exit confidence: top softmax probability, negative entropy or top-2 margin")
    p.add_argument("--dataset-override", action="store_true",
                   help="use --dataset/--data-root instead of the dataset recorded in the checkpoint")
    p.add_argument("--out", default=None, help="thresholds file (default: thresholds.json beside the checkpoint)")
    p.add_argument("--bundle", default=None, help="with --budget-ms: an exported bundle of this checkpoint whose "
                   "manifest holds (or receives) the measured exit latencies")
    p.add_argument("--threads", type=int, default=1, help="with --budget-ms: ONNX Runtime threads (default: 1)")
    p.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda, cuda:N or mps")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..dynamic.calibration import calibrate, save_thresholds
    from ..train import load_checkpoint
    _not_a_bundle(args.checkpoint, "a training checkpoint (calibrate takes the checkpoint, --bundle its bundle)")
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


def _parse_macs(text: str) -> float:
    """'1.5M', '300k', '2e6' -> MACs."""
    scale = {"k": 1e3, "m": 1e6, "g": 1e9}.get(text[-1].lower(), 1.0)
    try:
        return float(text[:-1] if scale != 1.0 else text) * scale
    except ValueError:
        raise DyncnnError(f"--budget-macs expects a number such as 1.5M or 300k, got {text!r}") from None


def _exit_latency_table(model, val, args) -> list[float]:
    """Cumulative batch-1 ONNX Runtime latency of leaving at each exit: read from ``--bundle`` when it holds a
    measurement for ``--threads``, else measured on the validation images (and stored in that bundle, or in a
    temporary export)."""
    import tempfile
    import torch
    from ..export import export_bundle, load_bundle
    from ..export.runtime import record_stage_latency, stage_latency_table
    images = torch.stack([val[i][0] for i in range(min(64, len(val)))])
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(args.bundle) if args.bundle else Path(tmp) / "bundle"
        if not args.bundle:
            export_bundle(model, folder, tuple(images.shape[1:]))
        else:
            from ..export.runtime import _read_manifest
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
