"""Skip-RNN on the embedded digits read row by row (28 steps of 28 features): accuracy, skipped state updates and
the measured wall-clock speedup of executed skipping (issue 9, target: >= 40% of updates skipped within 1 point
of the plain RNN's accuracy).

Trains the plain GRU (``skiprnn_plain_gru_mnist_rows``: every update taken) and Skip-GRUs with several cost
weights lambda (``skiprnn_gru_mnist_rows``) with the library's Trainer on the train split (1 thread), scores the
test split with executed ``infer``, and times ``infer`` of each Skip-GRU against the plain model's ``infer`` (the
same code path with every update taken) in the same process, at batch 64 and at batch 1 (64 test sequences one
at a time), median of repeated runs after warm-up, ``--threads`` threads. ``torch.nn.GRU`` (fused C++ loop over
the same weights) is timed too, for reference.

``--data clips`` does the same on ``ClipFeatureSequences`` (MovingDigits clips, 16 frames pooled to 16x16 = 256
features per step; the digit is visible in 25-50% of the frames).

    python benchmarks/bench_skiprnn.py [--data rows|clips] [--epochs 30] [--costs 0.003,0.01] [--cell gru] [--quick]
    python benchmarks/bench_skiprnn.py --step-profile        # one inference step, part by part (no training)
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

from dyncnn.data.sequences import ClipFeatureSequences, RowSequenceDigits
from dyncnn.models import create_model
from dyncnn.profile.latency import median_ms, retain_freed_memory, torch_threads
from dyncnn.train import TrainConfig, Trainer


def train(name: str, train_set, val_set, args, **cfg) -> tuple[nn.Module, float]:
    """Train ``name`` (or load it from ``--cache`` when a previous run with the same settings saved it)."""
    torch.manual_seed(args.seed)
    model = create_model(name, num_classes=10, hidden_size=args.hidden, **cfg)
    key = f"{name}_h{args.hidden}_e{args.epochs}_lr{args.lr:g}_s{args.seed}" + "".join(f"_{k}{v:g}" for k, v in cfg.items())
    path = Path(args.cache) / f"{key}.pt" if args.cache else None
    if path is not None and path.exists():
        model.load_state_dict(torch.load(path))
        return model.eval(), float("nan")
    config = TrainConfig(device="cpu", epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, optimizer="adamw",
                         weight_decay=1e-4, grad_clip=1.0, seed=args.seed, progress=False)
    t0 = time.perf_counter()
    with torch_threads(args.train_threads):
        Trainer(model, train_set, val_set, config).fit()
    secs = time.perf_counter() - t0
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(model.state_dict(), path.with_suffix(".tmp"))
        path.with_suffix(".tmp").rename(path)
    return model.eval(), secs


@torch.no_grad()
def score(model, xs: torch.Tensor, ys: torch.Tensor) -> dict:
    r = model.infer(xs)
    steps = xs.shape[1]
    return {"acc": float((r.logits.argmax(1) == ys).float().mean()), "skipped": 1 - float(r.exit_index.float().mean()) / steps,
            "macs": float(r.macs.double().mean()), "full": model.full_macs(xs[:1])}


def fused_gru(model) -> nn.Module:
    """torch.nn.GRU/LSTM with the plain model's weights (reference timing of a fused recurrent loop)."""
    cell = model.step.cell
    rnn = (nn.GRU if isinstance(cell, nn.GRUCell) else nn.LSTM)(cell.input_size, cell.hidden_size, batch_first=True)
    with torch.no_grad():
        for a in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
            getattr(rnn, f"{a}_l0").copy_(getattr(cell, a))
    head = model.head

    def run(x):
        out, _ = rnn(x)
        return head(out[:, -1])
    return run


def latencies_ms(fns: dict, x: torch.Tensor, batch: int, rounds: int) -> dict:
    """Median ms of each ``fns[key](input)`` over the first 64 sequences: as one batch (batch 64) or one at a time
    (batch 1). The functions are timed in interleaved rounds so that a change of machine load hits them alike."""
    xs = x[:64]
    inputs = [xs[i:i + 1] for i in range(len(xs))] if batch == 1 else [xs]
    times: dict = {k: [] for k in fns}
    with torch.no_grad():
        for r in range(rounds + 2):                     # the first two rounds are warm-up
            for k, fn in fns.items():
                t0 = time.perf_counter()
                for inp in inputs:
                    fn(inp)
                if r >= 2:
                    times[k].append((time.perf_counter() - t0) * 1e3)
    return {k: statistics.median(v) for k, v in times.items()}


def step_profile(hidden: int, features: int, steps: int, threads: list[int], repeats: int = 2000) -> list[str]:
    """What one step of executed skipping costs at batch 64 with half the rows updating, part by part, against the
    plain model's step (the whole batch through the cell): the bound of the realized / MAC ratio."""
    model = create_model("skiprnn_gru_mnist_rows", num_classes=10, hidden_size=hidden).eval()
    cell, gate = model.step.cell, model.gate
    if cell.input_size != features:
        cell = nn.GRUCell(features, hidden)
    x, h = torch.randn(64, features), torch.randn(64, hidden)
    idx = torch.arange(0, 64, 2)
    ks = torch.arange(1, steps, dtype=torch.float32)
    nt = torch.zeros(64, dtype=torch.int64)
    parts = {
        "cell, 64 rows (the plain step)": lambda: cell(x, h),
        "cell, 32 rows": lambda: cell(x[:32], h[:32]),
        "gather 32 rows + cell + scatter": lambda: h.index_copy_(0, idx, cell(x.index_select(0, idx),
                                                                              h.index_select(0, idx))),
        "gate and next update step (32 rows)": lambda: nt.index_copy_(
            0, idx, (torch.sigmoid(gate(h[:32])) * ks < 0.5).sum(1) + 1),
        "schedule (rows due, next step)": lambda: (torch.eq(nt, 0).nonzero().squeeze(1), int(nt.min())),
    }
    rows = ["| part | " + " | ".join(f"{t} thread(s), us" for t in threads) + " |",
            "|---|" + "---|" * len(threads)]
    with torch.no_grad():
        times = {}
        for t in threads:
            with torch_threads(t):
                for name, fn in parts.items():
                    times[name, t] = median_ms(fn, repeats, warmup=50) * 1e3
    for name in parts:
        rows.append(f"| {name} | " + " | ".join(f"{times[name, t]:.1f}" for t in threads) + " |")
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default="rows", choices=("rows", "clips"),
                   help="rows: digits read row by row; clips: MovingDigits frame features")
    p.add_argument("--cell", default="gru", choices=("gru", "lstm"))
    p.add_argument("--costs", default="0.003,0.01,0.02,0.04", help="cost weights lambda per update")
    p.add_argument("--epochs", type=int, default=40)
    p.add_argument("--hidden", type=int, default=110)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", default="1,2", help="thread counts for the latency measurement")
    p.add_argument("--train-threads", type=int, default=1)
    p.add_argument("--cache", default=None, help="folder to save trained weights to / load them from (re-timing)")
    p.add_argument("--rounds", type=int, default=15, help="timed rounds per latency measurement")
    p.add_argument("--quick", action="store_true", help="3 epochs, two cost weights: a smoke run")
    p.add_argument("--step-profile", action="store_true",
                   help="only the cost of one inference step, part by part (what bounds the realized speedup)")
    args = p.parse_args()
    if args.step_profile:
        threads = [int(v) for v in args.threads.split(",")]
        print(f"## one step of Skip-GRU inference at batch 64, half the rows updating (hidden {args.hidden}, "
              f"28 features), median of 2000 calls\n")
        print("\n".join(step_profile(args.hidden, 28, 28, threads)))
        return
    if args.quick:
        args.epochs, args.costs = 3, "0.01,0.04"
    torch.set_flush_denormal(True)
    retain_freed_memory()      # large activations reused, not page-faulted in again per call
    torch.set_num_threads(args.train_threads)
    name = {"rows": "mnist_rows", "clips": "clips"}[args.data]
    with torch_threads(1):
        if args.data == "rows":
            train_set, val_set, test_set = (RowSequenceDigits(s) for s in ("train", "val", "test"))
        else:
            train_set, val_set, test_set = (ClipFeatureSequences(s) for s in ("train", "val", "test"))
    xs = torch.stack([test_set[i][0] for i in range(len(test_set))])
    ys = test_set.targets

    plain, secs = train(f"skiprnn_plain_{args.cell}_{name}", train_set, val_set, args)
    base = score(plain, xs, ys)
    rows = [(f"plain {args.cell.upper()}", base, secs, None)]
    print(f"# plain: test acc {base['acc']:.4f} ({secs:.0f}s; nan = loaded from --cache)", file=sys.stderr, flush=True)
    skips = []
    for lam in (float(v) for v in args.costs.split(",")):
        model, secs = train(f"skiprnn_{args.cell}_{name}", train_set, val_set, args, cost_per_update=lam)
        skips.append(model)
        rows.append((f"Skip-{args.cell.upper()} lambda={lam:g}", score(model, xs, ys), secs, model))
        print(f"# lambda={lam:g}: test acc {rows[-1][1]['acc']:.4f}, skipped {rows[-1][1]['skipped']:.1%} ({secs:.0f}s)",
              file=sys.stderr, flush=True)

    threads = [int(v) for v in args.threads.split(",")]
    fused = fused_gru(plain)
    lat = {}                                   # (threads, batch) -> {"plain" | "fused" | i: ms}
    fns = {"plain": plain.infer, "fused": fused, **{i: m.infer for i, m in enumerate(skips)}}
    for n_thr in threads:
        with torch_threads(n_thr):
            for b in (1, 64):
                lat[n_thr, b] = latencies_ms(fns, xs, b, rounds=args.rounds)

    what = ("row-sequence digits (28 steps x 28 features)" if args.data == "rows" else
            f"MovingDigits clip features ({train_set.seq_len} frames x {train_set.feature_size} features)")
    print(f"\n{what}, {args.cell.upper()} hidden {args.hidden}, {args.epochs} epochs, test split ({len(ys)} "
          f"sequences); speedup = plain-model infer time / Skip model infer time, eager PyTorch, same process; "
          f"b1 = the first 64 test sequences one at a time, b64 = them as one batch; t = torch threads\n")
    cols = [f"speedup b{b} t{n}" for n in threads for b in (1, 64)]
    print("| model | test acc | updates skipped | MACs / seq | MAC speedup | " + " | ".join(cols) + " | train s |")
    print("|---|---|---|---|---|" + "---|" * len(cols) + "---|")
    for name_, r, secs, model in rows:
        key = "plain" if model is None else skips.index(model)
        sp = [f"{lat[n, b]['plain'] / lat[n, b][key]:.2f}x" for n in threads for b in (1, 64)]
        print(f"| {name_} | {r['acc']:.4f} | {r['skipped']:.1%} | {r['macs'] / 1e6:.3f}M | "
              f"{base['macs'] / r['macs']:.2f}x | " + " | ".join(sp) + f" | {'cached' if secs != secs else f'{secs:.0f}'} |")
    print(f"\nabsolute times of the plain model's infer (64 sequences) and, for reference, of torch.nn."
          f"{args.cell.upper()} (fused loop, same weights):")
    for n in threads:
        for b in (1, 64):
            print(f"- {n} thread(s), {'64 x batch 1' if b == 1 else 'batch 64'}: plain infer "
                  f"{lat[n, b]['plain']:.2f} ms, nn.{args.cell.upper()} {lat[n, b]['fused']:.2f} ms")


if __name__ == "__main__":
    main()
