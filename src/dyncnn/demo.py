"""The quick demo on the embedded data: train a small static mobile network on ScaledMNIST with clutter,
evaluate it (overall and by digit scale), measure its MACs and latency, and write a report with plots.

The early-exit work replaces this with the dynamic demo (a multi-exit network against its static counterpart).
"""
from __future__ import annotations

import time
from pathlib import Path

import torch

from .data import ScaledMNIST
from .models import create_model
from .profile import count_macs, measure_latency
from .train import TrainConfig, Trainer, evaluate
from .train.checkpoint import atomic_write_text
from .viz import plot_accuracy_by_scale, plot_training_curves

MODEL = "tiny_mobilenet"
MODEL_CFG = {"widths": (32, 64, 128, 256)}
DATA_CFG = {"canvas": 64, "clutter": 2}


@torch.no_grad()
def accuracy_by_scale(model, dataset: ScaledMNIST, edges=(0.25, 0.35, 0.5, 0.7, 0.91)) -> tuple[list, list]:
    model.eval()
    preds = torch.cat([model(dataset.images[i:i + 256].float() / 255).argmax(1)
                       for i in range(0, len(dataset), 256)])
    correct = preds == dataset.targets
    accs, counts = [], []
    for lo, hi in zip(edges[:-1], edges[1:]):
        sel = (dataset.scales >= lo) & (dataset.scales < hi)
        counts.append(int(sel.sum()))
        accs.append(float(correct[sel].float().mean()) if sel.any() else 0.0)
    return accs, counts


def run_demo(out_dir: Path = Path("runs/demo"), epochs: int | None = None, threads: int = 2) -> dict:
    t0 = time.perf_counter()
    torch.set_num_threads(threads)
    out_dir = Path(out_dir)
    print(f"[1/4] building ScaledMNIST ({DATA_CFG['canvas']}x{DATA_CFG['canvas']}, clutter {DATA_CFG['clutter']}) "
          f"from the 5,000 embedded MNIST digits")
    train, val, test = (ScaledMNIST(s, **DATA_CFG) for s in ("train", "val", "test"))
    model = create_model(MODEL, num_classes=10, in_chans=1, **MODEL_CFG)
    config = TrainConfig(epochs=epochs or 15, batch_size=64, lr=0.1, weight_decay=5e-4, label_smoothing=0.05,
                         warmup_epochs=0.5)
    print(f"[2/4] training {MODEL} {MODEL_CFG} for {config.epochs} epochs on {len(train)} images")
    result = Trainer(model, train, val, config, out_dir=out_dir,
                     extra={"data": {"name": "scaled_mnist", **DATA_CFG, "input_size": DATA_CFG["canvas"]}}).fit()
    print("[3/4] evaluating and profiling")
    test_metrics = evaluate(model, test)
    x = test[0][0].unsqueeze(0)
    macs = count_macs(model, x)
    lat = {b: measure_latency(model, x, [1, 64], threads=threads, backend=b) for b in ("eager", "onnxruntime")}
    accs, counts = accuracy_by_scale(model, test)
    print("[4/4] writing report and plots")
    plot_training_curves(result.history, out_dir / "training.png", title=f"{MODEL} on ScaledMNIST")
    edges = (0.25, 0.35, 0.5, 0.7, 0.91)
    plot_accuracy_by_scale(edges, accs, counts, out_dir / "accuracy_by_scale.png",
                           title="small digits are the hard inputs")
    rows = [("test accuracy", f"{test_metrics['acc']:.4f}"),
            ("MACs / image", f"{macs.per_sample / 1e6:.2f}M"),
            ("parameters", f"{macs.params / 1e3:.1f}K")]
    for backend, stats in lat.items():
        for b, s in stats.items():
            rows.append((f"latency {backend}, batch {b} ({threads} threads)",
                         f"{s.median_ms:.3f} ms (IQR {s.spread_ms:.3f}, {s.runs} runs)"))
    for (lo, hi), a, n in zip(zip(edges[:-1], edges[1:]), accs, counts):
        rows.append((f"accuracy, digit scale {lo:.2f}-{hi:.2f}", f"{a:.4f} (n={n})"))
    table = "| metric | value |\n|---|---|\n" + "".join(f"| {k} | {v} |\n" for k, v in rows)
    elapsed = time.perf_counter() - t0
    report = (f"# dyncnn demo\n\n{MODEL} {MODEL_CFG} trained {config.epochs} epochs on ScaledMNIST "
              f"({DATA_CFG}).\n\n{table}\n![training](training.png)\n![accuracy by scale](accuracy_by_scale.png)\n\n"
              f"Total time: {elapsed:.0f}s.\n")
    atomic_write_text(out_dir / "report.md", report)
    print()
    print(table)
    print(f"report, plots and checkpoints in {out_dir}/ ({elapsed:.0f}s)")
    return {"test_acc": test_metrics["acc"], "macs": macs.per_sample, "latency": lat, "seconds": elapsed}
