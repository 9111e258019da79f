"""``dyncnn bench``: deployment latency of a model or an exported bundle."""
from __future__ import annotations

import json
from pathlib import Path

from ..errors import DyncnnError
from .common import (
    THREADS, _add_deployed_model_args, _data_cfg_for, _deploy_images, _deploy_policy, _deploy_shape, _device,
    _is_bundle, _load_model, _parse_cfg, _takes_exit_policy)


def add_parser(sub) -> None:
    p = sub.add_parser("bench", help="deployment latency: eager vs ONNX Runtime vs ExecuTorch, FP32 vs INT8, "
                                     "batch 1 and 64",
                       description="Latency table of MODEL in eager PyTorch, ONNX Runtime and ExecuTorch (XNNPACK) "
                                   "(FP32 and INT8), at "
                                   "fixed threads, median and IQR; for multi-exit networks also the realized "
                                   "speedup of the exits against the same bundle forced to full depth, beside the "
                                   "MAC speedup, and the driver's overhead.")
    p.add_argument("model", help="registered name, torchvision:NAME, timm:NAME, checkpoint (.safetensors) or an "
                   "exported bundle folder (with manifest.json)")
    p.add_argument("--thresholds", default=None, help="exit thresholds file (multi-exit)")
    p.add_argument("--budget", type=float, default=None, help="without thresholds: calibrate for this fraction "
                   "of full-depth MACs on the validation split (default: halfway between the first exit's and "
                   "full-depth MACs)")
    p.set_defaults(calibrate=True)
    p.add_argument("--threads", type=int, default=THREADS, help="intra-op threads of eager PyTorch and ONNX Runtime")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 64], help="batch sizes timed")
    p.add_argument("--images", type=int, default=256, help="test images used (accuracy, dynamic timings)")
    p.add_argument("--min-time", type=float, default=0.5, help="seconds of timed runs per point")
    p.add_argument("--no-quantize", action="store_true", help="skip the INT8 rows")
    p.add_argument("--device", default="auto", help="where the eager rows run: auto (CUDA when available), cpu, "
                   "cuda, cuda:N or mps (bundles run on the CPU)")
    p.add_argument("--runtimes", nargs="+", choices=["onnxruntime", "executorch"], default=["onnxruntime"],
                   help="bundle runtimes timed beside eager, e.g. `--runtimes onnxruntime executorch` for "
                        "ExecuTorch (XNNPACK) rows beside ONNX Runtime's (default: onnxruntime)")
    _add_deployed_model_args(p)
    p.add_argument("--json", action="store_true", help="print JSON instead of tables")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..export import own_writer
    from ..export.bench import bench_model, format_table
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

    from ..export.bench import bench_bundle, format_table
    from ..export.runtime import _read_manifest
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
