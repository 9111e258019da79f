"""``dyncnn frontier``: dynamic networks against a real static accuracy-latency front, timed in ONNX Runtime
(default) or ExecuTorch with XNNPACK (``runtime="executorch"``, the phone's runtime).

1. One training budget for every model (same epochs, schedule, augmentation, seed): a static front of zoo networks
   at several widths *and* input resolutions (a network on a 2x / 4x downsampled input is a legitimate static
   point), and the dynamic candidates that need training (exits on static backbones, MSDNet and RANet, all with
   the public IMTA recipe of :mod:`dyncnn.dynamic.imta`). Cascades are built from the trained static networks
   themselves: they need no training of their own.
2. Validation split: per-exit temperatures, the MSDNet threshold sweep, and per-exit latencies in the runtime
   measured on the exported bundle; the operating point of each dynamic model is the cheapest (predicted latency)
   whose validation accuracy reaches the validation accuracy of the best static model. The test split is read
   once, after every choice is made.
3. Every model and operating point exported (``export_bundle``) and timed in the runtime, at batch 1 and a larger
   batch, with 1 and 2 threads and with threads per stage (each stage of each bundle, the static ones included,
   runs with the thread count measured fastest for it on validation images at each timed batch size; a multi-exit
   bundle at batch 1 with the counts that ran it fastest whole under its chosen point:
   ``load_bundle(..., threads="per-stage")``), all of them and all thread counts interleaved in rounds within one
   process (a change of machine load hits all alike), median and IQR over rounds; eager PyTorch beside it for the
   static models and the chosen points.
4. ``frontier.json``, ``frontier.md``, ``frontier.png``, and the figure of merit: the speedup at equal accuracy
   (:mod:`dyncnn.frontier.front`), per seed and averaged.
"""
from __future__ import annotations

import gc
import json
import math
import platform
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn import functional as F
from tqdm.auto import tqdm

from ..data import ScaledMNIST, get_dataset
from ..dynamic.budget import (assign_exits, collect_exit_logits, evaluate_thresholds, exit_proportions, exit_scores,
                              fit_temperatures, msdnet_thresholds)
from ..dynamic.executor import ExitResult
from ..dynamic.policy import ExitPolicy
from ..errors import DyncnnError
from ..export.bundle_format import THREADS_PER_STAGE, read_manifest
from ..export.runtime import (load_bundle, measure_stage_plans_many, measure_stage_threads_many,
                              per_stage_as_uniform, record_stage_latency, record_stage_threads)
from ..export.staged import RUNTIMES, export_bundle
from ..files import output_lock, read_json
from ..models import create_model
from ..profile import count_macs
from ..profile.latency import torch_threads
from ..train import TrainConfig, Trainer, evaluate
from ..train.checkpoint import atomic_write_text, load_checkpoint, read_checkpoint, save_checkpoint
from ..train.distill import Distillation
from ..train.recipes.stagewise import fit_stagewise
from .report import RUNTIME_NAMES
from .front import (SELECTION_Z, Point, best_on_validation, pareto_front, reaches_target, select_on_validation,
                    speedup_at_equal_accuracy)
from .search import can_end_cascade, grid_candidates, search_cascades, with_paired_counts

# -- what is compared ------------------------------------------------------------------------------------------

TINY_S, TINY_M, TINY_L = [16, 48, 96, 192], [32, 96, 192, 384], [48, 144, 288, 576]
TINY_XL = [64, 192, 384, 768]


def _static(label: str, name: str, factor: int = 1, **cfg) -> dict:
    return {"label": label, "name": name, "factor": factor, "cfg": cfg}


def _cascade(label: str, *members: str) -> dict:
    """A cascade of the preset's static models (by label), cheapest first."""
    return {"label": label, "kind": "cascade", "members": list(members)}


def _searched(label: str = "cascade searched on validation", max_members: int = 3) -> dict:
    """A cascade whose members are chosen among the preset's trained static models on the validation split
    (:func:`~dyncnn.frontier.search.search_cascades`); each seed may choose other members."""
    return {"label": label, "kind": "searched", "max_members": max_members}


def _fused(label: str = "searched cascade, fused", laterals: str = "pooled", epochs: int = 1,
           own_search: bool = False, max_members: int = 3) -> dict:
    """The searched cascade's members fused into one feature-reusing network (:mod:`dyncnn.models.fused_cascade`):
    each exit adds the earlier stages' log-probabilities and, with ``laterals``, reads the previous stage's
    features; the members keep their trained weights and only the laterals train, ``epochs`` epochs (with
    ``--only-train``, in the timing run, since the search needs the members' latencies).

    ``own_search``: search the members for the fused exits instead (``search_cascades(..., committee=True)``,
    each chain scored by the summed log-probabilities, on the same member latencies). Off by default, measured:
    on the headline's configuration A, seed 0, it picked `tiny-M -> mnv3-small`, 1.41x at batch 1, 1 thread,
    against the searched cascade's 1.93x in the same rounds (the cascade's members fused: 1.85x against 1.83x in
    another timing): under the paired lower bound a committee that disagrees more with the best static model
    needs a larger margin, and no chain starting with the cheap first member met it at a lower cost."""
    return {"label": label, "kind": "fused", "laterals": laterals, "epochs": epochs, "own_search": own_search,
            "max_members": max_members}


# The frontier's multi-exit networks train with the public IMTA recipe (:mod:`dyncnn.dynamic.imta`: gradient
# equilibrium, forward knowledge transfer, each exit distilled from the next), at the label smoothing every model of
# the frontier trains with.
IMTA_RECIPE = {"label_smoothing": 0.05}


# The IMTA recipe with its three techniques off: the sum of the exits' cross-entropy (the plain multi-exit loss).
PLAIN_RECIPE = {"gradient_equilibrium": False, "forward_transfer": False, "distill": 0.0, "label_smoothing": 0.05}


def _trained(label: str, name: str, imta: dict | None = None, **cfg) -> dict:
    """A dynamic model trained like the static ones (same budget), with the IMTA recipe (or the settings
    ``imta`` gives)."""
    return {"label": label, "kind": "trained", "name": name, "cfg": {**cfg, "imta": dict(imta or IMTA_RECIPE)}}


def _stagewise(label: str, name: str, **cfg) -> dict:
    """A multi-exit network trained stage by stage (:mod:`dyncnn.train.recipes.stagewise`): each stage for its own
    exit, the earlier stages frozen, each for the epochs every static model gets -- the training budget of a
    cascade, whose members are trained one by one."""
    return {"label": label, "kind": "trained", "name": name, "cfg": {**cfg, "stagewise": True}}


def presets(canvas: int) -> dict[str, dict]:
    """The model sets: ``demo`` (small, for ``make demo``: 4 static networks and the cascade search), ``full``
    (the benchmark on the demo's 64x64 data),
    ``phone`` (128x128 canvas, networks of 1.2-73M MACs, where per-call overhead is a small share) and ``headline``
    (128x128, phone's six static networks of up to 20M MACs, the cascade search, its members fused into one
    network (``_fused``; in full and phone too) and the multi-stage network: the
    comparison the README quotes, repeated over seeds and data configurations)."""
    demo_static = [_static("tiny-S /4", "tiny_mobilenet", 4, widths=TINY_S),
                   _static("tiny-M /2", "tiny_mobilenet", 2, widths=TINY_M),
                   _static("tiny-M", "tiny_mobilenet", 1, widths=TINY_M)]
    full_static = [_static("tiny-S /4", "tiny_mobilenet", 4, widths=TINY_S),
                   _static("tiny-S /2", "tiny_mobilenet", 2, widths=TINY_S),
                   _static("tiny-M /2", "tiny_mobilenet", 2, widths=TINY_M),
                   _static("tiny-S", "tiny_mobilenet", 1, widths=TINY_S),
                   _static("tiny-M", "tiny_mobilenet", 1, widths=TINY_M),
                   _static("tiny-L", "tiny_mobilenet", 1, widths=TINY_L),
                   _static("mnv3-small x0.5", "mobilenet_v3_small", 1, width_mult=0.5),
                   _static("shufflenetv2 x0.5", "shufflenet_v2_x0_5", 1)]
    phone_static = [_static("tiny-M /4", "tiny_mobilenet", 4, widths=TINY_M),
                    _static("tiny-M /2", "tiny_mobilenet", 2, widths=TINY_M),
                    _static("tiny-XL /2", "tiny_mobilenet", 2, widths=TINY_XL),
                    _static("tiny-M", "tiny_mobilenet", 1, widths=TINY_M),
                    _static("tiny-L", "tiny_mobilenet", 1, widths=TINY_L),
                    _static("tiny-XL", "tiny_mobilenet", 1, widths=TINY_XL),
                    _static("mnv3-small /2", "mobilenet_v3_small", 2),
                    _static("mnv3-small", "mobilenet_v3_small", 1),
                    _static("shufflenetv2 x1.0", "shufflenet_v2_x1_0", 1)]
    msdnet = _trained("MSDNet (IMTA)", "msdnet_cifar", data="imagenet", nBlocks=5, step=1, base=1, nChannels=8,
                      growthRate=6, grFactor=[1, 2, 4], bnFactor=[1, 2, 4])

    # the lecture's width-wise multi-stage network: stage 1 is tiny-M on the 2x downsampled image (tiny-M /2's MACs),
    # stages 2 and 3 add tiny-S's widths at full resolution reading the kept features (about tiny-M's MACs, then
    # between tiny-M and tiny-L); trained with the plain multi-exit loss, since distillation and gradient
    # equilibrium each lowered all three exits' validation accuracy in a 3-epoch check
    # (that plain loss is the recipe with its three techniques off: the sum of the exits' cross-entropy)
    multi_stage = _trained("multi-stage tiny-M /2 +S +S", "multi_stage", imta=PLAIN_RECIPE,
                           widths=[TINY_M, TINY_S, TINY_S], resolutions=[2, 1, 1])

    def exits_on(label, stages, backbone="tiny_mobilenet", **backbone_cfg):
        # Exits placed for latency, not MACs: the first stages are cheap in MACs but not in latency (a head and
        # an ONNX Runtime call cost about as much as an early stage), so the early exits sit where about a
        # quarter to a half and a half to four fifths of the network's batch-1 latency have run (measured in ONNX
        # Runtime, 1 thread: tiny-XL at 128x128 after stages.1 / stages.2 ~55% / 80%, MobileNetV3-Small after
        # stages.1 / stages.3 ~25% / 55%); three exits, so that the threshold grid searches them.
        return _trained(label, "multi_exit", backbone=backbone, backbone_cfg=backbone_cfg, stages=stages,
                        example_size=canvas)

    def ranet(label, nChannels, growthRate):
        # RANet with two flows (a low-resolution one, then one at full resolution that fuses its features) and
        # three exits; the ImageNet stem (stride 4) as MSDNet's entry, so that the canvas fits.
        return _trained(label, "ranet_cifar", stem="imagenet", nChannels=nChannels, growthRate=growthRate,
                        nBlocks=2, block_step=1, step=2, scale_list=[1, 2], grFactor=[2, 1], bnFactor=[2, 1],
                        head_channels=32)

    # the comparison the README quotes (issue 25), small enough to repeat over seeds and data configurations on a
    # 2-core CPU (about 10 min of training per seed at 128x128): the phone front's static networks of up to ~20M
    # MACs, whose best (MobileNetV3-Small) was the best static network of every phone run, the cascade search among
    # them, and the single feature-reusing networks
    headline_static = [s for s in phone_static if s["label"] in ("tiny-M /4", "tiny-M /2", "tiny-XL /2", "tiny-M",
                                                                  "mnv3-small /2", "mnv3-small")]
    return {
        "headline": {"static": headline_static, "dynamic": [_searched(), _fused(), multi_stage]},
        # tiny-L and the search (issue 29): with three networks the cascade lost (0.83x at batch 1, 0.94x at 64, 1
        # thread); with tiny-L the searched cascade won (1.14x, 1.34x) in one run each on the same machine
        "demo": {"static": demo_static + [_static("tiny-L", "tiny_mobilenet", 1, widths=TINY_L)],
                 "dynamic": [_cascade("resolution cascade /2 -> full", "tiny-M /2", "tiny-M"), _searched()]},
        "full": {"static": full_static,
                 "dynamic": [_cascade("resolution cascade /2 -> full", "tiny-M /2", "tiny-M"),
                             _cascade("resolution cascade /4 -> /2 -> full", "tiny-S /4", "tiny-M /2", "tiny-M"),
                             _cascade("resolution cascade /2 -> tiny-L", "tiny-M /2", "tiny-L"),
                             _cascade("cascade /2 -> tiny-M -> tiny-L", "tiny-M /2", "tiny-M", "tiny-L"),
                             _cascade("width cascade tiny-S -> tiny-M", "tiny-S", "tiny-M"),
                             _searched(),
                             _fused(),
                             exits_on("exits on tiny-M (IMTA)", ["stages.2"], widths=TINY_M),
                             multi_stage,
                             msdnet,
                             ranet("RANet (IMTA)", 12, 8),           # 4.1M MACs at 64x64, MSDNet's 3.5M
                             exits_on("exits on mnv3-small x0.5 (IMTA)", ["stages.1", "stages.3"],
                                      "mobilenet_v3_small", width_mult=0.5)]},
        "phone": {"static": phone_static,
                  "dynamic": [_cascade("resolution cascade mnv3-small /2 -> full", "mnv3-small /2", "mnv3-small"),
                              _cascade("resolution cascade tiny-M /4 -> mnv3-small /2 -> full", "tiny-M /4",
                                       "mnv3-small /2", "mnv3-small"),
                              _cascade("cascade tiny-XL /2 -> mnv3-small", "tiny-XL /2", "mnv3-small"),
                              _cascade("resolution cascade tiny-XL /2 -> full", "tiny-XL /2", "tiny-XL"),
                              _searched(),
                              _fused(),
                              multi_stage,
                              exits_on("exits on tiny-XL (IMTA)", ["stages.1", "stages.2"], widths=TINY_XL),
                              exits_on("exits on mnv3-small (IMTA)", ["stages.1", "stages.3"], "mobilenet_v3_small"),
                              ranet("RANet (IMTA)", 16, 12)]},         # 30M MACs at 128x128
    }


PRESETS = ("demo", "full", "phone", "headline")
SETTLE_S = 0.2      # seconds each timed item waits before its turn with more than one thread (time_interleaved)
CASCADE_LAST = ("reference", "any")   # what the searched cascades end with (FrontierSettings.cascade_last)
PLAN_ROUNDS = 5     # paired rounds of the plans of thread counts (fewer let a lucky plan through: pick_plan)


@dataclass
class FrontierSettings:
    out: Path = Path("runs/frontier")
    preset: str = "full"
    canvas: int = 64
    clutter: int = 2
    data_seed: int = 0
    seeds: Sequence[int] = (0, 1)
    epochs: int = 5
    lr: float = 0.1
    batch_size: int = 64
    train_repeats: int = 3          # renderings per training digit
    val_repeats: int = 2            # renderings per validation digit (calibration)
    test_repeats: int = 3           # renderings per test digit (3,000 test images)
    threads: Sequence[int | str] | None = None   # counts and "per-stage"; None: 1, 2 and "per-stage" (ET: 1, 2)
    batch_sizes: Sequence[int] = (1, 64)
    rounds: int = 7
    single_images: int = 200        # images timed one by one per round (batch 1)
    batch_images: int = 640         # images timed in batches per round (larger batch)
    eager: bool = True
    device: str = "cpu"             # training device ("auto": cuda when available); timing is always on the CPU
    runtime: str = "onnxruntime"    # where bundles are timed: "onnxruntime" or "executorch" (XNNPACK)
    curve_points: int = 6           # operating points per dynamic model on the plot (besides the chosen one)
    selection_z: float = SELECTION_Z   # paired lower bound against the best static model; 0: the point rule
    cascade_last: str = "reference"    # searched cascades end with the best static model ("any": with any model)
    train_threads: int | None = None
    only_train: bool = False
    models: dict | None = None      # {"static": [...], "dynamic": [...]} instead of the preset (tests)
    dataset: str = "scaled_mnist"   # or the user's data: cifar10 | cifar100 | folder (an ImageFolder tree)
    data_root: str | None = None    # where cifar10 / cifar100 / folder data lie (never downloaded)
    exclude: Sequence[str] = ()     # labels of the preset's dynamic models to leave out (e.g. the slow ones)
    settle_s: float = SETTLE_S      # pause before each item's turn with more than one thread (time_interleaved)
    distill_from: str | None = None   # a static model's label: it trains first, every other static network
    distill_weight: float = 0.5       # learns from its logits too (train.distill.Distillation) with this weight
    distill_temperature: float = 4.0  # and temperature

    def __post_init__(self):
        self.out = Path(self.out)
        if self.models is None and self.preset not in PRESETS:
            raise ValueError(f"preset must be one of {', '.join(PRESETS)}, got {self.preset!r}")
        if not self.settle_s >= 0:
            raise ValueError(f"settle_s must be >= 0 seconds, got {self.settle_s!r}")
        if not self.seeds:
            raise ValueError("give at least one training seed")
        if self.threads is None:
            self.threads = (1, 2) + ((THREADS_PER_STAGE,) if self.runtime == "onnxruntime" else ())
        self.threads = tuple(self.threads)
        if not self.thread_counts or min(self.batch_sizes, default=0) < 1 or any(
                t != THREADS_PER_STAGE and (isinstance(t, bool) or not isinstance(t, int) or t < 1)
                for t in self.threads):
            raise ValueError(f"threads must be counts >= 1 (at least one) or {THREADS_PER_STAGE!r}, and batch sizes "
                             f">= 1, got {self.threads}, {self.batch_sizes}")
        if THREADS_PER_STAGE in self.threads and self.runtime != "onnxruntime":
            raise ValueError(f"threads {THREADS_PER_STAGE!r} needs runtime onnxruntime (ExecuTorch has one thread "
                             f"pool per process), got {self.runtime!r}")
        if self.runtime not in RUNTIMES:
            raise ValueError(f"runtime must be one of {RUNTIMES}, got {self.runtime!r}")
        if self.rounds < 3:
            raise ValueError(f"rounds must be >= 3 (median and IQR over rounds), got {self.rounds}")
        if not (self.selection_z >= 0 and math.isfinite(self.selection_z)):
            raise ValueError(f"selection_z must be a finite number >= 0 (0: the point rule), got {self.selection_z}")
        if self.cascade_last not in CASCADE_LAST:
            raise ValueError(f"cascade_last must be one of {CASCADE_LAST}, got {self.cascade_last!r}")
        check_frontier_data(self.dataset, self.data_root, self.canvas)
        self.exclude = tuple(self.exclude)
        if self.exclude:
            known = [m["label"] for m in self._all_models()["dynamic"]]
            unknown = [e for e in self.exclude if e not in known]
            if unknown:
                raise ValueError(f"exclude names no dynamic model of the preset: {unknown}; its dynamic models are "
                                 f"{known}")

        if self.distill_from is not None:
            labels = [m["label"] for m in self.model_set()["static"]]
            if self.distill_from not in labels:
                raise ValueError(f"distill_from names no static model of the set: {self.distill_from!r}; its static "
                                 f"models are {labels}")
            if not 0 < self.distill_weight <= 1 or not self.distill_temperature > 0:
                raise ValueError(f"distill_weight must be in (0, 1] and distill_temperature > 0, got "
                                 f"{self.distill_weight!r}, {self.distill_temperature!r}")

    def distillation(self) -> dict | None:
        """What the distilled static networks' checkpoints record (None without distillation)."""
        if self.distill_from is None:
            return None
        return {"teacher": self.distill_from, "weight": self.distill_weight, "temperature": self.distill_temperature}

    def _all_models(self) -> dict:
        """``models`` or the preset's, before ``exclude``."""
        return self.models or presets(self.canvas)[self.preset]

    def model_set(self) -> dict:
        models = self._all_models()
        if not self.exclude:
            return models
        return {kind: [m for m in specs if m["label"] not in self.exclude] for kind, specs in models.items()}

    @property
    def thread_counts(self) -> list[int]:
        """The integer thread counts of ``threads`` (without "per-stage"): the latency tables' conditions."""
        return [t for t in self.threads if t != THREADS_PER_STAGE]


FRONTIER_DATASETS = ("scaled_mnist", "cifar10", "cifar100", "folder")


def check_frontier_data(dataset: str, data_root: str | None, canvas: int) -> None:
    """The data choice of :class:`FrontierSettings`: the embedded digits, or CIFAR / an image folder with its
    root; CIFAR images are 32x32, so its ``canvas`` (the input side) must be 32."""
    if dataset not in FRONTIER_DATASETS:
        raise ValueError(f"dataset must be one of {', '.join(FRONTIER_DATASETS)}, got {dataset!r}")
    if dataset != "scaled_mnist" and not data_root:
        raise ValueError(f"dataset {dataset!r} reads a local folder: give data_root (--data-root)")
    if dataset.startswith("cifar") and canvas != 32:
        raise ValueError(f"{dataset} images are 32x32: the input side (canvas) must be 32, got {canvas}")


# -- training --------------------------------------------------------------------------------------------------

def build_static(spec: dict, num_classes: int = 10, in_chans: int = 1) -> nn.Module:
    if spec["factor"] > 1:
        return create_model("resized", backbone=spec["name"], factor=spec["factor"], num_classes=num_classes,
                            in_chans=in_chans, backbone_cfg=spec["cfg"])
    return create_model(spec["name"], num_classes=num_classes, in_chans=in_chans, **spec["cfg"])


def member_spec(spec: dict) -> dict:
    """The ``cascade`` member dict that rebuilds a static spec."""
    if spec["factor"] > 1:
        return {"name": "resized", "backbone": spec["name"], "factor": spec["factor"], "backbone_cfg": spec["cfg"]}
    return {"name": spec["name"], **spec["cfg"]}


def _slug(label: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in label).strip("_")


def train_one(model: nn.Module, label: str, seed: int, s: FrontierSettings, train, val, data_meta: dict,
              loss=None, epochs: int | None = None, teacher: nn.Module | None = None) -> tuple[nn.Module, dict]:
    """Train (or resume / reuse a finished run in ``out/models/seed{seed}/{label}``); the model comes back on
    the CPU in eval mode. A network built with ``stagewise=True`` trains one stage after another
    (:func:`~dyncnn.train.recipes.stagewise.fit_stagewise`, checkpoints per stage under the same folder).
    With ``teacher``, it learns from the teacher's logits too (``s.distill_weight``, ``s.distill_temperature``:
    :class:`~dyncnn.train.distill.Distillation`), and its checkpoint records that (``distilled``): a checkpoint
    trained otherwise is neither reused nor resumed."""
    # channels-last on a CPU: 1.2-1.6x the training throughput of the demo's networks (benchmarks/bench_training.py)
    epochs = s.epochs if epochs is None else epochs
    cfg = TrainConfig(epochs=epochs, batch_size=s.batch_size, lr=s.lr, label_smoothing=0.05, warmup_epochs=0.2,
                      seed=seed, device=s.device, progress=False, channels_last=s.device == "cpu")
    out = s.out / "models" / f"seed{seed}" / _slug(label)
    last = out / "last.safetensors"
    distilled = s.distillation() if teacher is not None else None
    data_meta = {**data_meta, "distilled": distilled} if distilled else data_meta
    if last.exists():
        _, meta = read_checkpoint(last)
        if meta.get("distilled") != distilled:
            raise DyncnnError(f"{last} was trained {_distilled_words(meta.get('distilled'))}, this run trains "
                              f"{label} {_distilled_words(distilled)}: give another --out")
        state = meta.get("train_state") or {}
        saved = state.get("config") or {}
        mine = asdict(cfg)
        same = all(saved.get(k) == mine[k] for k in ("epochs", "batch_size", "lr", "seed", "optimizer",
                                                       "label_smoothing", "warmup_epochs"))
        if same and state.get("epoch") == epochs and meta.get("data") == data_meta.get("data"):
            # a finished run of the same model, schedule and data: reuse its weights (the optimizer state may
            # have been stripped for transport, see ``slim``)
            load_checkpoint(last, model)
            return model.cpu().eval(), {"seconds": 0.0, "reused": str(last), "history": state.get("history", [])}
    torch.manual_seed(seed)
    t0 = time.perf_counter()
    if getattr(model, "stagewise", False):
        run = fit_stagewise(model, train, val, cfg, out_dir=out, resume=True, extra=data_meta, log=None)
    elif teacher is not None:
        # the stored renderings have no random augmentation: the teacher runs once per image (cache); the
        # user's CIFAR or folder data may have
        with Distillation(model, teacher, s.distill_weight, s.distill_temperature, cfg.label_smoothing,
                          cache=s.dataset == "scaled_mnist") as kd:
            run = Trainer(model, train, val, cfg, out_dir=out, loss_fn=kd.loss, extra=data_meta).fit(resume=True)
    else:
        run = Trainer(model, train, val, cfg, out_dir=out, loss_fn=loss, extra=data_meta).fit(resume=True)
    seconds = time.perf_counter() - t0
    model = model.cpu().eval()
    if s.only_train:     # trained here, timed elsewhere: ship weights and training record, not the optimizer
        _, meta = read_checkpoint(last)
        save_checkpoint(last, model, None, meta.get("train_state"), extra=data_meta)
        (out / "best.safetensors").unlink(missing_ok=True)
        (out / "best.json").unlink(missing_ok=True)
    return model, {"seconds": seconds, "final_val_acc": run.final_val_acc, "history": run.history}


def _distilled_words(d: dict | None) -> str:
    return "without distillation" if not d else \
        f"distilled from {d['teacher']} (weight {d['weight']}, temperature {d['temperature']})"


def build_dynamic(spec: dict, statics: dict[str, nn.Module], static_specs: dict[str, dict], num_classes: int = 10,
                  in_chans: int = 1) -> nn.Module:
    if spec["kind"] == "cascade":
        net = create_model("cascade", members=[member_spec(static_specs[m]) for m in spec["members"]],
                           num_classes=num_classes, in_chans=in_chans)
        for head, m in zip(net.heads, spec["members"]):
            head.load_state_dict(statics[m].state_dict())
        return net.eval()
    if "recipe" in spec:
        raise ValueError(f"frontier entry {spec['label']!r}: the training recipe is a model setting now, "
                         f"cfg {{'imta': ...}} (dyncnn.dynamic.imta), not a 'recipe' key")
    return create_model(spec["name"], num_classes=num_classes, in_chans=in_chans, **spec["cfg"])


# -- timing ----------------------------------------------------------------------------------------------------

@dataclass
class Timed:
    """One thing to time: ``run(x)`` on a numpy batch, at each batch size and thread count."""
    key: str
    make: Callable[[int], Callable[[np.ndarray], object]]    # threads -> runner
    # batch -> the thread count whose runner "per-stage" equals at that batch, or None (per_stage_as_uniform)
    same: Callable[[int], int | None] | None = None


def _quartiles(v: list[float]) -> tuple[float, float, float]:
    q = statistics.quantiles(v, n=4) if len(v) > 1 else [v[0]] * 3
    return statistics.median(v), q[0], q[2]


def _duration(seconds: float) -> str:
    """``42 s``, ``3 min 5 s``, ``1 h 2 min``: a time as a log line says it."""
    s = round(seconds)
    return f"{s} s" if s < 60 else f"{s // 60} min {s % 60} s" if s < 3600 else f"{s // 3600} h {s % 3600 // 60} min"


class _Progress:
    """One log line per finished step of a phase (a model trained, a model exported and evaluated, a timing
    condition): its name, its seconds and the time the phase has left. Off a terminal (a log file), where the tqdm
    bars are off, these lines are what shows that a long run moves.

    The time left is the seconds per unit of work of the steps done so far times the work left: ``weights`` give
    each step's work (in the order the steps come; e.g. a network's MACs per image, so that a 20M-MAC network
    left is not priced as a 1M-MAC one done), else every step weighs 1. A step done in no time (a model reused
    from an earlier run: ``step(..., reused=True)``) is left out of the rate."""

    def __init__(self, total: int, log: Callable[[str], object], weights: Sequence[float] | None = None):
        if weights is not None and (len(weights) != total or not all(w > 0 for w in weights)):
            raise ValueError(f"weights must be {total} numbers > 0, got {weights}")
        self.total, self.log, self.done = total, log, 0
        self.weights = list(weights) if weights is not None else [1.0] * total
        self.busy_s = self.busy_work = 0.0
        self.last = time.perf_counter()

    def step(self, what: str, reused: bool = False) -> None:
        now = time.perf_counter()
        seconds, self.last = now - self.last, now
        if not reused:
            self.busy_s += seconds
            self.busy_work += self.weights[self.done]
        self.done += 1
        left = sum(self.weights[self.done:]) * self.busy_s / self.busy_work if self.busy_work else None
        self.log(f"    {what} in {seconds:.1f} s ({self.done} of {self.total}"
                 + (f", about {_duration(left)} left)" if self.done < self.total and left is not None else ")"))


def _conditions(threads: Sequence[int | str]) -> str:
    return "1 thread" if list(threads) == [1] else "threads " + ", ".join(map(str, threads))


def time_interleaved(items: Sequence[Timed], images: np.ndarray, s: FrontierSettings, label: str = "runtime",
                     release: Callable[[], None] = lambda: None, log: Callable[[str], object] | None = None) -> dict:
    """ms per image of every item at every thread count of ``s.threads`` (counts and "per-stage") and batch size:
    median and quartiles over ``s.rounds`` rounds. Returns ``{key: {"t{threads}_b{batch}": {...}}}``.

    Paired, as a ratio must be: in each round every item takes its turn (their order rotated between rounds), and
    within its turn it runs under each thread count one after the other (that order rotated too). So a speedup
    (item against item, same thread count) and a thread comparison (count against count, same item) are each
    measured minutes apart at most, never one whole phase after the other (the machine drifts between phases: in
    a headline run timed phase by phase, the same static network with the same thread count ran 11% slower in the
    per-stage phase than in the 2-thread phase before it). ``release`` is called at the end, to free the
    sessions. A tqdm bar per batch size on a terminal; with ``log``, one line each (:class:`_Progress`).

    With more than one thread among ``s.threads``, every turn waits ``s.settle_s`` (:data:`SETTLE_S`) first, then
    runs one untimed call: a pool keeps spinning for a while after its last run (ONNX Runtime's default, which a
    single graph gains from), and on a 2-core CPU those spinning threads took the cores of the next turn (tiny-XL
    /2 at 2 threads, batch 1, in the headline runs: 0.65 ms per image back to back, 0.18 ms with the pause). Each
    turn is then timed as if alone in its process. With one thread there is no pool that could spin: no pause.

    Where an item's "per-stage" runner is, at a batch size, the same sessions as one of the timed counts (its
    ``same``: a bundle whose recorded plan is one count everywhere, :func:`per_stage_as_uniform`), it is not
    timed twice: its entry is that count's, with ``same_as`` naming it. Two timings of one configuration differ
    by the machine's noise alone (a static network's 2-thread session, timed twice in the same rounds of a
    headline run: 0.203 and 0.263 ms per image), which a comparison of the two columns would read as a gain or
    a loss of the thread choice."""
    singles = [images[i:i + 1] for i in range(min(s.single_images, len(images)))]
    out: dict[str, dict] = {it.key: {} for it in items}
    conds = list(s.threads)
    progress = _Progress(len(s.batch_sizes), log) if log else None
    # per batch size, the items whose "per-stage" runner is a timed count's sessions: {key: count}
    aliases = {b: {it.key: t for it in items if THREADS_PER_STAGE in conds and it.same is not None
                   and (t := it.same(b)) in conds} for b in s.batch_sizes}
    # a runner is made (its sessions loaded) only where some batch size times it
    runners = {(it.key, t): it.make(t) for t in conds for it in items
               if t != THREADS_PER_STAGE or any(it.key not in a for a in aliases.values())}
    settle = s.settle_s if any(t != 1 for t in conds) else 0.0     # one thread: no pool that could spin on
    keys = [it.key for it in items]
    for b in s.batch_sizes:
        n = min(s.batch_images, len(images)) // b * b if b > 1 else len(singles)
        chunks = singles if b == 1 else [images[i:i + b] for i in range(0, n, b)]
        alias = aliases[b]
        timed = {kt: fn for kt, fn in runners.items() if not (kt[1] == THREADS_PER_STAGE and kt[0] in alias)}
        for fn in timed.values():                          # warm-up: sessions, allocators, caches
            for c in chunks[:4]:
                fn(c)
        per: dict[tuple, list[float]] = {kt: [] for kt in timed}
        for r in tqdm(range(s.rounds), desc=f"{label} batch {b}, {_conditions(conds)}", leave=False,
                      disable=None):        # None: no bar off a terminal
            shift, cshift = r % len(keys), r % len(conds)
            for k in keys[shift:] + keys[:shift]:
                for t in conds[cshift:] + conds[:cshift]:
                    if (k, t) not in timed:
                        continue
                    fn = timed[k, t]
                    if settle:
                        time.sleep(settle)
                        fn(chunks[0])         # untimed: caches warm again after the pause
                    t0 = time.perf_counter()
                    for c in chunks:
                        fn(c)
                    per[k, t].append((time.perf_counter() - t0) * 1e3 / n)
        for (k, t), v in per.items():
            med, p25, p75 = _quartiles(v)
            out[k][f"t{t}_b{b}"] = {"median_ms": med, "p25_ms": p25, "p75_ms": p75, "rounds": len(v)}
        for k, t in alias.items():
            out[k][f"t{THREADS_PER_STAGE}_b{b}"] = {**out[k][f"t{t}_b{b}"], "same_as": f"t{t}_b{b}"}
        if progress:
            progress.step(f"{label} batch {b}, {_conditions(conds)}: {len(items)} models timed")
    del runners
    release()
    gc.collect()
    return out


# -- one seed --------------------------------------------------------------------------------------------------

def _sweep_candidates(val_scores: Tensor, val_correct: Tensor, cost: Sequence[float], temps) -> list[dict]:
    """Threshold sets of the MSDNet sweep (a finer q grid than the official 39 points) on the validation split,
    each with its validation accuracy and predicted cost; sets that send the same numbers to each exit once."""
    k = val_scores.shape[0]
    cands, seen = [], set()
    for q in np.exp(np.linspace(math.log(0.02), math.log(50.0), 121)):
        th = msdnet_thresholds(val_scores, exit_proportions(float(q), k))
        point = evaluate_thresholds(val_scores, val_correct, th, cost, float(q))
        key = tuple(round(f * val_scores.shape[1]) for f in point.exit_fractions)
        if key in seen:
            continue
        seen.add(key)
        cands.append({"q": float(q), "thresholds": list(point.policy().thresholds), "temperatures": list(temps),
                      "val_accuracy": point.accuracy, "val_cost": point.mean_macs,
                      "val_exit_fractions": point.exit_fractions})
    full = {"q": math.inf, "thresholds": [math.inf] * (k - 1), "temperatures": list(temps),
            "val_accuracy": float(val_correct[-1].double().mean()), "val_cost": float(cost[-1]),
            "val_exit_fractions": [0.0] * (k - 1) + [1.0], "full_depth": True}
    return cands + [full]


def _curve(cands: list[dict], n: int) -> list[dict]:
    """``n`` candidates spread over the validation cost range, from the cheapest to full depth."""
    cands = sorted(cands, key=lambda c: c["val_cost"])
    if len(cands) <= n:
        return cands
    picks = {round(i * (len(cands) - 1) / (n - 1)) for i in range(n)}
    return [cands[i] for i in sorted(picks)]


def run_seed(seed: int, s: FrontierSettings, data: dict, log=print) -> dict:
    """Train, calibrate and time everything for one training seed; returns the seed's results."""
    models = s.model_set()
    train, val, test = data["train"], data["val"], data["test"]
    shape = {"num_classes": data["num_classes"], "in_chans": data["in_chans"]}
    x_val, y_val = data_tensors(val)
    x_test, y_test = data_tensors(test)
    x_test_np = x_test.numpy()
    static_specs = {m["label"]: m for m in models["static"]}
    result: dict = {"seed": seed, "static": {}, "dynamic": {}, "training_seconds": {}}
    statics: dict[str, nn.Module] = {}
    # the teacher of the distilled networks first (``s.distill_from``), the others in the preset's order
    static_order = sorted(models["static"], key=lambda m: m["label"] != s.distill_from)
    training = _Progress(len(static_order) + sum(d["kind"] == "trained" for d in models["dynamic"]), log,
                         _training_work(static_order, models["dynamic"], s, shape, x_val[:1]))
    for spec in static_order:
        teacher = statics.get(s.distill_from) if spec["label"] != s.distill_from else None
        log(f"  seed {seed}: training static {spec['label']}" + (f" (distilled from {s.distill_from})"
                                                                 if teacher is not None else ""))
        net, info = train_one(build_static(spec, **shape), spec["label"], seed, s, train, val, data["meta"],
                              teacher=teacher)
        statics[spec["label"]] = net
        result["training_seconds"][spec["label"]] = info["seconds"]
        reused = bool(info.get("reused"))
        training.step(f"{spec['label']}: {'reused' if reused else 'trained'}", reused)
    trained_dyn: dict[str, nn.Module] = {}
    for spec in models["dynamic"]:
        if spec["kind"] == "trained":
            log(f"  seed {seed}: training dynamic {spec['label']}")
            # the model owns its training loss (``training_loss``, its cfg's IMTA recipe), which the trainer uses
            net, info = train_one(build_dynamic(spec, statics, static_specs, **shape), spec["label"], seed, s, train,
                                  val, data["meta"])
            trained_dyn[spec["label"]] = net
            result["training_seconds"][spec["label"]] = info["seconds"]
            reused = bool(info.get("reused"))
            training.step(f"{spec['label']}: {'reused' if reused else 'trained'}", reused)
    if s.only_train:
        return result

    bundles = s.out / "bundles" / f"seed{seed}"
    sessions: dict = {}      # one loaded bundle per (folder, threads), shared by a model's operating points

    def bundle_of(folder: Path, t: int):
        if (folder, t) not in sessions:
            sessions[folder, t] = load_bundle(folder, threads=t)
        return sessions[folder, t]
    timed: list[Timed] = []
    eager_timed: list[Timed] = []
    counts = s.thread_counts
    t_cost = counts[0]
    # static models: accuracy on val (for the target; the logits also feed the cascade search) and test, MACs,
    # one bundle each
    val_y = y_val
    static_val_logits: dict[str, Tensor] = {}
    log(f"  seed {seed}: exporting, evaluating and calibrating every model")
    calibrate: list[tuple[Path, ExitPolicy | None]] = []      # bundles whose threads per stage are measured
    prepared = _Progress(len(statics) + len(models["dynamic"]), log)
    with torch_threads(max(counts)):
        for label, net in statics.items():
            folder = bundles / _slug(label)
            export_bundle(net, folder, tuple(x_test.shape[1:]), **_export_options(s))
            static_val_logits[label] = collect_exit_logits(_AsExits(net).eval(), val)[0][0]
            acc_val = float((static_val_logits[label].argmax(1) == val_y).double().mean())
            loss_val = float(F.cross_entropy(static_val_logits[label].double(), val_y))
            acc_test = evaluate(net, test)["acc"]
            macs = count_macs(net, x_test[:1]).per_sample
            result["static"][label] = {"val_accuracy": acc_val, "val_loss": loss_val, "test_accuracy": acc_test,
                                       "macs": macs,
                                       "params": sum(p.numel() for p in net.parameters())}
            calibrate.append((folder, None))
            timed.append(Timed(f"static|{label}", lambda t, f=folder: bundle_of(f, t).run_numpy, _same(folder)))
            eager_timed.append(Timed(f"static|{label}", lambda t, m=net: _eager_static(m)))
            prepared.step(f"{label}: exported and evaluated")
    best_static = best_on_validation(result["static"])
    target_val = result["static"][best_static]["val_accuracy"]
    result["best_static_by_val"] = best_static
    reference_correct = static_val_logits[best_static].argmax(1) == val_y

    searches: dict[str, dict] = {}
    for spec in models["dynamic"]:
        kind = spec["kind"]
        if kind in ("searched", "fused"):
            # with own_search, the fused cascade's members are searched for its own exits (the members' summed
            # log-probabilities), on the member latencies the cascade search measured; else the cascade's members
            key = "fused_search" if kind == "fused" and spec.get("own_search") else "cascade_search"
            if key not in searches:
                done = next(iter(searches.values()), None)
                searches[key] = _search_members(static_val_logits, val_y,
                                                lambda label: bundle_of(bundles / _slug(label), t_cost), x_val,
                                                target_val, t_cost, spec.get("max_members", 3), log, seed,
                                                z=s.selection_z, reference=best_static,
                                                cost=done["member_ms"] if done else None,
                                                committee=key == "fused_search",
                                                last=best_static if s.cascade_last == "reference" else None)
                result[key] = searches[key]
            members = searches[key]["ranking"][0]["members"]
            if kind == "fused":
                trained_dyn[spec["label"]] = _train_fused(spec, members, statics, static_specs, shape, seed, s,
                                                          data, result, log)
                spec = {**spec, "members": list(members)}
            else:
                spec = _cascade(spec["label"], *members)
        label = spec["label"]
        net = build_dynamic(spec, statics, static_specs, **shape) if spec["kind"] == "cascade" else \
            trained_dyn[label]
        net.eval()
        with torch_threads(max(counts)):
            val_logits, val_y = collect_exit_logits(net, val)
            test_logits, test_y = collect_exit_logits(net, test)
            temps = fit_temperatures(val_logits, val_y)
            exit_macs = net.exit_macs(x_test[:1])
            folder = bundles / _slug(label)
            export_bundle(net, folder, tuple(x_test.shape[1:]), **_export_options(s))
        # per-exit latency at batch 1 (in the runtime, each thread count), measured on validation images
        stage_tables = {}
        for t in counts:
            with torch_threads(t):
                ms = load_bundle(folder, threads=t).stage_latency_ms(x_val[:64].numpy(), repeats=3)
            record_stage_latency(folder, ms, t)
            stage_tables[t] = np.cumsum(ms).tolist()
        val_scores = exit_scores(val_logits, temperatures=temps)
        test_scores = exit_scores(test_logits, temperatures=temps)
        val_correct = val_logits.argmax(-1) == val_y
        test_correct = test_logits.argmax(-1) == test_y
        # operating points: the MSDNet sweep (its last entry: full depth) and, for 2-3 exits, a threshold grid
        sweep = _sweep_candidates(val_scores, val_correct, stage_tables[t_cost], temps)
        cands = grid_candidates(val_scores, val_correct, stage_tables[t_cost], temps) + sweep
        if s.selection_z > 0:
            cands = with_paired_counts(cands, val_scores, val_correct, reference_correct)
            sweep = cands[-len(sweep):]
        chosen = select_on_validation(cands, target_val, s.selection_z)
        calibrate.append((folder, ExitPolicy(chosen["thresholds"], "max_prob", chosen["temperatures"])))
        picked = {tuple(p["thresholds"]): p for p in [*_curve(cands, s.curve_points), chosen, sweep[-1]]}
        points = [dict(p, chosen=p["thresholds"] == chosen["thresholds"]) for p in picked.values()]
        bundle = load_bundle(folder, threads=1)
        entries = []
        for i, p in enumerate(sorted(points, key=lambda p: p["val_cost"])):
            policy = ExitPolicy(p["thresholds"], "max_prob", p["temperatures"])
            res = _run_in_chunks(bundle, x_test, policy)     # the deployed driver's decisions on the test split
            offline = assign_exits(test_scores, torch.tensor([*p["thresholds"], -math.inf],
                                                            dtype=test_scores.dtype))
            acc = float((res.logits.argmax(1) == y_test).double().mean())
            frac = (torch.bincount(res.exit_index, minlength=net.num_exits).double() / len(y_test)).tolist()
            cum_t = {t: stage_tables[t] for t in counts}
            entries.append({**p, "test_accuracy": acc, "test_mean_macs": float(res.macs.double().mean()),
                            "test_exit_fractions": frac,
                            "offline_agrees": int((offline == res.exit_index).sum()), "n_test": len(y_test),
                            "offline_accuracy": float(test_correct[offline, torch.arange(len(y_test))]
                                                      .double().mean()),
                            "predicted_ms_b1": {str(t): float(np.dot(frac, cum_t[t])) for t in counts}})
            key = f"dynamic|{label}|{i}"
            entries[-1]["key"] = key
            timed.append(Timed(key, lambda t, f=folder, pol=policy: _dyn_runner(bundle_of(f, t), pol),
                               _same(folder)))
            if p["chosen"] or p.get("full_depth"):
                eager_timed.append(Timed(key, lambda t, m=net, pol=policy: _eager_dynamic(m, pol)))
        result["dynamic"][label] = {"kind": kind, "members": spec.get("members"),
                                    "chosen_val_accuracy": chosen["val_accuracy"],
                                    "chosen_val_cost_ms": chosen["val_cost"], "target_val_accuracy": target_val,
                                    "chosen_reaches": reaches_target(chosen, target_val, s.selection_z),
                                    "exit_macs": exit_macs, "temperatures": temps,
                                    "stage_cumulative_ms": {str(t): v for t, v in stage_tables.items()},
                                    "anytime_test": [float(test_correct[k].double().mean())
                                                     for k in range(net.num_exits)],
                                    "points": entries}
        prepared.step(f"{label}: calibrated, exported and run on test")
    _record_stage_threads(calibrate, x_val, s, log=lambda m: log(f"  seed {seed}: {m}"))

    log(f"  seed {seed}: timing {len(timed)} models / operating points in {RUNTIME_NAMES[s.runtime][0]} "
        f"(threads {list(s.threads)}, batches {list(s.batch_sizes)}, {s.rounds} interleaved rounds)")
    rt = time_interleaved(timed, x_test_np, s, RUNTIME_NAMES[s.runtime][0], release=sessions.clear, log=log)
    eager = {}
    if s.eager:
        es = FrontierSettings(**{**asdict(s), "threads": (max(counts),), "rounds": max(3, s.rounds // 2),
                                 "single_images": max(10, s.single_images // 4),
                                 "batch_images": max(max(s.batch_sizes), s.batch_images // 2),
                                 "models": s.models})
        with torch.inference_mode():
            eager = time_interleaved(eager_timed, x_test, es, "eager", log=log)
    for label, r in result["static"].items():
        r["rt"], r["eager"] = rt[f"static|{label}"], eager.get(f"static|{label}", {})
    for label, d in result["dynamic"].items():
        for p in d["points"]:
            p["rt"], p["eager"] = rt[p["key"]], eager.get(p["key"], {})
    result["merit"] = figures_of_merit(result, s)
    return result


def _training_work(static_order: Sequence[dict], dynamic: Sequence[dict], s: FrontierSettings, shape: dict,
                   x: Tensor) -> list[float]:
    """Each training step's work for :class:`_Progress`: the network's MACs per image (a distilled one adds a
    third of its teacher's, whose forward runs in each of its training steps: about a third of a training step's
    arithmetic), statics in ``static_order``, then the trained dynamic models."""
    macs = {spec["label"]: count_macs(build_static(spec, **shape).eval(), x).per_sample for spec in static_order}
    work = [m + (macs[s.distill_from] / 3 if s.distill_from not in (None, label) else 0) for label, m in macs.items()]
    for spec in dynamic:
        if spec["kind"] == "trained":
            work.append(count_macs(build_dynamic(spec, {}, {}, **shape).eval(), x).per_sample)
    return [max(w, 1.0) for w in work]


def _train_fused(spec: dict, members: Sequence[str], statics: dict[str, nn.Module], static_specs: dict[str, dict],
                 shape: dict, seed: int, s: FrontierSettings, data: dict, result: dict, log) -> nn.Module:
    """The searched ``members`` fused into one network (``spec`` from :func:`_fused`), their trained weights
    loaded, its laterals trained ``spec["epochs"]`` epochs (checkpointed under the members' names, so that another
    seed's other members never resume this one)."""
    label = spec["label"]
    net = create_model("fused_cascade", members=[member_spec(static_specs[m]) for m in members],
                       laterals=spec["laterals"], imta=PLAIN_RECIPE, **shape)
    net.load_members([statics[m] for m in members])
    seconds = 0.0
    if spec["laterals"] != "none" and spec["epochs"] > 0:
        log(f"  seed {seed}: training {label} ({' -> '.join(members)}; the laterals only, {spec['epochs']} "
            f"epoch(s))")
        net, info = train_one(net, f"{label} {' '.join(members)}", seed, s, data["train"], data["val"],
                              data["meta"], epochs=spec["epochs"])
        seconds = info["seconds"]
    result["training_seconds"][label] = seconds
    return net.eval()


def _run_in_chunks(bundle, x: Tensor, policy: ExitPolicy, chunk: int = 256):
    """``bundle.run(x, policy)`` in chunks of ``chunk`` images, concatenated: the same result (each sample's exit
    depends on that sample alone), in the memory of one chunk. A multi-stage network passes about 2 MB of kept
    features per 128x128 image from stage to stage: 3,000 test images at once took the 24 GB of a 2-core machine."""
    parts = [bundle.run(x[i:i + chunk], policy) for i in range(0, len(x), chunk)]
    return ExitResult(*(torch.cat([getattr(p, f) for p in parts]) for f in ("logits", "exit_index", "macs")))


def _same(folder: Path) -> Callable[[int], int | None]:
    """A :class:`Timed` item's ``same`` for the bundle in ``folder``: its manifest's plan, read when timed."""
    return lambda b: per_stage_as_uniform(read_manifest(folder), b)


def _record_stage_threads(jobs: Sequence[tuple[Path, ExitPolicy | None]], x_val: Tensor, s: FrontierSettings,
                          log: Callable[[str], object] = lambda m: None) -> None:
    """With "per-stage" among ``s.threads``: measure on validation images, at each timed batch size, which of the
    timed thread counts runs each stage of each bundle of ``jobs`` (``(folder, policy)``) fastest, measured as the
    frontier times (each pass after the pause of ``s.settle_s``, :func:`measure_stage_threads`), and record it in
    its manifest. For a multi-exit bundle with a ``policy`` (its chosen operating point), each batch size takes
    instead the plan (a count per stage) that ran the whole bundle fastest at that batch size under that policy
    (:func:`measure_stage_plans`: one image at a time at batch 1; at batch 64 the later stages get only the rows
    that did not leave), in :data:`PLAN_ROUNDS` paired rounds: a mixed plan must beat the better plan of one count
    everywhere in every round (:func:`~dyncnn.export.runtime.pick_plan`).

    Every bundle at once, after all are exported, their rounds interleaved (the ``_many`` functions): a bundle's
    rounds then lie about as far apart as the whole measurement, as they do in the timing that follows, instead of
    within the few seconds of its own turn, where a slow phase of the machine's second core decided its count
    (:func:`~dyncnn.export.runtime.measure_stage_threads_many`)."""
    if THREADS_PER_STAGE not in s.threads or not jobs:
        return
    folders = [f for f, _ in jobs]
    plans: list[dict] = [{} for _ in jobs]
    log(f"measuring threads per stage of {len(jobs)} bundles ({PLAN_ROUNDS} interleaved rounds, counts "
        f"{list(s.thread_counts)}, batches {list(s.batch_sizes)})")
    t0 = time.perf_counter()
    with torch_threads(max(s.thread_counts)):
        # as the frontier times: PLAN_ROUNDS rounds, each pass after its pause, passes of 4 batches of the largest
        measured = measure_stage_threads_many(folders, x_val[:4 * max(64, *s.batch_sizes)].numpy(),
                                              s.thread_counts, s.batch_sizes, rounds=PLAN_ROUNDS,
                                              settle_s=s.settle_s)
        multi = [j for j, (_, policy) in enumerate(jobs) if policy is not None]
        for b in s.batch_sizes if multi else ():
            runs = []
            for j in multi:
                at = measured[j][b]               # {threads: [ms per stage]} at batch b, full depth
                stagewise = [min(at, key=lambda t: at[t][k]) for k in range(len(next(iter(at.values()))))]
                runs.append((folders[j], jobs[j][1], [stagewise]))
            found = measure_stage_plans_many(runs, x_val[:max(64, 4 * b)].numpy(), s.thread_counts,
                                             rounds=PLAN_ROUNDS, settle_s=s.settle_s, batch=b, per_round=True)
            for j, f in zip(multi, found):
                plans[j][b] = f
    for folder, m, p in zip(folders, measured, plans):
        record_stage_threads(folder, m, batch_plans=p)
    log(f"threads per stage measured in {time.perf_counter() - t0:.0f} s")


def _members_ms(bundles: dict[str, Any], images: np.ndarray, rounds: int = 7) -> dict[str, float]:
    """Milliseconds of one call on one image of ``images`` for each bundle of ``bundles`` (label -> loaded bundle):
    in each of ``rounds`` rounds every bundle runs one untimed image, then times each image (their order rotated
    between rounds), the round's figure being the median call; the median over rounds, after one warm-up pass
    each. Interleaved like :func:`time_interleaved`, so that a change of load hits every candidate member alike
    (the cascade search ranks cascades by these figures, and members timed one after the other, each in a moment
    of its own, changed a search's pick in the headline runs); medians, so that a call the machine interrupts does
    not weigh (in a pass's mean such calls weigh most for the smallest members, and tilt the ranking against
    cascades that start small)."""
    singles = [images[i:i + 1] for i in range(len(images))]
    for b in bundles.values():
        for x in singles:
            b.run_numpy(x)
    per: dict[str, list[float]] = {k: [] for k in bundles}
    keys = list(bundles)
    for r in range(rounds):
        shift = r % len(keys)
        for k in keys[shift:] + keys[:shift]:
            run = bundles[k].run_numpy
            run(singles[0])                        # untimed: this member's weights back in the caches
            calls = []
            for x in singles:
                t0 = time.perf_counter()
                run(x)
                calls.append(time.perf_counter() - t0)
            per[k].append(float(np.median(calls)) * 1e3)
    return {k: float(np.median(v)) for k, v in per.items()}


def _search_members(val_logits: dict[str, Tensor], val_y: Tensor, bundle: Callable, x_val: Tensor,
                    target_val: float, threads: int, max_members: int, log, seed: int, z: float = 0.0,
                    reference: str | None = None, cost: dict[str, float] | None = None,
                    committee: bool = False, last: str | None = None) -> dict:
    """The members of the searched cascade, on the validation split: every static model's validation logits
    (eager) and its batch-1 latency in the runtime (its exported bundle, ``threads`` threads, validation images,
    interleaved rounds: :func:`_members_ms`; or ``cost``, measured before), then
    :func:`~dyncnn.frontier.search.search_cascades` (``committee``: chains scored as fused cascades; ``last``:
    only the chains that end with that model, unless it measured the cheapest, when no chain can)."""
    if cost is None:
        with torch_threads(threads):
            cost = _members_ms({label: bundle(label) for label in val_logits}, x_val[:64].numpy())
    if last is not None and not can_end_cascade(cost, last):
        log(f"  seed {seed}: {last} measured the cheapest model: the cascades searched end with any model")
        last = None
    ranking = search_cascades(val_logits, val_y, cost, target_val, max_members, z=z, reference=reference,
                              committee=committee, last=last)
    log(f"  seed {seed}: {'fused ' if committee else ''}cascade searched on validation: "
        f"{' -> '.join(ranking[0]['members'])} (predicted {ranking[0]['val_cost']:.3f} ms per image, validation "
        f"accuracy {ranking[0]['val_accuracy']:.4f})")
    return {"member_ms": cost, "threads": threads, "ranking": ranking[:10], "candidates": len(ranking), "last": last}


class _AsExits(nn.Module):
    """A static network as a one-exit network (``forward`` returns the list of exit logits)."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, x: Tensor) -> list[Tensor]:
        return [self.net(x)]


def _export_options(s: FrontierSettings) -> dict:
    """``export_bundle`` options of the timed runtime: ExecuTorch programs take batches up to the largest timed."""
    if s.runtime == "executorch":
        return {"runtime": "executorch", "max_batch": max(s.batch_sizes)}
    return {}


def _eager_static(model: nn.Module):
    return lambda x: model(x)


def _eager_dynamic(model: nn.Module, policy: ExitPolicy):
    return lambda x: model.infer(x, policy)


def _dyn_runner(bundle, policy):
    return lambda x: bundle.run_numpy(x, policy)


def figures_of_merit(result: dict, s: FrontierSettings) -> dict:
    """Per dynamic model and (threads, batch): the speedup at equal accuracy of its chosen point, the realized
    speedup over its own full depth and the share of the MAC speedup it keeps, predicted vs measured latency."""
    out: dict = {}
    for cond in [f"t{t}_b{b}" for t in s.threads for b in s.batch_sizes]:
        front = pareto_front([Point(r["rt"][cond]["median_ms"], r["test_accuracy"], k)
                              for k, r in result["static"].items()])
        out[cond] = {"front": [asdict(p) for p in front], "models": {}}
        for label, d in result["dynamic"].items():
            chosen = next(p for p in d["points"] if p["chosen"])
            full = next(p for p in d["points"] if p.get("full_depth"))
            sp = speedup_at_equal_accuracy(front, Point(chosen["rt"][cond]["median_ms"], chosen["test_accuracy"]))
            realized = full["rt"][cond]["median_ms"] / chosen["rt"][cond]["median_ms"]
            mac_speedup = d["exit_macs"][-1] / chosen["test_mean_macs"]
            t = cond.split("_")[0][1:]
            out[cond]["models"][label] = {**asdict(sp), "realized_vs_full": realized, "mac_speedup": mac_speedup,
                                          "kept": realized / mac_speedup,
                                          "predicted_ms": chosen["predicted_ms_b1"].get(t) if cond.endswith("_b1")
                                          else None,
                                          "measured_ms": chosen["rt"][cond]["median_ms"],
                                          "iqr_ms": chosen["rt"][cond]["p75_ms"] - chosen["rt"][cond]["p25_ms"]}
    return out


# -- the whole run ---------------------------------------------------------------------------------------------

def load_data(s: FrontierSettings) -> dict:
    """The splits, the data record checkpoints keep (``meta``), and the classes and channels the models are built
    for: ScaledMNIST (1 channel, 10 classes) or the user's CIFAR / image folder (3 channels, at ``canvas``)."""
    if s.dataset == "scaled_mnist":
        cfg = {"canvas": s.canvas, "clutter": s.clutter, "seed": s.data_seed}
        return {"train": ScaledMNIST("train", repeats=s.train_repeats, **cfg),
                "val": ScaledMNIST("val", repeats=s.val_repeats, **cfg),
                "test": ScaledMNIST("test", repeats=s.test_repeats, **cfg),
                "meta": {"data": {"name": "scaled_mnist", **cfg, "input_size": s.canvas}},
                "num_classes": 10, "in_chans": 1}
    cfg = {"root": str(s.data_root), "seed": s.data_seed, **({"input_size": s.canvas} if s.dataset == "folder"
                                                            else {})}
    splits = {split: get_dataset(s.dataset, split, **cfg) for split in ("train", "val", "test")}
    return {**splits, "meta": {"data": {"name": s.dataset, **cfg, "input_size": s.canvas}},
            "num_classes": splits["train"].num_classes, "in_chans": splits["train"].in_chans}


def data_tensors(ds) -> tuple[Tensor, Tensor]:
    """All images of a split as one float tensor (N, C, H, W) and its labels: ScaledMNIST's stored uint8 images
    scaled to [0, 1], else every sample read through the split's (evaluation) transforms."""
    if isinstance(ds, ScaledMNIST):
        return ds.images.float() / 255, torch.as_tensor(ds.targets)
    xs, ys = zip(*(ds[i] for i in range(len(ds))))
    return torch.stack(xs), torch.as_tensor(ys)


def run_frontier(s: FrontierSettings, log=print) -> dict:
    """Everything in the module docstring; writes ``frontier.json``, ``frontier.md`` and ``frontier.png`` into
    ``s.out`` and returns the results."""
    torch.set_flush_denormal(True)      # as ONNX Runtime does; denormals would make eager timings erratic
    try:
        with output_lock(s.out, "frontier output"):     # a second frontier into s.out meanwhile is refused
            return _run_frontier(s, log)
    finally:
        torch.set_flush_denormal(False)   # process-wide: leave the default behind


def _run_frontier(s: FrontierSettings, log) -> dict:
    t0 = time.perf_counter()
    s.out.mkdir(parents=True, exist_ok=True)
    from .report import data_name, distill_words
    log(f"frontier: {data_name(asdict(s))}, preset {s.preset}, seeds "
        f"{list(s.seeds)}, {s.epochs} epochs for every model" + distill_words(asdict(s)))
    data = load_data(s)
    log(f"  data: {len(data['train'])} training renderings, {len(data['val'])} validation, {len(data['test'])} "
        + (f"test ({s.test_repeats} renderings per test digit)" if s.dataset == "scaled_mnist" else "test"))
    threads = s.train_threads or torch.get_num_threads()
    seeds = []
    for seed in s.seeds:
        with torch_threads(threads):
            seeds.append(run_seed(seed, s, data, log))
        if not s.only_train:     # each seed's results as soon as they exist: a long run interrupted keeps them
            atomic_write_text(s.out / f"seed{seed}.json", json.dumps(seeds[-1], indent=1, default=_jsonable))
    results = {"settings": {**asdict(s), "out": str(s.out)}, "machine": machine_info(s.runtime), "seeds": seeds,
               "seconds": time.perf_counter() - t0}
    if s.only_train:
        return results
    results["summary"] = summarize_seeds(seeds, s)
    write_outputs(results, s.out)
    log("")
    log((s.out / "frontier.md").read_text().split("\n## ")[0])
    return results


def write_outputs(results: dict, out: Path) -> None:
    from .report import plot_frontier, render_markdown
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "frontier.json", json.dumps(results, indent=1, default=_jsonable) + "\n")
    plot_frontier(results, out / "frontier.png")
    atomic_write_text(out / "frontier.md", render_markdown(results))


def upgrade_results(run: dict) -> dict:
    """Results written before the runtime became a setting: ONNX Runtime timings under ``"ort"`` move to ``"rt"``;
    before ``cascade_last``, the cascade search took any last member (in place; returns ``run``)."""
    run["settings"].setdefault("runtime", "onnxruntime")
    run["settings"].setdefault("cascade_last", "any")
    for sd in run["seeds"]:
        entries = [*sd["static"].values(), *(p for d in sd["dynamic"].values() for p in d["points"])]
        for e in entries:
            if "ort" in e:
                e["rt"] = e.pop("ort")
    return run


def merge_runs(folders: Sequence[str | Path], out: str | Path) -> dict:
    """One report from runs of the same models and settings made for different seeds (e.g. in parallel
    processes): their seeds side by side, summarized again, written to ``out``."""
    runs = [upgrade_results(read_json(Path(f) / "frontier.json", "frontier results")) for f in folders]
    first = runs[0]
    keys = ("preset", "canvas", "clutter", "data_seed", "epochs", "threads", "batch_sizes", "test_repeats",
            "runtime", "selection_z", "cascade_last")
    for f, r in zip(folders, runs):
        diff = [k for k in keys + ("dataset", "data_root") if r["settings"].get(k) != first["settings"].get(k)]
        if diff or set(r["seeds"][0]["dynamic"]) != set(first["seeds"][0]["dynamic"]):
            raise ValueError(f"{f} was run with other settings or models than {folders[0]} ({diff or 'models'})")
    seeds = [sd for r in runs for sd in r["seeds"]]
    if len({sd["seed"] for sd in seeds}) != len(seeds):
        raise ValueError(f"the runs share a seed: {[sd['seed'] for sd in seeds]}")
    st = first["settings"]
    settings = FrontierSettings(**{**{k: v for k, v in st.items() if k != "out"}, "out": Path(out),
                                   "seeds": tuple(sd["seed"] for sd in seeds)})
    results = {**first, "settings": {**st, "out": str(out), "seeds": [sd["seed"] for sd in seeds]},
               "seeds": seeds, "merged_from": [str(f) for f in folders],
               "machines": [r["machine"] for r in runs], "seconds": max(r["seconds"] for r in runs)}
    results["summary"] = summarize_seeds(seeds, settings)
    with output_lock(Path(out), "frontier output"):
        write_outputs(results, Path(out))
    return results


def _jsonable(v):
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    if isinstance(v, (np.floating, np.integer)):
        return v.item()
    if isinstance(v, Path):
        return str(v)
    raise TypeError(f"not JSON serializable: {type(v).__name__}")


def machine_info(runtime: str = "onnxruntime") -> dict:
    import importlib.metadata
    import os
    try:
        load = os.getloadavg()
    except OSError:
        load = None
    return {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cpus": os.cpu_count(), "load_average": load, "torch": torch.__version__, "runtime": runtime,
            runtime: importlib.metadata.version(runtime)}


def select_model(seeds: list[dict]) -> str:
    """The dynamic model to quote, chosen on the validation split only: among the models whose chosen point
    reached the target validation accuracy for every seed (by the run's selection rule, ``chosen_reaches``; runs
    written before it: the point rule), the lowest mean predicted latency; if none did, the highest mean
    validation accuracy."""
    labels = list(seeds[0]["dynamic"])

    def reached_in(d: dict) -> bool:
        return d.get("chosen_reaches", d["chosen_val_accuracy"] >= d["target_val_accuracy"])
    reached = [m for m in labels if all(reached_in(sd["dynamic"][m]) for sd in seeds)]
    if reached:
        return min(reached, key=lambda m: statistics.fmean(sd["dynamic"][m]["chosen_val_cost_ms"] for sd in seeds))
    return max(labels, key=lambda m: statistics.fmean(sd["dynamic"][m]["chosen_val_accuracy"] for sd in seeds))


def summarize_seeds(seeds: list[dict], s: FrontierSettings) -> dict:
    """Mean and spread over seeds of each dynamic model's figure of merit, per (threads, batch), and the model
    selected on validation (``select_model``) under ``"selected"``."""
    out: dict = {"selected": select_model(seeds)}
    for cond in seeds[0]["merit"]:
        out[cond] = {}
        for label in seeds[0]["merit"][cond]["models"]:
            rows = [sd["merit"][cond]["models"][label] for sd in seeds]
            sp = [r["speedup"] for r in rows]
            gap = [r["accuracy_gap"] for r in rows]
            out[cond][label] = {"speedup_mean": statistics.fmean(sp), "speedup_min": min(sp),
                                "speedup_max": max(sp), "accuracy_gap_mean": statistics.fmean(gap),
                                "accuracy_gap_min": min(gap), "kept_mean": statistics.fmean(r["kept"] for r in rows),
                                "best_static_mean": statistics.fmean(r["best_static"] for r in rows),
                                "within_0.3_points": statistics.fmean(gap) >= -0.003}
    return out
