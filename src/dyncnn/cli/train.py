"""``dyncnn train``: train a model on a dataset, with checkpoints and ``--resume``."""
from __future__ import annotations

from pathlib import Path

from ..errors import DyncnnError
from .common import _add_data_args, _cli_data_cfg, _create_model, _dataset, _parse_cfg, _writable_folder


def add_parser(sub) -> None:
    p = sub.add_parser("train", help="train a model on a dataset, with checkpoints and --resume",
                       description="Train MODEL on DATASET; writes last/best checkpoints (safetensors + JSON) and "
                                   "metrics.jsonl to --out. Under torchrun, trains with DistributedDataParallel.")
    p.add_argument("--model", required=True, help="registered name (see `dyncnn zoo`), torchvision:NAME or timm:NAME")
    _add_data_args(p)
    p.add_argument("--epochs", type=int, default=10, help="passes over the training split")
    p.add_argument("--batch-size", type=int, default=64, help="global batch size (split across torchrun processes)")
    p.add_argument("--lr", type=float, default=0.05, help="peak learning rate of the cosine schedule")
    p.add_argument("--optimizer", choices=["sgd", "adamw"], default="sgd", help="sgd: momentum 0.9, Nesterov")
    p.add_argument("--weight-decay", type=float, default=5e-4, help="weight decay (not on norms and biases)")
    p.add_argument("--label-smoothing", type=float, default=0.0, help="cross-entropy label smoothing")
    p.add_argument("--warmup-epochs", type=float, default=0.0, help="linear learning-rate warm-up, in epochs")
    p.add_argument("--cfg", nargs="*", metavar="KEY=VALUE", help="model keyword arguments (in_chans and frames "
                   "default to the dataset's; num_classes is the dataset's)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--resume", action="store_true", help="continue from OUT/last.safetensors if present")
    p.add_argument("--overwrite", action="store_true", help="replace the training run already in --out (its "
                   "checkpoints and metrics); without it, an existing run is refused unless --resume is given")
    p.add_argument("--find-unused-parameters", action="store_true",
                   help="under torchrun: for networks that skip layers, experts or paths (DistributedDataParallel)")
    p.add_argument("--device", default="auto", help="auto (CUDA when available, else CPU), cpu, cuda, cuda:N or "
                   "mps; under torchrun, cuda gives each process the GPU of its local rank (NCCL)")
    p.add_argument("--amp", action="store_true", help="bf16 autocast for forward and loss (mixed precision)")
    p.add_argument("--workers", type=int, default=0, help="DataLoader worker processes that assemble batches")
    p.add_argument("--init", default=None, metavar="CHECKPOINT", help="start from the weights of a trained "
                   "checkpoint: the same model, or the static backbone of a dynamic one (e.g. SkipNet from ResNet); "
                   "or from a torchvision / timm state dict file (.pth, .safetensors; the stem is adapted to the "
                   "data's channels, a classifier of other classes is dropped, for exits the backbone's file)")
    p.add_argument("--freeze", choices=["backbone"], default=None, help="train only the exit heads and the "
                   "classifier, the backbone frozen (its norms in eval mode), for --freeze-epochs epochs")
    p.add_argument("--freeze-epochs", type=int, default=None, help="with --freeze: unfreeze after this many "
                   "epochs and train everything (default: frozen for the whole run)")
    p.set_defaults(func=run)


def run(args) -> int:
    import torch

    from ..train import TrainConfig
    _check_train_out(args)
    train_set, val_set = _dataset(args, "train"), _dataset(args, "val")
    defaults = {"in_chans": train_set.in_chans}   # --cfg may override these; num_classes is the dataset's
    # (torchvision / timm models take in_chans too: their stem is adapted)
    if hasattr(train_set, "frames") and not args.model.startswith(("torchvision:", "timm:")):
        defaults["frames"] = train_set.frames       # clips: the temporal models are built for T frames
    torch.manual_seed(args.seed)         # the initial weights are part of what --seed fixes
    model = _create_model(args.model, _parse_cfg(args.cfg), defaults=defaults,
                          fixed={"num_classes": (train_set.num_classes, f"--dataset {args.dataset}")})
    if args.init:
        from ..train.checkpoint import init_from_checkpoint
        part = init_from_checkpoint(model, args.init)
        print(f"initialised {part} from {args.init}")
    config = TrainConfig(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, optimizer=args.optimizer,
                         weight_decay=args.weight_decay, label_smoothing=args.label_smoothing, seed=args.seed,
                         warmup_epochs=args.warmup_epochs, find_unused_parameters=args.find_unused_parameters,
                         device=args.device, amp=args.amp, num_workers=args.workers, freeze=args.freeze,
                         freeze_epochs=args.freeze_epochs)
    data_cfg = _cli_data_cfg(args)
    extra = {"data": {**data_cfg, "input_size": train_set.input_size}}
    # One Trainer run, or the family's recipe (e.g. glance-and-focus: encoders, then the policy, then fine-tuning,
    # each stage in a subfolder of --out; the last stage's checkpoint is the model's).
    from ..train.recipes import fit_model
    result = fit_model(model, train_set, val_set, config, out_dir=args.out, resume=args.resume, extra=extra)
    from ..train.distributed import is_main_process
    if not is_main_process():       # under torchrun: the other processes have no validation figures to report
        return 0
    print(f"trained {args.model} for {result.steps} steps in {result.seconds:.1f}s: "
          f"final val acc {result.final_val_acc:.4f}, best {result.best_val_acc:.4f}; checkpoints in {args.out}")
    return 0


RUN_FILES = ("last.safetensors", "last.json", "best.safetensors", "best.json", "metrics.jsonl")


def _existing_run(out: Path) -> list[str]:
    """The files of an earlier training run in ``out`` (or in its stage subfolders, for multi-stage models)."""
    if not out.is_dir():
        return []
    found = [f for f in RUN_FILES if (out / f).exists()]
    found += [f"{d.name}/{f}" for d in sorted(out.iterdir()) if d.is_dir() for f in RUN_FILES if (d / f).exists()]
    return found


def _check_train_out(args) -> None:
    """Refuse to train into a folder that holds another run unless told what to do with it; with
    ``--overwrite``, remove that run's files first (nothing else in the folder is touched)."""
    out = _writable_folder(Path(args.out))
    if not out.is_dir():            # nothing to check (a run starting meanwhile is refused by the Trainer's lock)
        return
    from ..files import output_lock
    with output_lock(out, "training folder"):     # a run still writing here is refused, its files never removed
        found = _existing_run(out)
        if not found or args.resume:
            return
        if not args.overwrite:
            raise DyncnnError(f"--out {out} already holds a training run ({', '.join(found[:4])}); pass --resume "
                              f"to continue it, --init {out / 'last.safetensors'} with a new --out to start a new "
                              f"run from its weights, or --overwrite to replace it")
        for f in found:
            (out / f).unlink(missing_ok=True)
