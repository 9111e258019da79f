"""The lecture's claims, reproduced at small scale: one row per claim, written to ``docs/lecture.md``.

Gao Huang's lecture "Convolutional Networks for Mobile Applications" (``/work/shared/seed``) makes claims about
mobile architecture design, the gap between theoretical and practical efficiency, and dynamic networks (early
exits, dynamic depth and width, dynamic parameters, spatial and temporal adaptivity). Each claim is one function
below that runs the library on a CPU-sized problem (tiny widths, 32x32 ScaledMNIST canvases of the embedded real
digits, a few epochs, two seeds where accuracy is compared) and returns its row: the claim, its section, the
command that reproduces the row alone, dyncnn's figure and a verdict computed from the figure (holds / does not
hold here / not reproducible at this scale, with the reason). Accuracy comparisons call a difference real only when
it is larger than the spread between seeds.

The page is rewritten after every claim (temporary file + rename), so a run that is stopped leaves a page with
the claims it finished and the others marked as not run.

    python benchmarks/bench_lecture.py [--quick] [--out docs/lecture.md] [--only CLAIM ...] [--threads 2]

``--quick`` is a smoke run (about a minute: tiny subsets, one epoch, one seed); ``--only`` runs the named claims
and prints their rows without writing the page unless ``--out`` is given.
"""
from __future__ import annotations

import argparse
import copy
import datetime as dt
import math
import os
import platform
import re
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn
from torch.utils.data import Subset

sys.path.insert(0, str(Path(__file__).resolve().parent))        # the other benchmarks' helpers

from dyncnn.data import ScaledMNIST  # noqa: E402
from dyncnn.data.mnist import MNISTDigits  # noqa: E402
from dyncnn.data.sequences import RowSequenceDigits  # noqa: E402
from dyncnn.dynamic import attach_exits  # noqa: E402
from dyncnn.dynamic.budget import (anytime, assign_exits, collect_exit_logits, dynamic_evaluate,  # noqa: E402
                                   exit_scores, solve_for_budget)
from dyncnn.dynamic.evaluation import evaluate_dynamic  # noqa: E402
from dyncnn.dynamic.losses import MultiExitLoss  # noqa: E402
from dyncnn.dynamic.width import recalibrate_norms  # noqa: E402
from dyncnn.files import atomic_write_text  # noqa: E402
from dyncnn.layers import ConvNormAct, DepthwiseSeparableConv  # noqa: E402
from dyncnn.layers.shuffle import ChannelShuffle  # noqa: E402
from dyncnn.models import create_model  # noqa: E402
from dyncnn.models.condensenet import DenseLayer, PreActConv, build_condensenet, cifar_cfg  # noqa: E402
from dyncnn.models.dynconv import TINY_MOBILENET_V2, tiny_resnet_mnist  # noqa: E402
from dyncnn.models.mobilenet import MobileNet  # noqa: E402
from dyncnn.models.resnet import Bottleneck, ResNet, ResNetCfg, ResStageCfg, resnet_cifar  # noqa: E402
from dyncnn.profile.latency import measure_latency, median_ms, retain_freed_memory  # noqa: E402
from dyncnn.profile.macs import count_macs  # noqa: E402
from dyncnn.train.recipes.blockdrop import fit_two_phase  # noqa: E402
from dyncnn.train.trainer import TrainConfig, Trainer, evaluate  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SECTIONS = ["Mobile design", "Theoretical vs practical efficiency", "Early exits", "Dynamic depth and width",
            "Dynamic parameters", "Spatial", "Temporal"]
HOLDS, NOT_HERE, NOT_AT_SCALE = "holds", "does not hold here", "not reproducible at this scale"


@dataclass
class Row:
    claim: str
    section: str
    figure: str
    verdict: str
    why: str
    command: str = ""
    seconds: float = 0.0


@dataclass
class Panel:
    """One plot of a section's figure: named (x, y) series, drawn as lines with markers (or bars)."""
    title: str
    series: dict
    xlabel: str
    ylabel: str
    bars: bool = False


# --- the run's context: settings, data and the models several claims share ----------------------------------

@dataclass
class Ctx:
    quick: bool
    threads: int
    seeds: list[int]
    epochs: int
    ft_epochs: int
    train_size: int
    test_size: int
    command: str = "python benchmarks/bench_lecture.py"
    cache: dict = field(default_factory=dict)
    panels: dict = field(default_factory=lambda: {s: [] for s in SECTIONS})

    def memo(self, key, build: Callable):
        if key not in self.cache:
            self.cache[key] = build()
        return self.cache[key]

    def data(self, clutter: int = 0) -> tuple:
        """ScaledMNIST at canvas 32 (digits 0.25-0.9 of the side): train (first ``train_size``), val, test."""
        def build():
            sets = [ScaledMNIST(s, canvas=32, clutter=clutter) for s in ("train", "val", "test")]
            return (Subset(sets[0], range(min(self.train_size, len(sets[0])))),
                    Subset(sets[1], range(min(self.test_size, len(sets[1])))),
                    Subset(sets[2], range(min(self.test_size, len(sets[2])))))
        return self.memo(("data", clutter), build)

    def fit(self, model: nn.Module, train_set, seed: int, epochs: int | None = None, lr: float = 0.1,
            optimizer: str = "sgd", loss_fn=None) -> nn.Module:
        """Train with the library's Trainer: batch 32 (many steps matter more than large batches in a short run),
        cosine schedule with a short warm-up; SGD (lr 0.1) from scratch unless told otherwise."""
        torch.manual_seed(seed)
        cfg = TrainConfig(device="cpu", epochs=epochs or self.epochs, batch_size=32, lr=lr, optimizer=optimizer,
                          weight_decay=5e-4 if optimizer == "sgd" else 1e-4, progress=False, seed=seed,
                          warmup_epochs=0.3, grad_clip=1.0 if optimizer == "adamw" else None)
        Trainer(model, train_set, None, cfg, loss_fn=loss_fn).fit()
        return model.eval()

    def trained(self, key: str, seed: int, build: Callable[[], nn.Module], clutter: int = 0, **fit) -> nn.Module:
        """``build()`` trained from scratch on the canvas-32 data, once per (key, seed) in this run."""
        def make():
            torch.manual_seed(seed)
            return self.fit(build(), self.data(clutter)[0], seed, **fit)
        return self.memo((key, seed, clutter), make)


def mean(xs) -> float:
    return float(statistics.fmean(xs))


def spread(xs) -> float:
    return float(max(xs) - min(xs)) if len(xs) > 1 else 0.0


def pm(xs, scale: float = 100.0, unit: str = "%") -> str:
    """Mean over seeds with the range: '93.1% (92.8-93.4)'."""
    if len(xs) == 1:
        return f"{xs[0] * scale:.1f}{unit}"
    return f"{mean(xs) * scale:.1f}{unit} ({min(xs) * scale:.1f}-{max(xs) * scale:.1f})"


CHANCE_FLOOR = 0.3      # 3x chance on 10 classes: below it, a network has not learned enough to compare


def near_chance(label: str, accs: list[float]) -> tuple[str, str] | None:
    """The verdict for a claim whose reference network is below :data:`CHANCE_FLOOR`, else None."""
    if mean(accs) < CHANCE_FLOOR:
        return NOT_AT_SCALE, f"{label} is near chance ({mean(accs) * 100:.0f}%, 10 classes) after this short training"
    return None


def compare(a: list[float], b: list[float], a_better: str, b_better: str, margin: float = 0.0,
            accuracies: bool = False) -> tuple[str, str]:
    """Verdict for "a is higher than b" over seeds: holds when the mean difference exceeds both the seed spreads
    (and ``margin``), does not hold when it is that far the other way, otherwise within noise. ``accuracies``:
    when both sides are below :data:`CHANCE_FLOOR`, no comparison is made (both networks are near chance)."""
    if accuracies and max(mean(a), mean(b)) < CHANCE_FLOOR:
        return NOT_AT_SCALE, (f"both networks are near chance ({mean(a) * 100:.0f}% and {mean(b) * 100:.0f}%, "
                              f"10 classes) after this short training")
    d, noise = mean(a) - mean(b), max(spread(a), spread(b), margin)
    if len(a) < 2 and not margin:
        noise = max(noise, 0.01)
    if d > noise:
        return HOLDS, a_better + f" by {d * 100:.1f} points (seed spread {noise * 100:.1f})"
    if d < -noise:
        return NOT_HERE, b_better + f" by {-d * 100:.1f} points (seed spread {noise * 100:.1f})"
    return NOT_AT_SCALE, f"the difference ({d * 100:+.1f} points) is within the seed spread ({noise * 100:.1f})"


def accuracy(model: nn.Module, dataset) -> float:
    return evaluate(model, dataset)["acc"]


def one_input(dataset) -> torch.Tensor:
    return dataset[0][0].unsqueeze(0)


# --- 1. mobile design ----------------------------------------------------------------------------------------

def _layer_cost(ctx: Ctx, layer: nn.Module, x: torch.Tensor) -> tuple[int, float]:
    layer.eval()
    ms = measure_latency(layer, x, (1,), threads=ctx.threads, warmup=2, min_runs=5,
                         min_time_s=0.05 if ctx.quick else 0.3)[1].median_ms
    return count_macs(layer, x).total, ms


def claim_group_conv(ctx: Ctx) -> Row:
    c, s = (64, 14) if ctx.quick else (128, 28)
    x = torch.randn(1, c, s, s)
    groups = [1, 2, 4, 8, c]
    costs = [_layer_cost(ctx, nn.Conv2d(c, c, 3, padding=1, groups=g, bias=False), x) for g in groups]
    macs0, ms0 = costs[0]
    mac_ratio = [macs0 / m for m, _ in costs]
    speed = [ms0 / t for _, t in costs]
    ctx.panels["Mobile design"].append(Panel(f"3x3 conv, {c} channels, {s}x{s}, batch 1", {
        "MAC reduction": (groups[:-1], mac_ratio[:-1]), "measured speedup": (groups[:-1], speed[:-1])},
        "groups G", "x fewer than G = 1"))
    exact = all(abs(r - g) < 1e-6 for r, g in zip(mac_ratio, groups))
    fig = ("MACs / G exactly: " + ", ".join(f"G={g}: {r:.0f}x" for g, r in zip(groups[1:4], mac_ratio[1:4]))
           + "; measured speedup " + ", ".join(f"G={g}: {v:.1f}x" for g, v in zip(groups[1:], speed[1:]))
           + f" (G={c} is depthwise)")
    verdict = HOLDS if exact else NOT_HERE
    why = (f"the cost is O(C^2/G) in MACs; wall clock falls less (G=8: {speed[3]:.1f}x for 8x fewer MACs), "
           "the practical-efficiency gap of the next section")
    return Row("Group convolution costs O(C x C / G)", "Mobile design", fig, verdict, why)


def claim_depthwise_separable(ctx: Ctx) -> Row:
    c, s = (64, 14) if ctx.quick else (128, 28)
    x = torch.randn(1, c, s, s)
    std_macs, std_ms = _layer_cost(ctx, ConvNormAct(c, c, 3), x)
    dsc_macs, dsc_ms = _layer_cost(ctx, DepthwiseSeparableConv(c, c), x)
    theory = 1 / 9 + 1 / c
    ratio = dsc_macs / std_macs
    fig = (f"{c}->{c} 3x3 at {s}x{s}: {std_macs / 1e6:.1f}M -> {dsc_macs / 1e6:.2f}M MACs ({1 / ratio:.1f}x fewer; "
           f"1/9 + 1/C predicts {1 / theory:.1f}x); {std_ms:.2f} -> {dsc_ms:.2f} ms ({std_ms / dsc_ms:.1f}x)")
    verdict = HOLDS if abs(ratio - theory) / theory < 0.05 else NOT_HERE
    return Row("Depthwise-separable convolution: 1/k^2 + 1/C of a standard convolution's cost", "Mobile design",
               fig, verdict, f"MACs as predicted; the time saving ({std_ms / dsc_ms:.1f}x) is smaller than the MAC "
               f"saving ({1 / ratio:.1f}x): depthwise convolutions do little arithmetic per byte moved")


def _no_shuffle(model: nn.Module) -> nn.Module:
    for name, m in list(model.named_modules()):
        for child_name, child in list(m.named_children()):
            if isinstance(child, ChannelShuffle):
                setattr(m, child_name, nn.Identity())
    return model


def claim_channel_shuffle(ctx: Ctx) -> Row:
    _, _, test = ctx.data()
    build = lambda: create_model("shufflenet_v1_g8_x0_5", num_classes=10, in_chans=1)   # noqa: E731
    with_s, without = [], []
    for seed in ctx.seeds:
        with_s.append(accuracy(ctx.trained("shufflenet_g8", seed, build), test))
        without.append(accuracy(ctx.trained("shufflenet_g8_noshuffle", seed, lambda: _no_shuffle(build())), test))
    x = one_input(test)
    macs = count_macs(ctx.cache[("shufflenet_g8", ctx.seeds[0], 0)], x).total
    verdict, why = compare(with_s, without, "the shuffled network is more accurate",
                           "the network without shuffle is more accurate", accuracies=True)
    fig = f"ShuffleNetV1 g=8 x0.5 ({macs / 1e6:.2f}M MACs): with shuffle {pm(with_s)}, without {pm(without)}"
    return Row("Channel shuffle lets stacked group convolutions exchange information (ShuffleNet)",
               "Mobile design", fig, verdict, why)


def _bottleneck_resnet(width: int) -> ResNet:
    cfg = ResNetCfg(stages=(ResStageCfg(Bottleneck, 1, width, 1), ResStageCfg(Bottleneck, 2, 2 * width, 2),
                            ResStageCfg(Bottleneck, 2, 4 * width, 2)),
                    stem_chs=8, stem_kernel=3, stem_stride=2, stem_pool=False)
    return ResNet(cfg, num_classes=10, in_chans=1)


def claim_inverted_residual(ctx: Ctx) -> Row:
    _, _, test = ctx.data()
    x = one_input(test)
    ir = lambda: MobileNet(TINY_MOBILENET_V2, 10, 1, 1.0, 0.0, name="tiny_mobilenet_v2")   # noqa: E731
    target = count_macs(ir(), x).total
    width = min(range(2, 17), key=lambda w: abs(count_macs(_bottleneck_resnet(w), x).total - target))
    bn_macs = count_macs(_bottleneck_resnet(width), x).total
    a = [accuracy(ctx.trained("tiny_mbv2", s, ir), test) for s in ctx.seeds]
    b = [accuracy(ctx.trained(f"bottleneck_w{width}", s, lambda: _bottleneck_resnet(width)), test)
         for s in ctx.seeds]
    verdict, why = compare(a, b, "the inverted residuals are more accurate", "the plain bottlenecks are more accurate",
                           accuracies=True)
    fig = (f"tiny MobileNetV2 ({target / 1e6:.2f}M MACs) {pm(a)} vs ResNet bottlenecks (width {width}, "
           f"{bn_macs / 1e6:.2f}M MACs) {pm(b)}")
    return Row("Inverted residuals with linear bottlenecks beat plain bottlenecks at equal MACs (MobileNetV2)",
               "Mobile design", fig, verdict, why)


def _condensenet(sfr: bool = False, fixed: bool = False) -> nn.Module:
    cfg = cifar_cfg(14, growth=(4, 8, 16), groups=4)
    if sfr:
        from dataclasses import replace
        cfg = replace(cfg, sfr_groups=4, sfr_condense_factor=4)
    model = build_condensenet(cfg, num_classes=10, in_chans=1)
    if fixed:     # the learned group 1x1 convolution replaced by a fixed group convolution of the same groups
        for m in model.modules():
            if isinstance(m, DenseLayer):
                conv = m.conv1
                m.conv1 = PreActConv(conv.in_channels, conv.out_channels, 1, groups=4)
    return model


def _condensed_macs(model: nn.Module, x: torch.Tensor) -> int:
    """MACs of the inference form: the learned network converted (pruned connections removed)."""
    try:
        return count_macs(model.convert().eval(), x).total
    except Exception:  # noqa: BLE001 - a network with fixed groups has nothing to convert
        return count_macs(model, x).total


def _against_condensenet(ctx: Ctx, key: str, build: Callable[[], nn.Module], macs_of: Callable = _condensed_macs
                         ) -> tuple[list[float], list[float], int, int]:
    """Test accuracies over seeds of the learned CondenseNet-14 and of ``build()``, and their MACs (seed 0's)."""
    _, _, test = ctx.data()
    x = one_input(test)
    base, other = [], []
    for s in ctx.seeds:
        base.append(accuracy(ctx.trained("condensenet14", s, _condensenet), test))
        other.append(accuracy(ctx.trained(key, s, build), test))
    s0 = ctx.seeds[0]
    return base, other, _condensed_macs(ctx.cache[("condensenet14", s0, 0)], x), macs_of(ctx.cache[(key, s0, 0)], x)


def claim_learned_groups(ctx: Ctx) -> Row:
    learned, fixed, m_learned, m_fixed = _against_condensenet(
        ctx, "condensenet14_fixed", lambda: _condensenet(fixed=True), lambda m, x: count_macs(m, x).total)
    verdict, why = compare(learned, fixed, "learned groups are more accurate", "fixed groups are more accurate",
                           accuracies=True)
    if m_learned > 1.1 * m_fixed:
        verdict, why = NOT_AT_SCALE, (f"the learned network did not condense to the fixed one's MACs "
                                      f"({m_learned / m_fixed:.2f}x) in {ctx.epochs} epochs; {why}")
    fig = (f"CondenseNet-14 (growth 4/8/16, G=C=4): learned {pm(learned)} at {m_learned / 1e6:.2f}M MACs "
           f"(converted), fixed groups {pm(fixed)} at {m_fixed / 1e6:.2f}M")
    return Row("Learned group convolution beats fixed groups at equal MACs (CondenseNet)", "Mobile design", fig,
               verdict, why)


def claim_feature_reactivation(ctx: Ctx) -> Row:
    v1, v2, m_v1, m_v2 = _against_condensenet(ctx, "condensenetv2_14", lambda: _condensenet(sfr=True))
    verdict, why = compare(v2, v1, "reactivation is more accurate", "reactivation is less accurate", accuracies=True)
    fig = (f"CondenseNetV2-14 {pm(v2)} at {m_v2 / 1e6:.2f}M MACs vs CondenseNet-14 {pm(v1)} at "
           f"{m_v1 / 1e6:.2f}M (+{m_v2 / m_v1 - 1:.0%} MACs, converted)")
    return Row("Sparse feature reactivation improves CondenseNet at a small cost (CondenseNetV2)", "Mobile design",
               fig, verdict, why)


# --- 2. theoretical vs practical efficiency ------------------------------------------------------------------

ZOO = [("mobilenet_v1", {}), ("mobilenet_v2", {}), ("mobilenet_v3_small", {}), ("mobilenet_v3_large", {}),
       ("shufflenet_v1_g3_x1_0", {}), ("shufflenet_v2_x1_0", {}), ("condensenet74_c4_g4", {"converted": True}),
       ("resnet18", {}), ("densenet121", {})]


def claim_macs_vs_latency(ctx: Ctx) -> Row:
    size = 64 if ctx.quick else 224
    zoo = ZOO[:2] if ctx.quick else ZOO
    rows, skipped = [], []
    for name, cfg in zoo:
        model = create_model(name, **cfg).eval()
        x = torch.randn(1, 3, size, size)
        try:
            macs = count_macs(model, x).total
        except Exception as e:  # noqa: BLE001 - one model that cannot be counted is named, the others go on
            skipped.append(f"{name} ({type(e).__name__})")
            continue
        try:
            ms = measure_latency(model, x, (1,), threads=ctx.threads, backend="onnxruntime", warmup=3, min_runs=5,
                                 min_time_s=0.2 if ctx.quick else 1.0)[1].median_ms
            backend = "ONNX Runtime"
        except Exception:  # noqa: BLE001 - onnxruntime missing or an export failure: eager instead
            ms = measure_latency(model, x, (1,), threads=ctx.threads, min_time_s=0.5)[1].median_ms
            backend = "eager"
        rows.append((name, macs, ms, backend))
    per = [(n, ms / (m / 1e8)) for n, m, ms, _ in rows]        # ms per 100M MACs
    lo, hi = min(per, key=lambda r: r[1]), max(per, key=lambda r: r[1])
    by_macs = sorted(rows, key=lambda r: r[1])
    inversions = sum(1 for i in range(len(by_macs)) for j in range(i + 1, len(by_macs))
                     if by_macs[i][2] > by_macs[j][2])
    ctx.panels["Theoretical vs practical efficiency"].append(Panel(
        f"zoo at {size}x{size}, batch 1, {ctx.threads} threads", {n: ([m / 1e6], [ms]) for n, m, ms, _ in rows},
        "MACs (M)", "latency (ms)"))
    fig = (f"{len(rows)} zoo models at {size}x{size}, batch 1, {rows[0][3]}: {hi[1] / lo[1]:.1f}x spread in ms per "
           f"100M MACs ({lo[0]} {lo[1]:.2f} ms, {hi[0]} {hi[1]:.2f} ms); {inversions} of "
           f"{len(rows) * (len(rows) - 1) // 2} pairs ordered differently by MACs and by time"
           + (f"; not measured: {', '.join(skipped)}" if skipped else ""))
    verdict = HOLDS if hi[1] / lo[1] > 1.5 else NOT_HERE
    return Row("MACs do not predict latency: the gap between theoretical and practical efficiency",
               "Theoretical vs practical efficiency", fig, verdict,
               "time per MAC differs by model family (memory traffic, depthwise and grouped convolutions, "
               "concatenations), so MAC savings do not translate one to one into speed")


def claim_dynamic_realized(ctx: Ctx) -> Row:
    from bench_skipping import random_gates_resnet110, timed_pair
    width = 0.25 if ctx.quick else 0.5
    dyn = random_gates_resnet110(width)
    x = torch.randn(16 if ctx.quick else 64, 3, 32, 32)
    r = dyn.infer(x)
    mac_speedup = float(_all_on(dyn, x).macs.double().mean() / r.macs.double().mean())
    t_full, t_dyn = timed_pair(lambda: _all_on(dyn, x), lambda: dyn.infer(x), 3 if ctx.quick else 15)
    realized = t_full / t_dyn
    fig = (f"SkipNet ResNet-110 (width {width}, random gates, {float(r.choices.float().mean()):.0%} of blocks run), "
           f"batch {len(x)}, eager: {mac_speedup:.2f}x fewer MACs, {realized:.2f}x faster "
           f"({realized / mac_speedup:.2f} of the MAC speedup)")
    verdict = HOLDS if realized < 0.95 * mac_speedup else NOT_HERE
    return Row("Dynamic networks realize less speedup than their MAC savings", "Theoretical vs practical efficiency",
               fig, verdict, "executed skipping pays gates, gathers and smaller, less efficient sub-batches"
               if verdict == HOLDS else "here the executed skipping kept its MAC speedup")


# --- 3. early exits ------------------------------------------------------------------------------------------

EE_CLUTTER = 1      # the early-exit section trains on digits with one clutter fragment


def _resnet8() -> nn.Module:
    return resnet_cifar(8, num_classes=10, in_chans=1, width_mult=0.25)


def _msdnet() -> nn.Module:
    return create_model("msdnet_cifar", num_classes=10, in_chans=1, nBlocks=3, nChannels=8, growthRate=4, step=1,
                        base=2)


def _ranet() -> nn.Module:
    return create_model("ranet_cifar", num_classes=10, in_chans=1, nChannels=8, growthRate=4, step=2, nBlocks=1,
                        head_channels=32)


def _densenet() -> nn.Module:
    return create_model("densenet_bc_cifar", num_classes=10, in_chans=1, depth=16, growth_rate=6)


def _ee_model(ctx: Ctx, key: str, seed: int) -> nn.Module:
    builders = {"resnet8": _resnet8, "resnet8_exits": lambda: attach_exits(_resnet8(), example_size=32),
                "msdnet": _msdnet, "ranet": _ranet, "densenet16": _densenet, "msdnet_last_only": _msdnet}
    fit = {}
    if key == "msdnet_last_only":
        fit["loss_fn"] = MultiExitLoss(weights=[0.0, 0.0, 1.0])
    return ctx.trained(key, seed, builders[key], clutter=EE_CLUTTER, **fit)


@dataclass
class ExitEval:
    macs: list[float]            # cumulative MACs per exit
    correct: torch.Tensor        # (K, N) bool on the test split
    val_scores: torch.Tensor
    val_correct: torch.Tensor
    test_scores: torch.Tensor

    @property
    def exit_acc(self) -> list[float]:
        return self.correct.double().mean(1).tolist()


def _exit_eval(ctx: Ctx, key: str, seed: int, test=None) -> ExitEval:
    def build():
        model = _ee_model(ctx, key, seed)
        _, val, test_ = ctx.data(EE_CLUTTER)
        t = test if test is not None else test_
        vl, vy = collect_exit_logits(model, val)
        tl, ty = collect_exit_logits(model, t)
        return ExitEval(model.exit_macs(one_input(t)), tl.argmax(-1) == ty, exit_scores(vl), vl.argmax(-1) == vy,
                        exit_scores(tl))
    return ctx.memo(("exit_eval", key, seed, id(test) if test is not None else None), build)


def _envelope(points: list[tuple[float, float]], at: float) -> float:
    """Accuracy of the best point at most ``at`` MACs on a (MACs, accuracy) curve, interpolated linearly."""
    pts = sorted(points)
    xs, ys = [p[0] for p in pts], list(np.maximum.accumulate([p[1] for p in pts]))
    return float(np.interp(at, xs, ys))


def claim_interference(ctx: Ctx) -> Row:
    _, _, test = ctx.data(EE_CLUTTER)
    res_plain = [accuracy(_ee_model(ctx, "resnet8", s), test) for s in ctx.seeds]
    res_exits = [_exit_eval(ctx, "resnet8_exits", s).exit_acc[-1] for s in ctx.seeds]
    msd_last = [_exit_eval(ctx, "msdnet_last_only", s).exit_acc[-1] for s in ctx.seeds]
    msd_all = [_exit_eval(ctx, "msdnet", s).exit_acc[-1] for s in ctx.seeds]
    res_drop = [a - b for a, b in zip(res_plain, res_exits)]
    msd_drop = [a - b for a, b in zip(msd_last, msd_all)]
    v_res, why_res = compare(res_plain, res_exits, "", "", accuracies=True)
    fig = (f"final-exit accuracy, ResNet-8: without exits {pm(res_plain)}, with 2 early exits {pm(res_exits)}; "
           f"MSDNet (3 exits): final loss only {pm(msd_last)}, all exits {pm(msd_all)}")
    costs = (f"early exits cost the ResNet's final classifier {mean(res_drop) * 100:.1f} points, MSDNet's "
             f"{mean(msd_drop) * 100:.1f}")
    if v_res == NOT_AT_SCALE and why_res.startswith("both networks"):
        verdict, why = NOT_AT_SCALE, why_res
    elif v_res == HOLDS:        # the interference shows; is MSDNet's loss smaller beyond the seed spread?
        gap, noise = mean(res_drop) - mean(msd_drop), max(spread(res_drop), spread(msd_drop), 0.01)
        if gap > noise:
            verdict, why = HOLDS, costs
        elif gap < -noise:
            verdict, why = NOT_HERE, costs + ": MSDNet loses more"
        else:
            verdict, why = NOT_AT_SCALE, (f"the interference holds ({costs}), but MSDNet's smaller loss is within "
                                          f"the seed spread ({noise * 100:.1f} points)")
    elif v_res == NOT_HERE:
        verdict, why = NOT_HERE, ("the ResNet's final exit is better with early exits (they act as deep "
                                  "supervision in a short training run)")
    else:
        verdict, why = NOT_AT_SCALE, (f"the ResNet's final-exit change ({-mean(res_drop) * 100:+.1f} points) is within "
                                      f"the seed spread; MSDNet's: {-mean(msd_drop) * 100:+.1f} points")
    return Row("Intermediate classifiers interfere with the final one; MSDNet's dense connections reduce it",
               "Early exits", fig, verdict, why)


def claim_coarse_features(ctx: Ctx) -> Row:
    res = [_exit_eval(ctx, "resnet8_exits", s) for s in ctx.seeds]
    msd = [_exit_eval(ctx, "msdnet", s) for s in ctx.seeds]
    share = lambda e: e.exit_acc[0] / max(e.exit_acc[-1], 1e-9)   # noqa: E731
    frac = lambda e: e.macs[0] / e.macs[-1]                       # noqa: E731
    r_share, m_share = [share(e) for e in res], [share(e) for e in msd]
    fig = (f"first exit: ResNet-8 after stage 1 (fine, 32x32 features, {frac(res[0]):.0%} of its MACs) "
           f"{pm([e.exit_acc[0] for e in res])}; MSDNet's first exit (coarsest scale, {frac(msd[0]):.0%} of its "
           f"MACs) {pm([e.exit_acc[0] for e in msd])}")
    d, noise = mean(m_share) - mean(r_share), max(spread(m_share), spread(r_share), 0.05)
    shares = f"first-exit accuracy / final accuracy: MSDNet {pm(m_share, 1, '')}, ResNet {pm(r_share, 1, '')}"
    if d > noise:
        verdict, why = HOLDS, (f"{shares}; MSDNet's coarse first exit comes at {frac(msd[0]):.0%} of its MACs, the "
                               f"ResNet has spent {frac(res[0]):.0%} before its first classifier")
    elif d < -noise:
        verdict, why = NOT_HERE, f"{shares}: the fine-feature exit keeps the larger share"
    else:
        verdict, why = NOT_AT_SCALE, f"{shares}: the difference is within the seed spread"
    verdict, why = _exits_learned(ctx, verdict, why, "resnet8_exits", "msdnet")
    return Row("Classifiers work well only on coarse features, and a plain CNN reaches them late", "Early exits",
               fig, verdict, why)


def _budget_curve(e: ExitEval) -> list[tuple[float, float]]:
    pts = dynamic_evaluate(e.val_scores, e.test_scores, e.correct, e.macs, steps=39)
    return [(p.mean_macs, p.accuracy) for p in pts]


def _exits_learned(ctx: Ctx, verdict: str, why: str, *keys: str) -> tuple[str, str]:
    """``(verdict, why)``, unless the final exit of a network in ``keys`` is near chance: its exit decisions and
    curves mean nothing then."""
    for key in keys:
        chance = near_chance(key, [_exit_eval(ctx, key, s).exit_acc[-1] for s in ctx.seeds])
        if chance:
            return chance
    return verdict, why


def claim_msdnet_budgeted(ctx: Ctx) -> Row:
    _, _, test = ctx.data(EE_CLUTTER)
    x = one_input(test)
    speedups, notes, curves = [], [], {}
    for name in ("resnet8", "densenet16"):
        accs = [accuracy(_ee_model(ctx, name, s), test) for s in ctx.seeds]
        macs = count_macs(_ee_model(ctx, name, ctx.seeds[0]), x).total
        for s, acc in zip(ctx.seeds, accs):
            curve = _budget_curve(_exit_eval(ctx, "msdnet", s))
            reach = [m for m, a in curve if a >= acc]
            speedups.append(macs / min(reach) if reach else 0.0)
        curves[f"{name} (static)"] = ([macs / 1e6], [mean(accs)])
        notes.append(f"{name} {pm(accs)} at {macs / 1e6:.2f}M")
    curve0 = _budget_curve(_exit_eval(ctx, "msdnet", ctx.seeds[0]))
    curves["MSDNet budgeted"] = ([m / 1e6 for m, _ in curve0], [a for _, a in curve0])
    ctx.panels["Early exits"].append(Panel("budgeted batch classification (seed 0)", curves, "mean MACs (M)",
                                           "test accuracy"))
    best = [max(a for _, a in _budget_curve(_exit_eval(ctx, "msdnet", s))) for s in ctx.seeds]
    fig = (f"static {', '.join(notes)}; MSDNet best budgeted {pm(best)}; speedup at equal accuracy "
           + ", ".join("never reached" if v == 0 else f"{v:.2f}x" for v in speedups))
    if all(v >= 2 for v in speedups):
        verdict, why = HOLDS, "MSDNet matches each static network with at least 2x fewer MACs"
    elif all(v > 1 for v in speedups):
        verdict, why = NOT_HERE, "MSDNet is cheaper at equal accuracy, but by less than the 2x-5x of the lecture"
    else:
        verdict, why = NOT_HERE, ("MSDNet does not reach every static network's accuracy with fewer MACs after "
                                  f"{ctx.epochs} epochs on {ctx.train_size} digits (the static networks train "
                                  "faster)")
    verdict, why = _exits_learned(ctx, verdict, why, "msdnet")
    return Row("MSDNet: 2x-5x speedup over DenseNet (and ResNet) in budgeted batch classification", "Early exits",
               fig, verdict, why)


def _ranet_vs_msdnet(ctx: Ctx, curves: Callable[[ExitEval], list[tuple[float, float]]]) -> tuple[list, str]:
    diffs = []
    for s in ctx.seeds:
        r, m = curves(_exit_eval(ctx, "ranet", s)), curves(_exit_eval(ctx, "msdnet", s))
        lo, hi = max(min(p[0] for p in r), min(p[0] for p in m)), min(max(p[0] for p in r), max(p[0] for p in m))
        if lo >= hi:
            return [], f"no common MAC range ({lo / 1e6:.2f}M-{hi / 1e6:.2f}M)"
        grid = np.linspace(lo, hi, 9)
        diffs.append(mean([_envelope(r, g) - _envelope(m, g) for g in grid]))
    return diffs, ""


def claim_ranet_budgeted(ctx: Ctx) -> Row:
    diffs, err = _ranet_vs_msdnet(ctx, _budget_curve)
    c0 = _budget_curve(_exit_eval(ctx, "ranet", ctx.seeds[0]))
    m0 = _budget_curve(_exit_eval(ctx, "msdnet", ctx.seeds[0]))
    ctx.panels["Early exits"].append(Panel("budgeted: RANet vs MSDNet (seed 0)", {
        "RANet": ([m / 1e6 for m, _ in c0], [a for _, a in c0]), "MSDNet": ([m / 1e6 for m, _ in m0], [a for _, a in m0])},
        "mean MACs (M)", "test accuracy"))
    if err:
        return Row("RANet beats MSDNet in budgeted batch classification", "Early exits", err, NOT_AT_SCALE, err)
    verdict, why = compare(diffs, [0.0] * len(diffs), "RANet is more accurate at equal mean MACs",
                           "MSDNet is more accurate at equal mean MACs", margin=0.005)
    fig = f"RANet minus MSDNet accuracy at equal mean MACs (common range, 9 points): {pm(diffs, unit=' points')}"
    verdict, why = _exits_learned(ctx, verdict, why, "msdnet", "ranet")
    return Row("RANet beats MSDNet in budgeted batch classification", "Early exits", fig, verdict, why)


def claim_ranet_anytime(ctx: Ctx) -> Row:
    anytime_curve = lambda e: anytime(e.correct, e.macs)          # noqa: E731
    diffs, err = _ranet_vs_msdnet(ctx, anytime_curve)
    e_r, e_m = _exit_eval(ctx, "ranet", ctx.seeds[0]), _exit_eval(ctx, "msdnet", ctx.seeds[0])
    ctx.panels["Early exits"].append(Panel("anytime prediction (seed 0)", {
        "RANet": ([m / 1e6 for m in e_r.macs], e_r.exit_acc), "MSDNet": ([m / 1e6 for m in e_m.macs], e_m.exit_acc)},
        "MACs at the exit (M)", "test accuracy"))
    if err:
        return Row("RANet beats MSDNet in anytime prediction", "Early exits", err, NOT_AT_SCALE, err)
    verdict, why = compare(diffs, [0.0] * len(diffs), "RANet's exits are more accurate at equal MACs",
                           "MSDNet's exits are more accurate at equal MACs", margin=0.005)
    fig = (f"RANet {len(e_r.macs)} exits {e_r.macs[0] / 1e6:.1f}-{e_r.macs[-1] / 1e6:.1f}M, MSDNet {len(e_m.macs)} "
           f"exits {e_m.macs[0] / 1e6:.1f}-{e_m.macs[-1] / 1e6:.1f}M; RANet minus MSDNet at equal MACs: "
           f"{pm(diffs, unit=' points')}")
    verdict, why = _exits_learned(ctx, verdict, why, "msdnet", "ranet")
    return Row("RANet beats MSDNet in anytime prediction", "Early exits", fig, verdict, why)


def _half_budget_exits(e: ExitEval, scores: torch.Tensor) -> torch.Tensor:
    """Exit taken by each sample under the thresholds that spend half-way between the first and the last exit's
    MACs on the validation split (solved as the MSDNet protocol does)."""
    point = solve_for_budget(e.val_scores, e.val_correct, e.macs, target_macs=(e.macs[0] + e.macs[-1]) / 2)
    return assign_exits(scores, torch.tensor(point.thresholds, dtype=scores.dtype))


def _scales(dataset) -> torch.Tensor:
    if isinstance(dataset, Subset):
        return _scales(dataset.dataset)[torch.as_tensor(list(dataset.indices))]
    return dataset.scales


def claim_hard_tiny(ctx: Ctx) -> Row:
    _, _, test = ctx.data(EE_CLUTTER)
    small, large = [], []
    scales = _scales(test)
    for s in ctx.seeds:
        e = _exit_eval(ctx, "msdnet", s)
        early = (_half_budget_exits(e, e.test_scores) == 0).double()
        small.append(float(early[scales < 0.4].mean()))
        large.append(float(early[scales >= 0.6].mean()))
    verdict, why = compare(large, small, "large digits leave at the first exit more often",
                           "small digits leave at the first exit more often")
    fig = f"MSDNet at half its MAC range: first-exit rate, digits < 0.4 of the canvas {pm(small)}, >= 0.6 {pm(large)}"
    verdict, why = _exits_learned(ctx, verdict, why, "msdnet")
    return Row("Images with tiny objects are hard samples (they exit late)", "Early exits", fig, verdict, why)


def claim_hard_clutter(ctx: Ctx) -> Row:
    sets = {c: Subset(ScaledMNIST("test", canvas=32, clutter=c), range(ctx.test_size)) for c in (0, 3)}
    rates = {0: [], 3: []}
    for s in ctx.seeds:
        model = _ee_model(ctx, "msdnet", s)
        e = _exit_eval(ctx, "msdnet", s)
        for c, ds in sets.items():
            logits, _ = collect_exit_logits(model, ds)
            rates[c].append(float((_half_budget_exits(e, exit_scores(logits)) == 0).double().mean()))
    verdict, why = compare(rates[0], rates[3], "clean digits leave at the first exit more often",
                           "cluttered digits leave at the first exit more often")
    fig = (f"MSDNet (trained with 1 clutter fragment) at half its MAC range: first-exit rate with no clutter "
           f"{pm(rates[0])}, with 3 fragments of other digits {pm(rates[3])}")
    verdict, why = _exits_learned(ctx, verdict, why, "msdnet")
    return Row("Images with multiple objects are hard samples", "Early exits", fig, verdict, why)


def claim_hard_atypical(ctx: Ctx) -> Row:
    _, _, test = ctx.data(EE_CLUTTER)
    train_digits = MNISTDigits("train")
    imgs = torch.stack([train_digits[i][0] for i in range(len(train_digits))]).flatten(1)
    labels = torch.as_tensor([train_digits[i][1] for i in range(len(train_digits))])
    centers = torch.stack([imgs[labels == k].mean(0) for k in range(10)])
    test_digits = MNISTDigits("test")
    idx = list(test.indices)
    x = torch.stack([test_digits[i][0] for i in idx]).flatten(1)
    y = torch.as_tensor([test_digits[i][1] for i in idx])
    atyp = (x - centers[y]).norm(dim=1)          # distance to the class's mean digit: model-independent
    lo, hi = atyp.quantile(0.25), atyp.quantile(0.75)
    typical, atypical = [], []
    for s in ctx.seeds:
        e = _exit_eval(ctx, "msdnet", s)
        early = (_half_budget_exits(e, e.test_scores) == 0).double()
        typical.append(float(early[atyp <= lo].mean()))
        atypical.append(float(early[atyp >= hi].mean()))
    verdict, why = compare(typical, atypical, "typical digits leave at the first exit more often",
                           "atypical digits leave at the first exit more often")
    fig = (f"MSDNet at half its MAC range: first-exit rate of the quarter of digits closest to their class's mean "
           f"image {pm(typical)}, farthest {pm(atypical)}")
    verdict, why = _exits_learned(ctx, verdict, why, "msdnet")
    return Row("Objects without representative characteristics are hard samples", "Early exits", fig, verdict, why)


# --- 4. dynamic depth and width ------------------------------------------------------------------------------

def _static_r20(ctx: Ctx, seed: int) -> nn.Module:
    return ctx.trained("resnet20_w0.25", seed, lambda: resnet_cifar(20, num_classes=10, in_chans=1,
                                                                    width_mult=0.25))


def _static_r14(ctx: Ctx, seed: int, width: float = 0.5) -> nn.Module:
    return ctx.trained(f"resnet14_w{width}", seed, lambda: resnet_cifar(14, num_classes=10, in_chans=1,
                                                                        width_mult=width))


def _finetuned(ctx: Ctx, key: str, seed: int, build: Callable[[], nn.Module], **fit) -> nn.Module:
    def make():
        torch.manual_seed(seed)
        fit.setdefault("lr", 0.01)
        return ctx.fit(build(), ctx.data()[0], seed, epochs=ctx.ft_epochs, **fit)
    return ctx.memo((key, seed), make)


def claim_skipping(ctx: Ctx) -> Row:
    _, val, test = ctx.data()
    static_acc, skip, drop = [], [], []
    for s in ctx.seeds:
        static = _static_r20(ctx, s)
        static_acc.append(accuracy(static, test))

        def skipnet():
            m = create_model("skipnet_resnet20_cifar", num_classes=10, in_chans=1, width_mult=0.25, budget=0.5,
                             cost_weight=20.0)
            m.backbone.load_state_dict(static.state_dict())
            return m
        skip.append(evaluate_dynamic(_finetuned(ctx, "skipnet", s, skipnet), test))

        def blockdrop():
            torch.manual_seed(s)
            m = create_model("blockdrop_resnet20_cifar", num_classes=10, in_chans=1, width_mult=0.25, budget=0.5)
            m.backbone.load_state_dict(static.state_dict())
            cfg = lambda lr, opt: TrainConfig(device="cpu", epochs=ctx.ft_epochs, batch_size=32, lr=lr,  # noqa
                                              optimizer=opt, weight_decay=0.0, progress=False, seed=s)
            fit_two_phase(m, ctx.data()[0], val, cfg(1e-3, "adamw"), cfg(0.01, "sgd"))
            return m.eval()
        drop.append(evaluate_dynamic(ctx.memo(("blockdrop", s), blockdrop), test))
    acc = lambda rs: [r["accuracy"] for r in rs]                   # noqa: E731
    frac = lambda rs: mean([r["macs_fraction"] for r in rs])       # noqa: E731
    ctx.panels["Dynamic depth and width"].append(Panel("layer skipping, ResNet-20 w0.25", {
        "static": ([1.0], [mean(static_acc)]), "SkipNet": ([frac(skip)], [mean(acc(skip))]),
        "BlockDrop": ([frac(drop)], [mean(acc(drop))])}, "MACs / static", "test accuracy"))
    fig = (f"ResNet-20 w0.25 static {pm(static_acc)}; SkipNet {pm(acc(skip))} at {frac(skip):.0%} of the MACs; "
           f"BlockDrop {pm(acc(drop))} at {frac(drop):.0%}")
    cost = mean(static_acc) - max(mean(acc(skip)), mean(acc(drop)))
    saved = 1 - min(frac(skip), frac(drop))
    if near_chance("the static ResNet", static_acc):
        verdict, why = near_chance("the static ResNet", static_acc)
    elif saved > 0.2 and cost <= max(spread(static_acc), 0.01):
        verdict, why = HOLDS, f"{saved:.0%} of the MACs skipped within the seed spread of the static accuracy"
    elif saved > 0.2:
        verdict, why = NOT_HERE, (f"{saved:.0%} of the MACs skipped at {cost * 100:.1f} points below the static "
                                  f"network after {ctx.ft_epochs} fine-tuning epochs")
    else:
        verdict, why = NOT_AT_SCALE, f"the gates skipped only {saved:.0%} of the MACs in {ctx.ft_epochs} epochs"
    return Row("Layer skipping (SkipNet, BlockDrop) saves computation at little accuracy cost",
               "Dynamic depth and width", fig, verdict, why)


def _equal_mac_static(ctx: Ctx, test, dyn_rows: list[dict], what: str) -> tuple[str, str, str]:
    """Compare a dynamic model with the static ResNet-14 narrowed to about its mean MACs (width 0.35)."""
    narrow = [accuracy(_static_r14(ctx, s, 0.35), test) for s in ctx.seeds]
    n_macs = count_macs(_static_r14(ctx, ctx.seeds[0], 0.35), one_input(test)).total
    d_acc = [r["accuracy"] for r in dyn_rows]
    d_macs = mean([r["mean_macs"] for r in dyn_rows])
    verdict, why = compare(d_acc, narrow, f"{what} is more accurate than the narrow static network",
                           f"the narrow static network is more accurate than {what}", accuracies=True)
    if d_macs > 1.15 * n_macs and verdict == HOLDS:
        verdict, why = NOT_AT_SCALE, why + f", but it uses {d_macs / n_macs:.2f}x its MACs"
    return verdict, why, f"static ResNet-14 w0.35 {pm(narrow)} at {n_macs / 1e6:.2f}M MACs"


def claim_channel_gating(ctx: Ctx) -> Row:
    _, _, test = ctx.data()
    rows = []
    for s in ctx.seeds:
        static = _static_r14(ctx, s)

        def gated():
            m = create_model("channel_gated_resnet14_tiny", num_classes=10, budget=0.5)
            m.backbone.load_state_dict(static.state_dict())
            m = ctx.fit(m, ctx.data()[0], s, epochs=ctx.ft_epochs, lr=0.01)
            n = min(256, len(ctx.data()[0]))
            recalibrate_norms(m, [torch.stack([ctx.data()[0][i][0] for i in range(j, min(j + 64, n))])
                                  for j in range(0, n, 64)])
            return m.eval()
        rows.append(evaluate_dynamic(ctx.memo(("gated", s), gated), test))
    verdict, why, ref = _equal_mac_static(ctx, test, rows, "channel gating")
    fig = (f"channel-gated ResNet-14 w0.5 (budget 0.5) {pm([r['accuracy'] for r in rows])} at "
           f"{mean([r['mean_macs'] for r in rows]) / 1e6:.2f}M MACs ({mean([r['macs_fraction'] for r in rows]):.0%}"
           f" of full width); {ref}")
    return Row("Channel gating (dynamic width) beats a static network of equal MACs", "Dynamic depth and width", fig,
               verdict, why)


def claim_moe(ctx: Ctx) -> Row:
    from bench_moe_routing import ST, build
    _, _, test = ctx.data()
    static_acc, rows = [], []
    for s in ctx.seeds:        # the static network gets the MoE's extra fine-tuning epoch too: same training
        static = _static_r14(ctx, s)
        again = _finetuned(ctx, "resnet14_w0.5_ft", s, lambda: copy.deepcopy(static), optimizer="adamw", lr=1e-3)
        static_acc.append(accuracy(again, test))
        m = _finetuned(ctx, "moe", s, lambda: build("moe_resnet_tiny", dict(num_experts=4, top_k=1, **ST), static),
                       optimizer="adamw", lr=1e-3)
        rows.append(evaluate_dynamic(m, test))
    s_macs = count_macs(_static_r14(ctx, ctx.seeds[0]), one_input(test)).total
    acc = [r["accuracy"] for r in rows]
    verdict, why = compare(acc, static_acc, "the MoE is more accurate than its static network",
                           "the MoE is less accurate than its static network", accuracies=True)
    fig = (f"MoE (4 experts, top-1, upcycled from the static ResNet-14 w0.5) {pm(acc)} at "
           f"{mean([r['mean_macs'] for r in rows]) / 1e6:.2f}M MACs vs static {pm(static_acc)} at "
           f"{s_macs / 1e6:.2f}M (fine-tuned the same extra epoch)")
    return Row("Mixture of experts: more capacity at (about) the same MACs", "Dynamic depth and width", fig, verdict,
               why)


def claim_routing(ctx: Ctx) -> Row:
    from bench_moe_routing import FT_ROUTE, build
    _, _, test = ctx.data()
    rows = []
    for s in ctx.seeds:
        static = _static_r14(ctx, s)
        m = _finetuned(ctx, "routing", s, lambda: build("routing_supernet_tiny", dict(budget=0.5, **FT_ROUTE),
                                                         static), optimizer="adamw", lr=1e-3)
        rows.append(evaluate_dynamic(m, test))
    verdict, why, ref = _equal_mac_static(ctx, test, rows, "the routed super-network")
    fig = (f"routing super-network (budget 0.5, path 0 = the static ResNet-14 w0.5) "
           f"{pm([r['accuracy'] for r in rows])} at {mean([r['mean_macs'] for r in rows]) / 1e6:.2f}M MACs; {ref}")
    return Row("Dynamic routing in a super-network beats a static network of equal MACs", "Dynamic depth and width",
               fig, verdict, why)


# --- 5. dynamic parameters -----------------------------------------------------------------------------------

def claim_dynamic_params(ctx: Ctx) -> Row:
    _, _, test = ctx.data()
    x = one_input(test)
    names = {"static": "tiny_mobilenet", "CondConv": "condconv_tiny_mobilenet_e4", "DyConv": "dyconv_tiny_mobilenet"}
    accs, macs = {}, {}
    for label, name in names.items():
        accs[label] = [accuracy(ctx.trained(name, s, lambda: create_model(name, num_classes=10, in_chans=1),
                                            lr=3e-3, optimizer="adamw"), test) for s in ctx.seeds]
        macs[label] = count_macs(ctx.cache[(name, ctx.seeds[0], 0)], x).total
    ctx.panels["Dynamic parameters"].append(Panel("tiny_mobilenet and its dynamic-kernel versions", {
        k: ([macs[k] / 1e6], [mean(v)]) for k, v in accs.items()}, "MACs (M)", "test accuracy"))
    verdicts = [compare(accs[k], accs["static"], "", "", accuracies=True)[0] for k in ("CondConv", "DyConv")]
    extra = {k: macs[k] / macs["static"] - 1 for k in ("CondConv", "DyConv")}
    fig = (f"tiny_mobilenet {pm(accs['static'])} at {macs['static'] / 1e6:.2f}M MACs; CondConv (4 experts) "
           f"{pm(accs['CondConv'])} (+{extra['CondConv']:.1%} MACs); DyConv {pm(accs['DyConv'])} "
           f"(+{extra['DyConv']:.1%} MACs)")
    if all(v == HOLDS for v in verdicts):
        verdict, why = HOLDS, "both dynamic-kernel networks are more accurate beyond the seed spread"
    elif HOLDS in verdicts:
        verdict, why = HOLDS, "one of the two dynamic-kernel networks is more accurate beyond the seed spread"
    elif NOT_HERE in verdicts:
        verdict, why = NOT_HERE, "a dynamic-kernel network is less accurate than the static one beyond the seed spread"
    else:
        verdict, why = NOT_AT_SCALE, "both differences are within the seed spread"
    return Row("Dynamic parameters (CondConv, dynamic convolution) buy accuracy at a small extra cost",
               "Dynamic parameters", fig, verdict, why + f"; extra MACs {max(extra.values()):.1%} at most")


def claim_weight_ensemble(ctx: Ctx) -> Row:
    torch.manual_seed(0)
    n, c, k = 4, 16, 3
    w = torch.randn(n, c, c, k, k, dtype=torch.float64)
    alpha = torch.softmax(torch.randn(n, dtype=torch.float64), 0)
    x = torch.randn(1, c, 16, 16, dtype=torch.float64)
    conv = lambda wt: torch.nn.functional.conv2d(x, wt, padding=1)   # noqa: E731
    lhs = conv((alpha[:, None, None, None, None] * w).sum(0))
    rhs = sum(alpha[i] * conv(w[i]) for i in range(n))
    err = float((lhs - rhs).abs().max())
    gain = torch.rand(c, dtype=torch.float64)            # channel-wise attention: (x * W) (x) a = x * (W (x) a)
    err_att = float((conv(w[0]) * gain[None, :, None, None] - conv(w[0] * gain[:, None, None, None])).abs().max())
    err = max(err, err_att)
    cost_ratio = (n * c * c * k * k + c * c * k * k * 256) / (n * c * c * k * k * 256)
    fig = (f"max |(sum a_n W_n) * x - sum a_n (W_n * x)| and max |(x * W) (x) a - x * (W (x) a)| = {err:.1e} "
           f"(float64, {n} kernels); mixing the kernels first costs {cost_ratio:.2f} of running {n} convolutions")
    return Row("Weight ensemble equals feature ensemble, and channel attention equals scaled weights",
               "Dynamic parameters",
               fig, HOLDS if err < 1e-9 else NOT_HERE, "convolution is linear in its weights, so CondConv pays one "
               "convolution for n experts")


# --- 6. spatial ----------------------------------------------------------------------------------------------

def _all_on(model: nn.Module, x: torch.Tensor):
    """``model.infer(x)`` with every gate forced on (the static network through the same executor)."""
    model.force(True)
    try:
        return model.infer(x)
    finally:
        model.force(None)


def claim_dynconv(ctx: Ctx) -> Row:
    from bench_skipping import timed_pair
    _, _, test = ctx.data()
    static_acc, rows = [], []
    for s in ctx.seeds:
        static = ctx.trained("tiny_resnet_mnist", s, lambda: tiny_resnet_mnist(10, 1))
        static_acc.append(accuracy(static, test))

        def dynconv():
            m = create_model("dynconv_tiny_resnet_mnist", num_classes=10, budget=0.5)
            m.backbone.load_state_dict(static.state_dict())
            return m
        rows.append(evaluate_dynamic(_finetuned(ctx, "dynconv", s, dynconv), test))
    model = ctx.cache[("dynconv", ctx.seeds[0])]
    x = torch.stack([test[i][0] for i in range(min(64, len(test)))])
    t_full, t_dyn = timed_pair(lambda: _all_on(model, x), lambda: model.infer(x), 3 if ctx.quick else 10)
    acc = [r["accuracy"] for r in rows]
    fr = mean([r["macs_fraction"] for r in rows])
    active = mean([mean(r["active_fraction"]) for r in rows])
    fig = (f"DynConv on a tiny ResNet (budget 0.5): {pm(acc)} at {fr:.0%} of the MACs ({active:.0%} of positions "
           f"computed) vs static {pm(static_acc)}; batch {len(x)}: {t_full / t_dyn:.2f}x faster than all-on")
    cost = mean(static_acc) - mean(acc)
    if near_chance("the static network", static_acc):
        verdict, why = near_chance("the static network", static_acc)
    elif fr < 0.8 and cost <= max(spread(static_acc), 0.01):     # within the reference's own seed spread
        verdict, why = HOLDS, f"{1 - fr:.0%} of the MACs saved within the seed spread of the static accuracy"
    elif fr < 0.8:
        verdict, why = NOT_HERE, f"{1 - fr:.0%} of the MACs saved but {cost * 100:.1f} points lost"
    else:
        verdict, why = NOT_AT_SCALE, f"the masks kept {fr:.0%} of the MACs after {ctx.ft_epochs} epochs"
    return Row("Spatially sparse convolution (DynConv) computes only sampled positions at little accuracy cost",
               "Spatial", fig, verdict, why)


def claim_gfnet(ctx: Ctx) -> Row:
    gf = create_model("gfnet_tiny_mnist").eval()
    x = torch.zeros(1, 1, 128, 128)
    steps = gf.exit_macs(x)
    static = count_macs(create_model("tiny_mobilenet", num_classes=10, in_chans=1).eval(), x).total
    fig = (f"gfnet_tiny_mnist on 128x128: glance {steps[0] / static:.0%}, after each focus step "
           + ", ".join(f"{m / static:.0%}" for m in steps[1:]) + " of the static backbone's MACs on the whole image")
    return Row("Glance and focus (GFNet): easy images are recognised from a low-resolution glance", "Spatial", fig,
               NOT_AT_SCALE, "GFNet needs a canvas large enough for tiny digits (128x128) and three training stages "
               "with PPO: beyond this page's 64x64, CPU-minutes budget (benchmarks/bench_gfnet.py measures it; only "
               "the MAC fractions are shown)")


# --- 7. temporal ---------------------------------------------------------------------------------------------

def claim_adafocus(ctx: Ctx) -> Row:
    ada = create_model("adafocus_tiny").eval()
    base = create_model("adafocus_baseline_allframes").eval()
    x = torch.zeros(1, 16, 1, 64, 64)
    per_step = ada.exit_macs(x)
    full = base.full_macs(x) if hasattr(base, "full_macs") else count_macs(base, x).total
    fig = (f"adafocus_tiny (16 frames 64x64, 32x32 patches): {per_step[0] / 1e6:.2f}M MACs after one frame, "
           f"{per_step[-1] / 1e6:.2f}M after all 16, vs {full / 1e6:.2f}M for the every-frame baseline")
    return Row("AdaFocus: a small task-relevant patch per frame (and few frames) suffices for video recognition",
               "Temporal", fig, NOT_AT_SCALE, "its three training stages (PPO policy) on MovingDigits clips take "
               "tens of CPU-minutes (benchmarks/bench_adafocus.py); only the MACs are shown")


def claim_skiprnn(ctx: Ctx) -> Row:
    sets = ctx.memo("rows", lambda: [RowSequenceDigits(s) for s in ("train", "val", "test")])
    train = Subset(sets[0], range(min(ctx.train_size, len(sets[0]))))
    test = Subset(sets[2], range(min(ctx.test_size, len(sets[2]))))
    xs = torch.stack([test[i][0] for i in range(len(test))])
    ys = torch.as_tensor([test[i][1] for i in range(len(test))])
    plain, skip, skipped = [], [], []
    epochs = 2 * ctx.epochs
    for s in ctx.seeds:
        for name, out, cfg in (("skiprnn_plain_gru_mnist_rows", plain, {}),
                               ("skiprnn_gru_mnist_rows", skip, {"cost_per_update": 0.01})):
            torch.manual_seed(s)
            m = ctx.fit(create_model(name, num_classes=10, hidden_size=64, **cfg), train, s, epochs=epochs, lr=3e-3,
                        optimizer="adamw")
            r = m.infer(xs)
            out.append(float((r.logits.argmax(1) == ys).float().mean()))
            if cfg:
                skipped.append(1 - float(r.exit_index.float().mean()) / xs.shape[1])
    cost = mean(plain) - mean(skip)
    fig = f"GRU (64) on digits read row by row: plain {pm(plain)}, Skip-GRU {pm(skip)} skipping {pm(skipped)} of updates"
    noise = max(spread(plain), 0.01)           # "little cost": within the plain GRU's own seed spread
    if near_chance("the plain GRU", plain):
        verdict, why = near_chance("the plain GRU", plain)
    elif mean(skipped) > 0.2 and cost <= noise:
        verdict, why = HOLDS, "a fifth or more of the state updates skipped within the plain GRU's seed spread"
    elif mean(skipped) > 0.2:
        verdict, why = NOT_HERE, f"{mean(skipped):.0%} of the updates skipped at {cost * 100:.1f} points of accuracy"
    else:
        verdict, why = NOT_AT_SCALE, f"only {mean(skipped):.0%} of the updates skipped after {epochs} epochs"
    return Row("Skip-RNN skips state updates at little accuracy cost", "Temporal", fig, verdict, why)


CLAIMS: dict[str, Callable[[Ctx], Row]] = {
    "group_conv": claim_group_conv, "depthwise_separable": claim_depthwise_separable,
    "channel_shuffle": claim_channel_shuffle, "inverted_residual": claim_inverted_residual,
    "learned_groups": claim_learned_groups, "feature_reactivation": claim_feature_reactivation,
    "macs_vs_latency": claim_macs_vs_latency, "dynamic_realized": claim_dynamic_realized,
    "interference": claim_interference, "coarse_features": claim_coarse_features,
    "msdnet_budgeted": claim_msdnet_budgeted, "ranet_budgeted": claim_ranet_budgeted,
    "ranet_anytime": claim_ranet_anytime, "hard_tiny": claim_hard_tiny, "hard_clutter": claim_hard_clutter,
    "hard_atypical": claim_hard_atypical,
    "skipping": claim_skipping, "channel_gating": claim_channel_gating, "moe": claim_moe, "routing": claim_routing,
    "dynamic_params": claim_dynamic_params, "weight_ensemble": claim_weight_ensemble,
    "dynconv": claim_dynconv, "gfnet": claim_gfnet, "adafocus": claim_adafocus, "skiprnn": claim_skiprnn,
}
SECTION_OF_PENDING = {   # the section of a claim not yet run (for the rows of an unfinished page)
    **{k: "Mobile design" for k in ("group_conv", "depthwise_separable", "channel_shuffle", "inverted_residual",
                                     "learned_groups", "feature_reactivation")},
    **{k: "Theoretical vs practical efficiency" for k in ("macs_vs_latency", "dynamic_realized")},
    **{k: "Early exits" for k in ("interference", "coarse_features", "msdnet_budgeted", "ranet_budgeted",
                                   "ranet_anytime", "hard_tiny", "hard_clutter", "hard_atypical")},
    **{k: "Dynamic depth and width" for k in ("skipping", "channel_gating", "moe", "routing")},
    **{k: "Dynamic parameters" for k in ("dynamic_params", "weight_ensemble")},
    **{k: "Spatial" for k in ("dynconv", "gfnet")}, **{k: "Temporal" for k in ("adafocus", "skiprnn")},
}


# --- the page --------------------------------------------------------------------------------------------------

def plot_section(section: str, panels: list[Panel], img_dir: Path) -> Path | None:
    panels = [p for p in panels if p.series]
    if not panels:
        return None
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 3.8), squeeze=False)
    for ax, p in zip(axes[0], panels):
        for name, xy in p.series.items():
            if xy is None:
                continue
            xs, ys = xy
            ax.plot(xs, ys, marker="o", linestyle="-" if len(xs) > 1 else "none", label=name)
        ax.set(title=p.title, xlabel=p.xlabel, ylabel=p.ylabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    img_dir.mkdir(parents=True, exist_ok=True)
    path = img_dir / ("lecture-" + section.lower().replace(" ", "-").replace(".", "") + ".png")
    tmp = path.with_name(path.name + ".tmp.png")
    fig.savefig(tmp, dpi=90)
    plt.close(fig)
    os.replace(tmp, path)
    return path


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} logical CPUs, Linux {platform.release()}, Python {platform.python_version()}, " \
           f"torch {torch.__version__}"


def row_line(i: int, key: str, r: Row | None, quick: bool) -> str:
    """Claim ``key``'s table row, numbered ``i``; a claim without a row yet is marked as not run."""
    cmd = f"`python benchmarks/bench_lecture.py --only {key}{' --quick' if quick else ''}`"
    if r is None:
        return f"| {i} | {key} | {SECTION_OF_PENDING[key]} | {cmd} | - | not run: the generation stopped before this claim |"
    cell = lambda text: text.replace("|", "\\|")      # noqa: E731 - a pipe would end the table cell
    return f"| {i} | {cell(r.claim)} | {r.section} | {cmd} | {cell(r.figure)} | **{r.verdict}**: {cell(r.why)} |"


def merge_rows(text: str, rows: dict[str, Row], quick: bool, note: str) -> str:
    """The page ``text`` with the rows of the claims in ``rows`` replaced (numbers kept) and ``note`` added above
    the table; the other rows and the figures stay as they were."""
    out = []
    for line in text.splitlines():
        number = re.match(r"\| (\d+) \|", line)
        key = next((k for k in rows if f"--only {k}{' --quick' if quick else ''}`" in line), None) if number else None
        if line.startswith("| # | claim |"):
            out += [note, ""]
        out.append(row_line(int(number.group(1)), key, rows[key], quick) if key else line)
    return "\n".join(out) + "\n"


def render(ctx: Ctx, rows: dict[str, Row], order: list[str], started: dt.datetime, load0: tuple, finished: bool,
           images: dict[str, str], stopped: str = "") -> str:
    now = dt.datetime.now(dt.timezone.utc)
    mode = "`--quick` (smoke run: tiny subsets, figures meaningless)" if ctx.quick else "full"
    load1 = os.getloadavg()
    lines = [
        "# The lecture's claims, reproduced at small scale", "",
        "Every claim of the lecture *Convolutional Networks for Mobile Applications* (Gao Huang) that dyncnn can "
        "test, run on a CPU-sized problem: ScaledMNIST canvases of 32x32 pixels made from the 5,000 embedded real "
        "MNIST digits (digits 0.25-0.9 of the canvas side; one clutter fragment in the early-exit section), tiny "
        "widths, a few epochs, and two seeds where accuracies are compared. Each row says what was run (the "
        "command reproduces that row alone), dyncnn's figure, and a verdict computed from the figure: **holds**, "
        "**does not hold here**, or **not reproducible at this scale** (with the reason). A difference of accuracy "
        "counts only when it is larger than the spread between the seeds; at this scale many are not. Accuracy "
        "figures are the mean over seeds with the range in parentheses.", "",
        f"Generated by `{ctx.command}` ({mode}), started {started:%Y-%m-%d %H:%M} UTC, "
        f"{'finished' if finished else 'last updated'} {now:%H:%M} UTC ({(now - started).total_seconds() / 60:.1f} "
        f"min), on {machine()}; {ctx.threads} thread{'s' if ctx.threads > 1 else ''}; load average {load0[0]:.1f} at the start and "
        f"{load1[0]:.1f} at the end (2 cores shared with other work: timings are ratios measured in one process). "
        f"Settings: seeds {ctx.seeds}, {ctx.epochs} epochs from scratch and {ctx.ft_epochs} of fine-tuning, "
        f"{ctx.train_size} training digits, {ctx.test_size} test digits.", "",
    ]
    if stopped:
        lines += [f"!!! warning \"Unfinished run\"\n    {stopped}", ""]
    lines += ["| # | claim | section | run | dyncnn's figure | verdict |", "|---|---|---|---|---|---|"]
    lines += [row_line(i, key, rows.get(key), ctx.quick) for i, key in enumerate(order, 1)]
    lines.append("")
    for section in SECTIONS:
        if section in images:
            lines += [f"## {section}", "", f"![{section}](img/{images[section]})", ""]
    lines += [
        "## Reading the verdicts", "",
        "- The scale is thousands of times smaller than the papers' (ImageNet, CIFAR, hundreds of epochs): a claim "
        "that holds here is consistent with the lecture, one that does not may still hold at full scale, and the "
        "reason given says which part of the setting decides it (few epochs favour networks that train fast; "
        "32x32 digits leave little for extra capacity to find).",
        "- Costs are counted by FlopCounterMode (MACs = FLOPs / 2) and, for dynamic models, are the MACs each "
        "sample really ran (the executed ledger). Latency is the median of repeated runs, as ratios within one "
        "process; layer timings are eager PyTorch, the zoo is timed in ONNX Runtime.",
        "- The rest of the documentation measures each family at larger settings: [early exits](early-exits.md), "
        "[layer skipping](skipping.md), [channel gating](channel-gating.md), [experts and "
        "routing](experts-routing.md), [dynamic parameters](dynamic-parameters.md), [sparse "
        "convolution](sparse-conv.md), [GFNet](gfnet.md), [temporal models](temporal.md).",
        "- Not tested here: that MobileNetV3's architecture was found by neural architecture search (dyncnn builds "
        "the searched network, it does not search); that bigger models are needed for non-canonical images (the "
        "easy/hard rows test the dynamic counterpart); deformable kernels (`deform_resnet18`) and transformers "
        "(exits on a ViT: [early exits](early-exits.md)) have no claim with a figure in the lecture; the "
        "advantages and challenges listed at its end (interpretability, robustness, theory) are not measurable "
        "here.", ""]
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="smoke run: tiny subsets, 1 epoch, 1 seed (~1 min)")
    ap.add_argument("--out", default=None, help="the page to write (default docs/lecture.md; with --only: none)")
    ap.add_argument("--only", nargs="*", default=None, choices=sorted(CLAIMS), metavar="CLAIM",
                    help=f"run only these claims: {', '.join(CLAIMS)}")
    ap.add_argument("--merge", action="store_true", help="with --only and --out: replace those claims' rows in "
                    "the existing page and keep everything else (figures are not redrawn)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads for training and timing (default 1: on a "
                    "shared machine more threads contend)")
    ap.add_argument("--seeds", type=int, nargs="*", default=None)
    ap.add_argument("--epochs", type=int, default=None, help="epochs from scratch (default 2; --quick: 1)")
    ap.add_argument("--train-size", type=int, default=None, help="training digits (default 3000; --quick: 64)")
    args = ap.parse_args(argv)
    if args.merge and not (args.only and args.out and Path(args.out).exists()):
        ap.error("--merge needs --only CLAIM ... and --out naming an existing page")
    ctx = Ctx(quick=args.quick, threads=args.threads, seeds=args.seeds or ([0] if args.quick else [0, 1]),
              epochs=args.epochs or (1 if args.quick else 2), ft_epochs=1,
              train_size=args.train_size or (64 if args.quick else 3000), test_size=48 if args.quick else 1000)
    ctx.command = " ".join(["python benchmarks/bench_lecture.py", *(argv if argv is not None else sys.argv[1:])])
    torch.set_num_threads(ctx.threads)
    torch.set_flush_denormal(True)
    retain_freed_memory()
    order = args.only if args.only else list(CLAIMS)
    out = Path(args.out) if args.out else (None if args.only else ROOT / "docs" / "lecture.md")
    started, load0 = dt.datetime.now(dt.timezone.utc), os.getloadavg()
    rows: dict[str, Row] = {}
    images: dict[str, str] = {}

    def write(finished: bool, stopped: str = "") -> None:
        if out is None:
            return
        if args.merge:
            if finished:
                note = (f"Rows {', '.join(order)} were re-run on {started:%Y-%m-%d %H:%M} UTC with `{ctx.command}` "
                        f"(same settings and machine; load average {load0[0]:.1f} at their start).")
                atomic_write_text(out, merge_rows(out.read_text(), rows, ctx.quick, note))
            return
        for section in SECTIONS:
            path = plot_section(section, ctx.panels[section], out.parent / "img")
            if path is not None:
                images[section] = path.name
        atomic_write_text(out, render(ctx, rows, order, started, load0, finished, images, stopped))

    for key in order:
        t0 = time.perf_counter()
        print(f"[{dt.datetime.now(dt.timezone.utc):%H:%M:%S}] {key} ...", flush=True)
        try:
            row = CLAIMS[key](ctx)
        except Exception as e:  # noqa: BLE001 - one failing claim is reported on its row, the others still run
            row = Row(key, SECTION_OF_PENDING[key], f"failed: {type(e).__name__}: {e}"[:300], NOT_AT_SCALE,
                      "the run raised an error (see the figure column)")
        row.seconds = time.perf_counter() - t0
        row.command = f"python benchmarks/bench_lecture.py --only {key}{' --quick' if ctx.quick else ''}"
        rows[key] = row
        print(f"  {row.figure}\n  -> {row.verdict}: {row.why} ({row.seconds:.0f} s)", flush=True)
        write(False, "The run was still going or was stopped; rows marked 'not run' did not finish.")
    write(True)
    if out is not None:
        print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
