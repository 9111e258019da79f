"""``dyncnn export``: a model to an ONNX or ExecuTorch bundle."""
from __future__ import annotations

import json
import sys
from pathlib import Path

from ..errors import DyncnnError
from .common import (
    _add_deployed_model_args, _deploy_images, _deploy_policy, _deploy_shape, _load_model, _parse_cfg,
    _takes_exit_policy, _writable_folder)


def add_parser(sub) -> None:
    p = sub.add_parser("export", help="export a model to ONNX or ExecuTorch: one graph, or one per stage/exit + "
                                      "manifest",
                       description="Export MODEL (registered name, torchvision:NAME, timm:NAME or a checkpoint) to "
                                   "the bundle folder --out: a static model as one ONNX graph, a multi-exit network "
                                   "as one graph per stage with its exit head and a manifest (policy, per-stage "
                                   "MACs) that `dyncnn.export.load_bundle` runs with ONNX Runtime. Checked "
                                   "against eager on random and real (validation) images.")
    p.add_argument("model", help="registered name, torchvision:NAME, timm:NAME or a checkpoint (.safetensors)")
    p.add_argument("--out", required=True, help="bundle folder (new, empty, or an older bundle to replace)")
    p.add_argument("--quantize", action="store_true", help="also write INT8 graphs (static post-training "
                   "quantization calibrated on validation images)")
    p.add_argument("--thresholds", default=None, help="exit thresholds from `dyncnn calibrate` (default: "
                   "thresholds.json beside the checkpoint if present, else full depth)")
    p.add_argument("--single-graph", action="store_true",
                   help="also write single.onnx: the torch.cond form with a per-batch exit condition")
    p.add_argument("--runtime", choices=["onnxruntime", "executorch"], default="onnxruntime",
                   help="onnxruntime: ONNX graphs; executorch: ExecuTorch programs lowered to XNNPACK (.pte, "
                        "needs dyncnn[mobile]); same manifest and driver, `load_bundle` reads which")
    p.add_argument("--max-batch", type=int, default=None, help="executorch: the largest batch of one program "
                   "call (memory is planned for it; larger batches run in chunks; default 64)")
    p.add_argument("--calib-images", type=int, default=256, help="validation images for INT8 calibration")
    p.add_argument("--stage-threads", type=int, nargs="+", default=None, metavar="N",
                   help="onnxruntime: time each stage with each of these thread counts on the validation images at "
                        "batch 1 and 64 and record the fastest per stage (a multi-exit bundle: the fastest "
                        "assignment for whole runs under its exit policy) (load_bundle(dir, threads=\"per-stage\"))")
    _add_deployed_model_args(p)
    p.add_argument("--json", action="store_true", help="print the manifest")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..export import export_bundle, own_writer
    _writable_folder(Path(args.out))
    model, meta = _load_model(args.model, cfg=_parse_cfg(args.cfg))
    _untrained_warning(args.model)
    model.eval()
    shape = _deploy_shape(model, args, meta)
    policy, source = (_deploy_policy(args, model, meta) if _takes_exit_policy(model) else (None, None))
    if args.stage_threads and (args.runtime != "onnxruntime" or own_writer(model) is not None or
                               min(args.stage_threads) < 1):
        raise DyncnnError(f"--stage-threads takes thread counts >= 1, for a static or multi-exit bundle of "
                          f"--runtime onnxruntime (ExecuTorch has one thread pool per process), got "
                          f"{args.stage_threads} for {args.runtime}"
                          f"{' and a glance bundle' if own_writer(model) is not None else ''}")
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
    if args.stage_threads:
        from ..export.runtime import measure_stage_plans, measure_stage_threads, record_stage_threads
        counts = sorted(set(args.stage_threads))
        measured = measure_stage_threads(args.out, real.numpy(), counts, (1, 64))
        # a multi-exit bundle: at each batch size the plan that runs the whole bundle fastest under its exit policy
        plans = {b: measure_stage_plans(args.out, real.numpy()[:max(64, 4 * b)], counts, rounds=5, batch=b,
                                        per_round=True) for b in (1, 64)} \
            if manifest["kind"] == "multi_exit" else None
        manifest = record_stage_threads(args.out, measured, batch_plans=plans)
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
    if args.stage_threads:
        print("threads per stage (the fastest of " + ", ".join(map(str, manifest["stage_threads"]["candidates"]))
              + "): " + "; ".join(f"batch {b}: {e['threads']}" for b, e in manifest["stage_threads"]["batches"].items()))
    _list_files(args.out)
    portable = (manifest.get("executorch") or {}).get("portable_ops")
    if portable:
        print("not delegated to XNNPACK (ExecuTorch portable kernels): "
              + ", ".join(f"{r['op']} from {r['module']}" for r in portable))
    return 0


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
