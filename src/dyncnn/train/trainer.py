"""A plain, readable training loop: SGD or AdamW, cosine schedule with warm-up, label smoothing, weight decay,
evaluation after every epoch, metrics to ``metrics.jsonl``, tqdm progress, atomic checkpoints and exact resume.

Determinism: the sample order of epoch ``e`` is a permutation drawn from ``seed + e`` alone, and the learning rate
is a function of the step, so a run resumed from a checkpoint (weights, optimizer, RNG state, step) continues
exactly where the uninterrupted run would have been. Under torchrun, every global batch of ``batch_size`` samples
is split into equal contiguous shards, one per process, so the gradient DDP averages is the gradient of the same
global batch that a single process would see.

Devices: ``TrainConfig.device`` ("auto": CUDA when available, "cpu", "cuda", "mps"); the model and every batch are
moved there, ``amp=True`` runs forward and loss under bf16 autocast, and batches are assembled by a DataLoader
with ``num_workers`` processes (the same batches, in the same order, for any worker count). Checkpoints are
written from CPU copies and load on any device.

Hooks that models may offer (a general mechanism, not special cases):
- ``model.set_progress(fraction)`` is called before every step with the fraction of training done (CondenseNet's
  condensing schedule, gate temperature schedules);
- ``model.regularization_loss()`` is added to the loss when present (group lasso, computation budget losses).
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from ..data.stored import StoredBatch
from ..dynamic.protocols import AuxLoss, OwnTrainingLoss, ProgressAware
from ..errors import DyncnnError
from ..files import output_lock
from .checkpoint import (atomic_write_text, load_checkpoint, remove_stale_temporaries, save_checkpoint,
                         sync_json_copies)
from .device import DEVICES, autocast, module_device, resolve_device
from .distributed import DistInfo, barrier, init_from_env
from .finetune import check_freeze, set_backbone_frozen

LossFn = Callable[[object, Tensor], Tensor]


@dataclass
class TrainConfig:
    epochs: int = 10
    batch_size: int = 64            # global batch (split across processes under torchrun)
    lr: float = 0.05
    optimizer: str = "sgd"          # "sgd" (momentum 0.9, nesterov) or "adamw"
    weight_decay: float = 5e-4
    label_smoothing: float = 0.0
    warmup_epochs: float = 0.0
    seed: int = 0
    eval_batch_size: int = 256
    num_workers: int = 0
    grad_clip: float | None = None
    find_unused_parameters: bool = False   # needed under DDP by networks that skip layers
    progress: bool = True
    save_every_steps: int | None = None    # also checkpoint mid-epoch every N steps
    device: str = "auto"                   # "auto" (cuda when available), "cpu", "cuda", "cuda:N", "mps"
    amp: bool = False                      # bf16 autocast for forward and loss
    channels_last: bool = False            # model and batches in torch.channels_last while training
    compile: bool = False                  # torch.compile the training forward (benchmarks/bench_training.py)
    freeze: str | None = None              # "backbone": train only exit heads and classifier (train/finetune.py)
    freeze_epochs: int | None = None       # with freeze: unfreeze after this many epochs (None: frozen throughout)

    def __post_init__(self):
        if self.epochs < 1 or self.batch_size < 1:
            raise ValueError(f"epochs and batch_size must be >= 1, got {self.epochs}, {self.batch_size}")
        if self.optimizer not in ("sgd", "adamw"):
            raise ValueError(f"optimizer must be 'sgd' or 'adamw', got {self.optimizer!r}")
        if self.lr <= 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if str(self.device).split(":", 1)[0] not in DEVICES:
            raise ValueError(f"device must be one of {', '.join(DEVICES)} (or cuda:N), got {self.device!r}")
        if self.num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {self.num_workers}")
        check_freeze(self.freeze, self.freeze_epochs)


def default_loss(label_smoothing: float = 0.0) -> LossFn:
    """Cross-entropy; a list of logits (a multi-exit network in training) gives the mean over exits."""
    def loss(outputs, target: Tensor) -> Tensor:
        if isinstance(outputs, (list, tuple)):
            return sum(F.cross_entropy(o, target, label_smoothing=label_smoothing) for o in outputs) / len(outputs)
        return F.cross_entropy(outputs, target, label_smoothing=label_smoothing)
    return loss


def final_logits(outputs) -> Tensor:
    """The logits to score: the last exit of a multi-exit output, the output itself otherwise."""
    return outputs[-1] if isinstance(outputs, (list, tuple)) else outputs


def stack_samples(items) -> tuple[Tensor, Tensor]:
    """Collate ``(image, label)`` samples into a batch of images and an int64 label vector. A batch that an
    in-memory dataset gathered at once (``data.stored.StoredBatch``, from its ``__getitems__``) is taken whole."""
    if isinstance(items, StoredBatch):
        return items.stacked()
    return torch.stack([it[0] for it in items]), torch.as_tensor([int(it[1]) for it in items])


@torch.no_grad()
def evaluate(model: nn.Module, dataset: Dataset, batch_size: int = 256, loss_fn: LossFn | None = None,
             num_workers: int = 0, device: torch.device | str | None = None) -> dict:
    """Loss and top-1 accuracy of ``model`` on ``dataset`` (eval mode restored afterwards), on ``device``
    (default: where the model's parameters are)."""
    if len(dataset) == 0:
        raise DyncnnError("cannot evaluate on an empty dataset")
    loss_fn = loss_fn or default_loss()
    was_training = model.training
    model.eval()
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    total_loss, correct, n = 0.0, 0, 0
    device = module_device(model) if device is None else torch.device(device)
    try:
        for x, y in DataLoader(dataset, batch_size=batch_size, num_workers=num_workers,
                               pin_memory=device.type == "cuda"):
            x, y = x.to(device, non_blocking=True), torch.as_tensor(y).to(device, non_blocking=True)
            out = model(x)
            total_loss += float(loss_fn(out, y)) * len(y)
            correct += int((final_logits(out).argmax(1) == y).sum())
            n += len(y)
    finally:
        model.train(was_training)
    return {"loss": total_loss / n, "acc": correct / n, "n": n}


def epoch_batches(n: int, batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    """The global batches of one epoch (last partial batch dropped), fixed by (seed, epoch)."""
    g = torch.Generator().manual_seed(seed * 100_003 + epoch)
    perm = torch.randperm(n, generator=g).tolist()
    return [perm[i:i + batch_size] for i in range(0, n - batch_size + 1, batch_size)]


def shard(batch: list[int], info: DistInfo) -> list[int]:
    per = len(batch) // info.world_size
    return batch[info.rank * per:(info.rank + 1) * per]


@dataclass
class TrainResult:
    history: list[dict] = field(default_factory=list)
    best_val_acc: float = float("nan")
    final_val_acc: float = float("nan")
    steps: int = 0
    seconds: float = 0.0


class Trainer:
    """Train ``model`` on ``train_set``, evaluating on ``val_set``, writing to ``out_dir``.

    ``extra`` is recorded in every checkpoint's metadata (the CLI stores the dataset configuration there).
    ``out_dir`` receives ``last.safetensors`` (+ ``.json``), ``best.safetensors`` and ``metrics.jsonl``.
    ``resume=True`` continues from ``out_dir/last.safetensors`` when it exists.
    """

    def __init__(self, model: nn.Module, train_set: Dataset, val_set: Dataset | None, config: TrainConfig,
                 out_dir: str | Path | None = None, loss_fn: LossFn | None = None,
                 callbacks: Sequence[Callable[[dict], None]] = (), extra: dict | None = None):
        if len(train_set) < config.batch_size:
            raise DyncnnError(f"the training set has {len(train_set)} samples, fewer than one batch of "
                              f"{config.batch_size}; lower batch_size")
        self.config = config
        self.device = resolve_device(config.device)
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        self.dist = init_from_env(self.device.type)
        if self.dist.enabled and config.freeze:
            raise DyncnnError("freeze='backbone' is not supported under torchrun (DistributedDataParallel fixes the "
                              "trainable parameters when it wraps the model); fine-tune in one process")
        if self.dist.enabled and config.batch_size % self.dist.world_size:
            raise DyncnnError(f"batch_size {config.batch_size} must be divisible by the number of processes "
                              f"({self.dist.world_size})")
        self.model = model.to(self.device)           # before the optimizer is built on its parameters
        self.train_set, self.val_set = train_set, val_set
        self.out_dir = Path(out_dir) if out_dir is not None else None
        self.loss_fn = loss_fn or default_loss(config.label_smoothing)
        self.callbacks = list(callbacks)
        self.extra = dict(extra or {})   # stored in every checkpoint (e.g. the data configuration)
        self.optimizer = self._make_optimizer()
        self.steps_per_epoch = len(train_set) // config.batch_size
        self.total_steps = self.steps_per_epoch * config.epochs
        self.step = 0

    def _make_optimizer(self) -> torch.optim.Optimizer:
        c = self.config
        decay, no_decay = [], []
        for p in self.model.parameters():
            if p.requires_grad:
                (no_decay if p.ndim <= 1 else decay).append(p)   # no decay on norms and biases (timm convention)
        groups = [{"params": decay, "weight_decay": c.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
        if c.optimizer == "sgd":
            return torch.optim.SGD(groups, lr=c.lr, momentum=0.9, nesterov=True)
        return torch.optim.AdamW(groups, lr=c.lr)

    def lr_at(self, step: int) -> float:
        c = self.config
        warmup = int(c.warmup_epochs * self.steps_per_epoch)
        if step < warmup:
            return c.lr * (step + 1) / warmup
        t = (step - warmup) / max(1, self.total_steps - warmup)
        return 0.5 * c.lr * (1 + math.cos(math.pi * t))

    # -- checkpoints ---------------------------------------------------------------------------------------
    def _state(self, epoch: int, history: list[dict]) -> dict:
        return {"step": self.step, "epoch": epoch, "history": history, "config": asdict(self.config)}

    def save(self, name: str, epoch: int, history: list[dict]) -> None:
        if self.out_dir is not None and self.dist.is_main:
            save_checkpoint(self.out_dir / f"{name}.safetensors", self.model, self.optimizer,
                            self._state(epoch, history), extra=self.extra)

    def _try_resume(self) -> list[dict]:
        path = self.out_dir / "last.safetensors" if self.out_dir else None
        if path is None or not path.exists():
            return []
        _, meta = load_checkpoint(path, self.model, self.optimizer, restore_rng=True)
        state = meta["train_state"]
        saved = state.get("config", {})
        for key in ("batch_size", "epochs", "seed", "lr", "optimizer"):
            if key in saved and saved[key] != getattr(self.config, key):
                how = (f"; to train longer, start a new run from its weights (--init {path} with a new --out), "
                       f"since the learning-rate schedule of this run ended at epoch {saved[key]}"
                       if key == "epochs" and getattr(self.config, key) > saved[key] else "")
                raise DyncnnError(f"cannot resume from {path}: it was trained with {key}={saved[key]!r}, "
                                  f"this run has {key}={getattr(self.config, key)!r}{how}")
        def comparable(v):     # where the data lies (root) may change; what it is may not
            return {k: x for k, x in v.items() if k != "root"} if isinstance(v, dict) else v
        for key, value in self.extra.items():   # e.g. the dataset: resuming on other data is another run
            if key in meta and comparable(meta[key]) != comparable(value):
                raise DyncnnError(f"cannot resume from {path}: it was trained with {key} {meta[key]}, this run "
                                  f"has {key} {value}")
        self.step = int(state["step"])
        return list(state.get("history", []))

    # -- the loop ------------------------------------------------------------------------------------------
    def fit(self, resume: bool = False) -> TrainResult:
        """Train (``resume``: from ``out_dir/last.safetensors`` when it exists), holding the lock of ``out_dir``:
        a second run into the same folder meanwhile gets a LockedError naming this process."""
        if self.out_dir is None or not self.dist.is_main:
            return self._fit(resume)
        with output_lock(self.out_dir, "training folder"):
            return self._fit(resume)

    def _fit(self, resume: bool) -> TrainResult:
        c = self.config
        if self.out_dir is not None and self.dist.is_main:
            # what a killed write left: orphan temporaries, a JSON copy one step behind its checkpoint
            remove_stale_temporaries(self.out_dir)
            if self.out_dir.is_dir():
                sync_json_copies(self.out_dir)
        torch.manual_seed(c.seed)
        history = self._try_resume() if resume else []
        model = self.model
        if self.dist.enabled:
            model = nn.parallel.DistributedDataParallel(
                self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None,
                find_unused_parameters=c.find_unused_parameters)
        if c.channels_last:   # NHWC convolutions (oneDNN on a CPU); the model is handed back in the default format
            self.model.to(memory_format=torch.channels_last)
        if c.compile:      # the training forward only; evaluation and checkpoints use the plain module
            model = torch.compile(model)
        metrics_path = self.out_dir / "metrics.jsonl" if self.out_dir else None
        if metrics_path is not None and self.dist.is_main:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            # Keep exactly the epochs recorded by the checkpoint we resume from.
            atomic_write_text(metrics_path, "".join(json.dumps(h) + "\n" for h in history))
        start = time.perf_counter()
        best = max((h.get("val_acc", float("-inf")) for h in history), default=float("-inf"))
        first_epoch = self.step // self.steps_per_epoch
        if resume and history and first_epoch >= c.epochs and self.dist.is_main:
            done = f"{c.epochs} epoch{'s' * (c.epochs != 1)} ({self.step} steps)"
            print(f"{self.out_dir / 'last.safetensors'} finished its {done}: nothing to resume (to train longer, "
                  f"start a new run in another --out, e.g. with --init)")
        # The hooks the model offers, checked once per run instead of every step (a structural isinstance walks the
        # protocol's members: ~25 us for the three, per step, on a 5 ms step of the smallest frontier network).
        progress_aware, own_loss, aux_loss = (isinstance(self.model, p)
                                              for p in (ProgressAware, OwnTrainingLoss, AuxLoss))
        for epoch in range(first_epoch, c.epochs):
            batches = epoch_batches(len(self.train_set), c.batch_size, c.seed, epoch)
            skip = self.step - epoch * self.steps_per_epoch
            model.train()
            if c.freeze:         # a function of the epoch alone, so a resumed run freezes exactly the same
                set_backbone_frozen(self.model, c.freeze_epochs is None or epoch < c.freeze_epochs)
            loss_sum, correct, seen = 0.0, 0, 0
            # A live bar on a terminal (tqdm turns itself off when stderr is not one), one line per epoch always.
            bar = tqdm(self._loader([shard(b, self.dist) for b in batches[skip:]], epoch), total=len(batches) - skip,
                       desc=f"epoch {epoch + 1}/{c.epochs}", leave=False,
                       disable=None if (c.progress and self.dist.is_main) else True)
            for x, y in bar:
                x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
                if c.channels_last and x.ndim == 4:
                    x = x.contiguous(memory_format=torch.channels_last)
                if progress_aware:
                    self.model.set_progress(self.step / self.total_steps)
                lr = self.lr_at(self.step)
                for g in self.optimizer.param_groups:
                    g["lr"] = lr
                with autocast(self.device, c.amp):
                    out = model(x)
                    # A model with its own training objective (e.g. a REINFORCE policy that needs the targets for
                    # its reward) provides ``training_loss(outputs, target)``; validation still uses ``loss_fn``.
                    loss = self.model.training_loss(out, y) if own_loss else self.loss_fn(out, y)
                    if aux_loss:
                        loss = loss + self.model.regularization_loss()
                if not torch.isfinite(loss):
                    raise DyncnnError(f"loss became {float(loss)} at step {self.step}; lower the learning rate "
                                      f"(lr={c.lr}) or check the data for NaN/Inf")
                self.optimizer.zero_grad(set_to_none=True)
                loss.backward()
                if c.grad_clip:
                    nn.utils.clip_grad_norm_(self.model.parameters(), c.grad_clip)
                self.optimizer.step()
                self.step += 1
                loss_sum += float(loss.detach()) * len(y)
                correct += int((final_logits(out).argmax(1) == y).sum())
                seen += len(y)
                bar.set_postfix(loss=f"{loss_sum / seen:.3f}", lr=f"{lr:.3g}", refresh=False)
                if c.save_every_steps and self.step % c.save_every_steps == 0 and \
                        self.step % self.steps_per_epoch:
                    self.save("last", epoch, history)
            record = {"epoch": epoch + 1, "step": self.step, "lr": self.lr_at(self.step - 1),
                      "train_loss": loss_sum / max(seen, 1), "train_acc": correct / max(seen, 1)}
            if self.val_set is not None and self.dist.is_main:
                ev = evaluate(self.model, self.val_set, c.eval_batch_size, self.loss_fn, c.num_workers)
                record.update(val_loss=ev["loss"], val_acc=ev["acc"])
            record["seconds"] = time.perf_counter() - start
            history.append(record)
            if self.dist.is_main:
                if metrics_path is not None:
                    with open(metrics_path, "a") as f:
                        f.write(json.dumps(record) + "\n")
                if record.get("val_acc", float("-inf")) > best:
                    best = record["val_acc"]
                    self.save("best", epoch + 1, history)
                self.save("last", epoch + 1, history)
                if c.progress:
                    tqdm.write(self.format_record(record))
                for cb in self.callbacks:
                    cb(record)
            barrier(self.dist)
        if c.channels_last:
            self.model.to(memory_format=torch.contiguous_format)
        if c.freeze:             # the model leaves with every parameter trainable again
            set_backbone_frozen(self.model, False)
        last = history[-1] if history else {}
        return TrainResult(history=history, best_val_acc=best, final_val_acc=last.get("val_acc", float("nan")),
                           steps=self.step, seconds=time.perf_counter() - start)

    def format_record(self, r: dict) -> str:
        val = f"  val loss {r['val_loss']:.4f}  val acc {r['val_acc']:.4f}" if "val_acc" in r else ""
        return (f"epoch {r['epoch']:>3}/{self.config.epochs}  train loss {r['train_loss']:.4f}  "
                f"train acc {r['train_acc']:.4f}{val}  lr {r['lr']:.3g}  {r['seconds']:.0f}s")

    def _loader(self, batches: list[list[int]], epoch: int) -> DataLoader:
        """The given batches of sample indices, in order, assembled by ``num_workers`` worker processes. The
        loader's own generator (workers' seeds) is fixed by (seed, epoch) and leaves the global RNG alone, so that
        a resumed run draws the same random numbers as the uninterrupted one."""
        gen = torch.Generator().manual_seed(self.config.seed * 100_003 + epoch)
        return DataLoader(self.train_set, batch_sampler=batches, collate_fn=stack_samples, generator=gen,
                          num_workers=self.config.num_workers, pin_memory=self.device.type == "cuda")
