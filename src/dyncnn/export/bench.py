"""The deployment latency table behind ``dyncnn bench`` and ``benchmarks/bench_deploy.py``.

One process, one fixed thread count for eager PyTorch and ONNX Runtime alike; each point is the median of
repeated timed runs after warm-up (``profile.latency.time_callable``) with the interquartile range as spread.
Rows: eager FP32, then per runtime (ONNX Runtime, ExecuTorch with XNNPACK) FP32 and INT8 (the model exported into
a temporary bundle per runtime and quantized on calibration images), at each batch size. ExecuTorch's bundles are
exported with their batch bound at the largest batch timed, so no call is chunked.

For a multi-exit network every row is timed twice on the same real images, in alternating rounds: with the exit
policy and forced to full depth. Batch 1 runs the images one at a time (the per-call time is the loop's time
divided by their number, so easy and hard images are both in it); a larger batch runs them together, with
compaction. The realized speedup (full-depth time / policy time) is reported beside the MAC speedup (full-depth
MACs / mean MACs of the ledger), and for the ONNX Runtime FP32 bundle the driver's own overhead: the share of a
full-depth batch-1 call spent outside ONNX Runtime sessions.

:func:`bench_bundle` times an exported bundle folder as it is (no model, no eager rows): the ONNX Runtime rows of
each precision the bundle holds, and for a multi-exit bundle the same paired policy / full-depth rounds.
"""
from __future__ import annotations

import copy
import tempfile
import time
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from ..profile.latency import DEFAULT_THREADS, on_device, spread_warning, summarize, time_callable, torch_threads
from .bundle_format import read_manifest
from .runtime import load_bundle
from .staged import export_bundle, is_multi_exit, own_writer


def _repeat_to(images: Tensor, n: int) -> Tensor:
    reps = -(-n // len(images))
    return images.repeat(reps, 1, 1, 1)[:n].contiguous()


def _accuracy(pred: Tensor | np.ndarray, labels: Tensor | None) -> float | None:
    if labels is None:
        return None
    pred = torch.as_tensor(np.asarray(pred))
    return float((pred == labels[:len(pred)]).double().mean())


def _point(fn: Callable[[], object], calls: int, min_time_s: float) -> dict:
    """Median / quartiles per call of ``fn`` (which makes ``calls`` calls)."""
    times = [t / calls for t in time_callable(fn, warmup=1, min_runs=5, min_time_s=min_time_s)]
    return summarize(times, "", 1, 1).as_dict()


def _paired(fns: dict[str, Callable[[], object]], calls: int, min_time_s: float, rounds: int = 3) -> dict:
    """Like :func:`_point` for several callables timed in alternating rounds, so that a change of machine load
    hits all of them alike (their ratio is what the table reports)."""
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(rounds):
        for k, fn in fns.items():
            times[k] += [t / calls for t in time_callable(fn, warmup=1, min_runs=3, min_time_s=min_time_s / rounds)]
    return {k: summarize(v, "", 1, 1).as_dict() for k, v in times.items()}


def bench_model(model: nn.Module, images: Tensor, labels: Tensor | None = None, *, policy=None,
                threads: int = DEFAULT_THREADS, batch_sizes: Sequence[int] = (1, 64), quantize: bool = True,
                calibration: Tensor | None = None, min_time_s: float = 0.5, single_images: int = 32,
                workdir: str | Path | None = None, runtimes: Sequence[str] = ("onnxruntime",),
                device: torch.device | str = "cpu") -> dict:
    """Latency (and accuracy when ``labels`` are given) of ``model`` in eager and as an exported bundle.

    ``images`` (N, C, H, W) are real inputs: batch ``b`` uses the first ``b`` (repeated if fewer), batch 1 of a
    multi-exit network loops over the first ``single_images`` of them. Returns a dict with ``rows`` (one per
    backend / precision / batch / mode) and, for multi-exit networks, ``dynamic`` (speedups, overhead, exits).
    ``runtimes``: the bundle runtimes timed beside eager ("onnxruntime", "executorch"). ``device``: where the eager
    rows run (a copy of the model; a GPU's time includes copying each batch there and waiting for the result);
    bundles run on the CPU. Accuracy and eager parity are read from ``model`` where it is.
    """
    model.eval()
    device = torch.device(device)
    eager_model = model if device.type == "cpu" else copy.deepcopy(model).to(device)
    shape = tuple(images.shape[1:])
    dynamic = is_multi_exit(model)
    glance = own_writer(model) is not None      # glance-and-focus: its own graphs and patch-cropping driver
    calibration = images[:128] if calibration is None else calibration
    out: dict = {"model_class": type(model).__name__,
                 "kind": "glance" if glance else "multi_exit" if dynamic else "static",
                 "input_shape": list(shape), "threads": threads, "batch_sizes": list(batch_sizes),
                 "eager_device": device.type, "rows": []}
    with tempfile.TemporaryDirectory(dir=workdir) as tmp, torch_threads(threads), torch.inference_mode():
        if glance:
            from .glance import load_glance_bundle
            manifest = export_bundle(model, Path(tmp) / "bundle", shape, policy=policy)
            bundles = {("onnxruntime", "fp32"): load_glance_bundle(Path(tmp) / "bundle", threads=threads)}
            return _bench_dynamic(model, images, labels, bundles, manifest, batch_sizes, min_time_s, single_images,
                                  out, eager_model)
        precisions = ["fp32"] + (["int8"] if quantize else [])
        bundles = {}
        for rt in runtimes:
            folder = Path(tmp) / rt
            manifest = export_bundle(model, folder, shape, policy=policy, quantize=quantize,
                                     calibration=calibration if quantize else None, runtime=rt,
                                     max_batch=max(max(batch_sizes), 2))
            bundles.update({(rt, p): load_bundle(folder, p, threads=threads) for p in precisions})
        if not dynamic:
            out["macs"] = manifest["macs"]
            runners = {("eager", "fp32"): on_device(lambda x: eager_model(x), device)}
            runners.update({key: b.run_numpy for key, b in bundles.items()})
            for (backend, prec), fn in runners.items():
                for b in batch_sizes:
                    x = _repeat_to(images, b)
                    xin = x if backend == "eager" else x.numpy()
                    stats = _point(lambda: fn(xin), 1, min_time_s)
                    out["rows"].append({"backend": backend, "precision": prec, "batch": b, **_clean(stats)})
            if labels is not None:
                out["accuracy"] = {f"{bk}_{p}": _accuracy(_predict(fn, images, bk), labels)
                                   for (bk, p), fn in runners.items()}
            return out
        return _bench_dynamic(model, images, labels, bundles, manifest, batch_sizes, min_time_s, single_images,
                              out, eager_model)


def bench_bundle(folder: str | Path, images: Tensor, labels: Tensor | None = None, *, threads: int = DEFAULT_THREADS,
                 batch_sizes: Sequence[int] = (1, 64), min_time_s: float = 0.5, single_images: int = 32) -> dict:
    """Latency (and accuracy when ``labels`` are given) of the exported bundle in ``folder`` with ONNX Runtime,
    for every precision it holds (FP32, and INT8 when exported with ``--quantize``); the result has the shape of
    :func:`bench_model`'s, without eager rows and eager parity."""
    folder = Path(folder)
    manifest = read_manifest(folder)
    kind = manifest["kind"]
    precisions = ["fp32"]
    if kind != "glance":
        graphs = [manifest["graph"]] if kind == "static" else [st for st in manifest["stages"] if st["files"]]
        if graphs and all("int8" in g["files"] for g in graphs):
            precisions.append("int8")
    out: dict = {"bundle": str(folder), "model_class": manifest.get("model_class"), "kind": kind,
                 "input_shape": list(manifest["input"]["shape"][1:]), "threads": threads,
                 "batch_sizes": list(batch_sizes), "rows": []}
    with torch_threads(threads):
        if kind == "glance":
            from .glance import load_glance_bundle
            bundles = {(manifest.get("runtime", "onnxruntime"), "fp32"): load_glance_bundle(folder, threads=threads)}
        else:
            bundles = {(manifest.get("runtime", "onnxruntime"), p): load_bundle(folder, p, threads=threads)
                       for p in precisions}
        if kind != "static":
            return _bench_dynamic(None, images, labels, bundles, manifest, batch_sizes, min_time_s, single_images,
                                  out)
        out["macs"] = manifest["macs"]
        for (backend, prec), bundle in bundles.items():
            for b in batch_sizes:
                xin = _repeat_to(images, b).numpy()
                stats = _point(lambda: bundle.run_numpy(xin), 1, min_time_s)
                out["rows"].append({"backend": backend, "precision": prec, "batch": b, **_clean(stats)})
        if labels is not None:
            out["accuracy"] = {f"{bk}_{p}": _accuracy(_predict(b.run_numpy, images, bk), labels)
                               for (bk, p), b in bundles.items()}
    return out


def _predict(fn, images: Tensor, backend: str, batch: int = 256) -> np.ndarray:
    preds = []
    for i in range(0, len(images), batch):
        x = images[i:i + batch]
        y = fn(x if backend == "eager" else x.numpy())
        preds.append(np.asarray(y.cpu() if isinstance(y, Tensor) else y).argmax(1))
    return np.concatenate(preds)


def _clean(stats: dict) -> dict:
    return {k: stats[k] for k in ("median_ms", "p25_ms", "p75_ms", "spread_ms", "runs")}


def _bench_dynamic(model, images, labels, bundles, manifest, batch_sizes, min_time_s, single_images, out,
                   eager_model=None) -> dict:
    from ..dynamic.policy import ExitPolicy
    b32 = next(iter(bundles.values()))          # the first runtime's FP32 bundle: parity, overhead
    policy = b32.policy
    full = ExitPolicy.never(b32.num_exits)
    runners = {} if eager_model is None else \
        {("eager", "fp32"): on_device(lambda x, p: eager_model.infer(x, p), out.get("eager_device", "cpu"))}
    runners.update({key: b.run for key, b in bundles.items()})
    singles = [images[i:i + 1].contiguous() for i in range(min(single_images, len(images)))]
    singles_np = [s.numpy() for s in singles]
    speedups = []
    for (backend, prec), fn in runners.items():
        xs = singles if backend == "eager" else singles_np
        for b in batch_sizes:
            if b == 1:
                calls = {m: (lambda p=p: [fn(s, p) for s in xs]) for m, p in (("policy", policy), ("full", full))}
            else:
                x = _repeat_to(images, b)
                xin = x if backend == "eager" else x.numpy()
                calls = {m: (lambda p=p: fn(xin, p)) for m, p in (("policy", policy), ("full", full))}
            stats = _paired(calls, len(xs) if b == 1 else 1, min_time_s)
            times = {mode: st["median_ms"] for mode, st in stats.items()}
            for mode, st in stats.items():
                out["rows"].append({"backend": backend, "precision": prec, "batch": b, "mode": mode,
                                    **_clean(st)})
            res = [fn(s, policy) for s in xs] if b == 1 else [fn(_repeat_to(images, b), policy)]
            mean_macs = float(np.mean(np.concatenate([r.macs.numpy() for r in res])))
            mac_speedup = manifest["exit_macs"][-1] / mean_macs
            realized = times["full"] / times["policy"]
            speedups.append({"backend": backend, "precision": prec, "batch": b, "mac_speedup": mac_speedup,
                             "realized_speedup": realized, "kept": realized / mac_speedup})
    # the driver's own overhead: time outside ONNX Runtime sessions in full-depth batch-1 calls
    overhead = None
    if hasattr(b32, "session_seconds"):
        for s in singles_np[:4]:
            b32.run_numpy(s, full)
        b32.session_seconds = 0.0
        t0, reps = time.perf_counter(), 0
        while reps < 3 or time.perf_counter() - t0 < min_time_s:
            for s in singles_np:
                b32.run_numpy(s, full)
            reps += 1
        overhead = 1.0 - b32.session_seconds / (time.perf_counter() - t0)
    parities = {}                       # a bundle benchmarked on its own has no eager model to agree with
    if model is not None:
        eager = model.infer(images, policy)
        for (backend, prec), b in bundles.items():
            if prec != "fp32":
                continue
            res = b.run(images, policy)
            parities[backend] = {"n": len(images), "same_exit": int((res.exit_index == eager.exit_index).sum()),
                                 "same_macs": int((res.macs == eager.macs).sum()),
                                 "max_rel_err": float((res.logits - eager.logits).abs().max() /
                                                      eager.logits.abs().max())}
    res = b32.run(images, policy)
    parity = next(iter(parities.values()), None)
    out["dynamic"] = {"exit_macs": manifest["exit_macs"], "policy": manifest["policy"], "parity": parity,
                      "parities": parities,
                      "exit_histogram": np.bincount(res.exit_index.numpy(), minlength=b32.num_exits).tolist(),
                      "mean_macs": float(res.macs.double().mean()), "speedups": speedups,
                      "driver_overhead_full_depth_b1": overhead}
    if labels is not None:
        acc = {} if model is None else {"eager_fp32": _accuracy(model.infer(images, policy).logits.argmax(1), labels)}
        for (backend, prec), b in bundles.items():
            r = b.run(images, policy)
            acc[f"{backend}_{prec}"] = _accuracy(r.logits.argmax(1), labels)
            acc[f"{backend}_{prec}_mean_macs"] = float(r.macs.double().mean())
        out["accuracy"] = acc
    return out


def _backend_name(result: dict, backend: str) -> str:
    """The backend as the tables print it: eager rows name their device when it is not the CPU."""
    device = result.get("eager_device", "cpu")
    return f"eager ({device})" if backend == "eager" and device != "cpu" else backend


def format_table(result: dict) -> str:
    """Markdown tables of a :func:`bench_model` result."""
    dyn = result["kind"] in ("multi_exit", "glance")
    lines = [f"threads: {result['threads']}   input: {'x'.join(map(str, result['input_shape']))}   median and IQR "
             f"of repeated runs after warm-up"]
    head = "| backend | precision | batch |" + (" mode |" if dyn else "") + \
        " median ms/call | IQR ms | ms/sample | runs |"
    lines += [head, "|" + "---|" * (head.count("|") - 1)]
    for r in result["rows"]:
        lines.append(f"| {_backend_name(result, r['backend'])} | {r['precision']} | {r['batch']} |" +
                     (f" {r['mode']} |" if dyn else "")
                     + f" {r['median_ms']:.3f} | {r['spread_ms']:.3f} | {r['median_ms'] / r['batch']:.4f} |"
                     f" {r['runs']} |")
    if dyn:
        d = result["dynamic"]
        p = d["parity"]
        lines += ["", f"exits taken (all {sum(d['exit_histogram'])} images): {d['exit_histogram']}   mean MACs "
                      f"{d['mean_macs'] / 1e6:.3f}M of {d['exit_macs'][-1] / 1e6:.3f}M at full depth"]
        for backend, p in (d.get("parities") or ({"onnxruntime": p} if p is not None else {})).items():
            lines.append(f"{backend} FP32 bundle vs eager infer: same exit for {p['same_exit']}/{p['n']}, same MACs "
                         f"for {p['same_macs']}/{p['n']}, logits max relative error {p['max_rel_err']:.1e}")
        lines += ["| backend | precision | batch | MAC speedup | realized speedup | kept |",
                  "|---|---|---|---|---|---|"]
        for s in d["speedups"]:
            lines.append(f"| {_backend_name(result, s['backend'])} | {s['precision']} | {s['batch']} | "
                         f"{s['mac_speedup']:.2f}x | "
                         f"{s['realized_speedup']:.2f}x | {s['kept']:.2f} |")
        if d["driver_overhead_full_depth_b1"] is not None:
            lines.append(f"driver overhead (time outside ONNX Runtime, full depth, batch 1): "
                         f"{d['driver_overhead_full_depth_b1']:.1%}")
    lines += int8_notes(result["rows"])
    warning = spread_warning(result["rows"])
    if warning:
        lines.append(warning)
    if result.get("accuracy"):
        lines.append("accuracy: " + ", ".join(f"{k} {v:.4f}" if "macs" not in k else f"{k} {v / 1e6:.3f}M"
                                              for k, v in result["accuracy"].items()))
    return "\n".join(lines)


def int8_notes(rows: Sequence[dict]) -> list[str]:
    """A note for each ONNX Runtime INT8 row slower than its FP32 row (same batch and mode)."""
    fp32 = {(r["batch"], r.get("mode")): r["median_ms"] for r in rows
            if r["backend"] == "onnxruntime" and r["precision"] == "fp32"}
    notes = []
    for r in rows:
        ref = fp32.get((r["batch"], r.get("mode")))
        if r["backend"] == "onnxruntime" and r["precision"] == "int8" and ref and r["median_ms"] > ref:
            mode = f" {r['mode']}" if r.get("mode") else ""
            notes.append(f"note: INT8 is slower than FP32 at batch {r['batch']}{mode} ({r['median_ms']:.3f} vs "
                         f"{ref:.3f} ms): on this CPU the quantize/dequantize steps cost more than the INT8 "
                         f"arithmetic saves for this network; INT8 pays off where the CPU has fast integer dot "
                         f"products (VNNI, ARM dotprod) and on larger convolutions")
    return notes


def profile_bundle(folder: str | Path, batch_sizes: Sequence[int] = (1, 32), threads: int = DEFAULT_THREADS,
                   min_time_s: float = 1.0, seed: int = 0) -> dict:
    """``dyncnn profile DIR`` of an exported bundle: the MACs its manifest records, the weights its FP32 graphs
    hold, and ONNX Runtime latency on random inputs (full depth for a multi-exit bundle: the exit policy's
    latency depends on the images, which is what :func:`bench_bundle` measures)."""
    import onnx

    from ..dynamic.policy import ExitPolicy
    folder = Path(folder)
    manifest = read_manifest(folder)
    kind = manifest["kind"]
    shape = [int(s) for s in manifest["input"]["shape"][1:]]
    if kind == "glance":
        from .glance import load_glance_bundle
        bundle = load_glance_bundle(folder, threads=threads)
    else:
        bundle = load_bundle(folder, "fp32", threads=threads)
    if kind == "static":
        run, macs, exit_macs = bundle.run_numpy, int(manifest["macs"]), None
    else:
        full = ExitPolicy.never(bundle.num_exits)
        run, exit_macs = (lambda x: bundle.run(x, full)), [int(m) for m in manifest["exit_macs"]]
        macs = exit_macs[-1]
    params = 0
    file_bytes = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
    for f in sorted(folder.glob("*.onnx")):          # the FP32 graphs (INT8 ones are in int8/)
        if f.name == "single.onnx":                   # the torch.cond form repeats the stage graphs' weights
            continue
        for init in onnx.load(str(f), load_external_data=False).graph.initializer:
            params += int(np.prod(init.dims)) if init.data_type == onnx.TensorProto.FLOAT else 0
    gen = torch.Generator().manual_seed(seed)
    x1 = torch.rand(1, *shape, generator=gen).numpy()
    latency = []
    for b in batch_sizes:
        xb = np.ascontiguousarray(np.repeat(x1, b, axis=0))
        times = time_callable(lambda: run(xb), warmup=3, min_runs=5, min_time_s=min_time_s)
        latency.append({**summarize(times, "onnxruntime", b, threads).as_dict(),
                        "mode": None if kind == "static" else "full depth"})
    return {"model": str(folder), "bundle_kind": kind, "model_class": manifest.get("model_class"),
            "input_shape": shape, "macs": macs, "exit_macs": exit_macs, "params": params,
            "bundle_mb": file_bytes / 2**20, "threads": threads, "latency": latency}
