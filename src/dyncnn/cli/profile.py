"""``dyncnn profile``: MACs, parameters, memory and latency of a model or an exported bundle."""
from __future__ import annotations

import json
from pathlib import Path

from ..errors import DyncnnError
from .common import THREADS, _device, _input_shape, _is_bundle, _load_model, _parse_cfg


def add_parser(sub) -> None:
    p = sub.add_parser("profile", help="MACs, parameters, memory and latency (eager and ONNX Runtime)",
                       description="Profile MODEL (registered name, torchvision:NAME, timm:NAME or a checkpoint): "
                                   "MACs, parameters, peak activation memory, and latency in eager PyTorch and "
                                   "ONNX Runtime at each batch size with a fixed thread count.")
    p.add_argument("model", help="registered name, torchvision:NAME, timm:NAME, checkpoint (.safetensors) or an "
                   "exported bundle folder (with manifest.json)")
    p.add_argument("--input-size", type=int, default=None, help="square input side (default 224, or the "
                   "checkpoint's data size)")
    p.add_argument("--in-chans", type=int, default=None, help="input channels (default: the model's)")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 32], help="batch sizes timed")
    p.add_argument("--threads", type=int, default=THREADS, help="intra-op threads of eager PyTorch and ONNX Runtime")
    p.add_argument("--min-time", type=float, default=1.0, help="seconds of timed runs per point")
    p.add_argument("--no-onnx", action="store_true", help="skip the ONNX Runtime measurement")
    p.add_argument("--optimize", action="store_true", help="also time the eager model after "
                   "optimize_for_inference (BatchNorm folded into the convolutions, channels-last weights)")
    p.add_argument("--device", default="auto", help="where the eager rows run: auto (CUDA when available), cpu, "
                   "cuda, cuda:N or mps (ONNX Runtime runs on the CPU)")
    p.add_argument("--cfg", nargs="*", metavar="KEY=VALUE", help="model keyword arguments")
    p.add_argument("--json", action="store_true", help="print JSON instead of tables")
    p.set_defaults(func=run)


def run(args) -> int:
    import torch

    from ..profile import count_macs, measure_latency, peak_memory
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
            from ..layers.fusion import optimize_for_inference
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
    from ..profile.latency import spread_warning
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
    from ..export.bench import profile_bundle
    from ..export.runtime import _read_manifest
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
