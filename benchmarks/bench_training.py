"""Training time on a CPU: the Trainer against a bare PyTorch loop, channels-last, ``torch.compile``, and what
rendering the data costs.

On the same model (a static network of the ``demo`` frontier preset), the same initial weights and the same
batches (``epoch_batches``: the Trainer's sample order), interleaved in rounds (a change of machine load hits all
alike), median over rounds, images per second:

- ``trainer``: ``Trainer.fit`` for one epoch of ``--steps`` batches (no validation set, no output folder), SGD with
  the Trainer's settings, as ``dyncnn frontier`` trains;
- ``bare``: the loop a user would write: the same optimizer, learning-rate schedule and loss, the batch taken
  straight from the dataset's tensors;
- ``bare channels-last``, ``trainer channels-last``: model and batches in ``torch.channels_last``
  (``TrainConfig(channels_last=True)``);
- ``trainer compile`` (``--compile``): ``TrainConfig(compile=True)`` (``torch.compile`` of the training forward),
  its first round (the compilation) reported apart.

Then the rendering: building the ScaledMNIST training split (3 renderings of 3,500 digits, as ``frontier``
does) against one epoch of training on it, estimated from the measured step time.

    python benchmarks/bench_training.py [--model "tiny-M /2"] [--steps 20] [--rounds 5] [--threads 1] [--compile]
    python benchmarks/bench_training.py --estimate demo|full|phone [--threads 1] [--channels-last]

``--estimate PRESET``: how long ``dyncnn frontier --preset PRESET`` trains on this CPU, estimated: every model of
the preset (static and trained dynamic ones, at the preset's canvas) times 5 training steps on batches of 64 after
two warm-up steps, and the median step is multiplied by the frontier's steps (164 per epoch: 3 renderings of 3,500
digits; 5 epochs) for one training seed. Evaluation after each epoch, rendering and the timing phase come on top.

Prints the machine's load average: on a shared machine every figure is slower than on an idle one, but the ratios
are measured in the same rounds.
"""
from __future__ import annotations

import argparse
import copy
import math
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F
from torch.utils.data import Subset

from dyncnn.data import ScaledMNIST
from dyncnn.frontier.runner import build_static, presets
from dyncnn.train import TrainConfig, Trainer
from dyncnn.train.trainer import epoch_batches


def trainer_epoch(model, data, cfg: TrainConfig) -> float:
    t0 = time.perf_counter()
    Trainer(model, data, None, cfg).fit()
    return time.perf_counter() - t0


def bare_epoch(model, images, targets, cfg: TrainConfig, channels_last: bool = False) -> float:
    """The same optimizer (SGD, momentum 0.9, Nesterov, decay on weights only), cosine learning rate and label
    smoothing as the Trainer, batches indexed straight from the tensors."""
    t0 = time.perf_counter()
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    decay = [p for p in model.parameters() if p.ndim > 1]
    rest = [p for p in model.parameters() if p.ndim <= 1]
    opt = torch.optim.SGD([{"params": decay, "weight_decay": cfg.weight_decay}, {"params": rest, "weight_decay": 0}],
                          lr=cfg.lr, momentum=0.9, nesterov=True)
    batches = epoch_batches(len(targets), cfg.batch_size, cfg.seed, 0)
    model.train()
    for step, idx in enumerate(batches):
        x = images[idx].float().div_(255)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        for g in opt.param_groups:
            g["lr"] = 0.5 * cfg.lr * (1 + math.cos(math.pi * step / len(batches)))
        loss = F.cross_entropy(model(x), targets[idx], label_smoothing=cfg.label_smoothing)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return time.perf_counter() - t0


def estimate(preset: str, channels_last: bool) -> None:
    from dyncnn.frontier.runner import build_dynamic
    from dyncnn.train.trainer import OwnTrainingLoss
    canvas = 128 if preset in ("phone", "headline") else 64
    models = presets(canvas)[preset]
    specs = {m["label"]: m for m in models["static"]}
    todo = [(m["label"], build_static(m), None) for m in models["static"]]
    todo += [(d["label"], build_dynamic(d, {}, specs), None) for d in models["dynamic"] if d["kind"] == "trained"]
    total = 0.0
    print(f"\n| {preset} model ({canvas}x{canvas}) | s per step of 64 (median of 5) | 5 epochs of 164 steps |")
    print("|---|---|---|")
    for label, net, loss_fn in todo:
        net.train()
        x, y = torch.rand(64, 1, canvas, canvas), torch.randint(0, 10, (64,))
        if channels_last:
            net, x = net.to(memory_format=torch.channels_last), x.contiguous(memory_format=torch.channels_last)
        opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9)
        times = []
        for i in range(7):
            t0 = time.perf_counter()
            out = net(x)
            # a model that owns its training loss (the frontier's IMTA recipe) is trained with it, as Trainer does
            loss = net.training_loss(out, y) if isinstance(net, OwnTrainingLoss) else F.cross_entropy(out, y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if i >= 2:
                times.append(time.perf_counter() - t0)
        step = statistics.median(times)
        total += step * 164 * 5
        print(f"| {label} | {step:.3f} | {step * 164 * 5 / 60:.1f} min |", flush=True)
    print(f"| **all ({len(todo)} models), one training seed** | | **{total / 60:.0f} min** |")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    labels = [s["label"] for s in presets(64)["demo"]["static"]]
    p.add_argument("--model", default="tiny-M /2", choices=labels)
    p.add_argument("--steps", type=int, default=20, help="batches of 64 per timed epoch")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--compile", action="store_true", help="also time TrainConfig(compile=True)")
    p.add_argument("--estimate", choices=["demo", "full", "phone", "headline"],
                   help="estimate a preset's training time instead")
    p.add_argument("--channels-last", action="store_true", help="with --estimate: train in channels-last")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(f"load average {os.getloadavg()}, {os.cpu_count()} CPUs, {args.threads} thread(s), torch "
          f"{torch.__version__}" + ("" if args.estimate else f", model {args.model}, {args.steps} steps of 64 per "
                                                              f"round, {args.rounds} rounds"))
    if args.estimate:
        estimate(args.estimate, args.channels_last)
        print(f"load average at the end {os.getloadavg()}")
        return 0

    t0 = time.perf_counter()
    full = ScaledMNIST("train", canvas=64, clutter=2, repeats=3)
    render_s = time.perf_counter() - t0
    data = Subset(full, range(args.steps * 64))
    images, targets = full.images[:args.steps * 64], full.targets[:args.steps * 64]
    spec = next(s for s in presets(64)["demo"]["static"] if s["label"] == args.model)
    torch.manual_seed(0)
    model0 = build_static(spec)
    cfg = TrainConfig(epochs=1, batch_size=64, lr=0.1, label_smoothing=0.05, device="cpu", progress=False)
    runs = {"trainer": lambda: trainer_epoch(copy.deepcopy(model0), data, cfg),
            "bare": lambda: bare_epoch(copy.deepcopy(model0), images, targets, cfg),
            "bare channels-last": lambda: bare_epoch(copy.deepcopy(model0), images, targets, cfg, True),
            "trainer channels-last": lambda: trainer_epoch(copy.deepcopy(model0), data,
                                                           TrainConfig(**{**cfg.__dict__, "channels_last": True}))}
    compile_first = None
    if args.compile:
        ccfg = TrainConfig(**{**cfg.__dict__, "compile": True})
        compile_first = trainer_epoch(copy.deepcopy(model0), data, ccfg)
        runs["trainer compile"] = lambda: trainer_epoch(copy.deepcopy(model0), data, ccfg)
    for fn in runs.values():          # warm-up: allocator, kernels
        fn()
    times: dict[str, list[float]] = {k: [] for k in runs}
    keys = list(runs)
    for r in range(args.rounds):
        for k in keys[r % len(keys):] + keys[:r % len(keys)]:
            times[k].append(runs[k]())
    n = args.steps * 64
    med = {k: statistics.median(v) for k, v in times.items()}
    print("\n| loop | images/s (median) | min-max over rounds | vs bare |")
    print("|---|---|---|---|")
    for k, v in times.items():
        print(f"| {k} | {n / med[k]:.0f} | {n / max(v):.0f}-{n / min(v):.0f} | {med['bare'] / med[k]:.2f} |")
    if compile_first is not None:
        print(f"\ntorch.compile: first epoch (with compilation) {compile_first:.1f} s")
    step_s = med["trainer"] / args.steps
    epoch_s = step_s * (len(full) // 64)
    print(f"\nrendering the training split ({len(full)} images, 3 per digit, once per run): {render_s:.1f} s = "
          f"{render_s / len(full) * 1e3:.2f} ms per image; one training epoch on it at the trainer's median step "
          f"({step_s * 1e3:.0f} ms per batch of 64): {epoch_s:.0f} s; 5 epochs: {5 * epoch_s:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
