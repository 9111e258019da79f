"""``dyncnn frontier``: dynamic networks against the static accuracy-latency front."""
from __future__ import annotations

import argparse
from pathlib import Path


def add_parser(sub) -> None:
    p = sub.add_parser("frontier", help="dynamic networks against the static accuracy-latency front (ONNX Runtime)",
                       description="Train a static front (zoo networks at several widths and input resolutions) "
                                   "and dynamic candidates with one training budget, choose each dynamic operating "
                                   "point on the validation split, time everything in ONNX Runtime (interleaved "
                                   "rounds, median and IQR) and write frontier.json / .md / .png with the speedup "
                                   "at equal accuracy.")
    p.add_argument("--preset", default="demo", choices=["demo", "full", "phone", "headline"],
                   help="model set: demo (4 static, 2 cascades), full (8 static, 12 dynamic), phone (128x128 "
                        "canvas, 1-73M MAC networks), headline (128x128: phone's 6 static networks of up to 20M "
                        "MACs, the cascade search, its members fused into one network, the multi-stage network); "
                        "each includes a cascade whose members are searched on validation (full, phone and "
                        "headline also fuse them)")
    p.add_argument("--dataset", default="scaled_mnist", choices=["scaled_mnist", "cifar10", "cifar100", "folder"],
                   help="data: the embedded digits, or yours (3 channels): cifar10 | cifar100 | folder (an "
                        "ImageFolder tree) under --data-root")
    p.add_argument("--data-root", default=None, help="folder of cifar10/cifar100/folder data (never downloaded)")
    p.add_argument("--canvas", type=int, default=None, help="image side (default: 64, 128 for --preset phone, 32 "
                   "for CIFAR; a folder's images are resized and cropped to it)")
    p.add_argument("--clutter", type=int, default=2, help="clutter fragments per image")
    p.add_argument("--seed", type=int, default=0, help="data split and rendering seed")
    p.add_argument("--seeds", type=int, nargs="+", default=[0], help="training seeds (every model trained with each)")
    p.add_argument("--epochs", type=int, default=5, help="epochs for every model")
    p.add_argument("--lr", type=float, default=0.1, help="peak learning rate (cosine schedule) for every model")
    p.add_argument("--test-repeats", type=int, default=3, help="renderings of each test digit")
    p.add_argument("--device", default="cpu", help="training device: cpu, cuda, mps or auto (timing is on the CPU)")
    p.add_argument("--runtime", choices=["onnxruntime", "executorch"], default="onnxruntime",
                   help="runtime the bundles are timed in (executorch: XNNPACK, needs dyncnn[mobile])")
    p.add_argument("--threads", type=_threads, nargs="+", default=None,
                   help="runtime thread counts timed, and per-stage: each stage with the count measured fastest "
                        "for it (default: 1 2 per-stage; with --runtime executorch: 1 2)")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 64], help="batch sizes timed")
    p.add_argument("--rounds", type=int, default=7, help="interleaved timing rounds (median and IQR over them)")
    p.add_argument("--single-images", type=int, default=200, help="test images timed one at a time per round")
    p.add_argument("--batch-images", type=int, default=640, help="test images timed in batches per round")
    p.add_argument("--no-eager", action="store_true", help="skip the eager PyTorch timings")
    p.add_argument("--selection-z", type=float, default=None,
                   help="operating points reach the best static model's validation accuracy when their paired "
                        "lower bound (accuracy difference less this many standard errors) is >= 0; 0: the point "
                        "rule (default: 1)")
    p.add_argument("--cascade-last", choices=["reference", "any"], default="reference",
                   help="the searched cascades end with the best static model on validation (reference), or with "
                        "any model (any)")
    p.add_argument("--exclude", nargs="+", default=(), metavar="LABEL",
                   help="leave out these dynamic models of the preset (their labels, as the report prints them)")
    p.add_argument("--distill-from", default=None, metavar="LABEL",
                   help="train this static model first and every other static network from its logits too "
                        "(knowledge distillation; e.g. mnv3-small in --preset headline)")
    p.add_argument("--distill-weight", type=float, default=0.5,
                   help="weight of the distillation term (the labels' cross-entropy gets 1 - weight)")
    p.add_argument("--distill-temperature", type=float, default=4.0, help="distillation temperature")
    p.add_argument("--only-train", action="store_true", help="train (or resume) every model and stop")
    p.add_argument("--merge", nargs="+", default=None, metavar="RUN_DIR",
                   help="instead of running: one report from finished runs of other seeds (same settings)")
    p.add_argument("--out", default="runs/frontier", help="output folder (checkpoints are reused from it)")
    p.set_defaults(func=run)


def _threads(value: str) -> int | str:
    if value == "per-stage":
        return value
    try:
        return int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a thread count or per-stage, got {value!r}") from None


def run(args) -> int:
    from ..frontier.runner import FrontierSettings, merge_runs, run_frontier
    if args.merge:
        merge_runs(args.merge, args.out)
        print((Path(args.out) / "frontier.md").read_text().split("\n## ")[0])
        return 0
    canvas = args.canvas or (32 if args.dataset.startswith("cifar") else
                             128 if args.preset in ("phone", "headline") else 64)
    settings = FrontierSettings(out=Path(args.out), preset=args.preset, canvas=canvas, clutter=args.clutter,
                                data_seed=args.seed, seeds=tuple(args.seeds), epochs=args.epochs,
                                threads=args.threads and tuple(args.threads), batch_sizes=tuple(args.batch_sizes),
                                rounds=args.rounds, single_images=args.single_images,
                                batch_images=args.batch_images, eager=not args.no_eager,
                                device=args.device, only_train=args.only_train, lr=args.lr,
                                exclude=tuple(args.exclude), test_repeats=args.test_repeats, runtime=args.runtime,
                                dataset=args.dataset,
                                data_root=args.data_root, cascade_last=args.cascade_last,
                                distill_from=args.distill_from, distill_weight=args.distill_weight,
                                distill_temperature=args.distill_temperature,
                                **({} if args.selection_z is None else {"selection_z": args.selection_z}))
    run_frontier(settings)
    return 0
