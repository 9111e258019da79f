"""GFNet (glance and focus) against the static backbone on the full image, on large-canvas ScaledMNIST.

Trains (single-threaded) a static ``tiny_mobilenet`` on the whole 128x128 image and ``gfnet_tiny_mnist`` (64x64
glance + 40x40 full-resolution patches, 3 steps, same backbone, three stages; stage II starts with a supervised
warm-start of the policy on the digits' known positions, then PPO), each training digit rendered twice. Both
GFNet encoders start from the trained static backbone (the paper starts from ImageNet-pretrained ones); a second
static net trains as many epochs as GFNet's encoders get in all (init + stages I and III): the fair baseline,
whose accuracy the budget point aims at. Then:

1. anytime table: accuracy of every GFNet step on the test split with its cumulative MACs;
2. the budget point that matches the static accuracy (thresholds solved on the validation split for the
   static network's validation accuracy, the MSDNet protocol), applied with real early exit (``GFNet.infer``)
   on the test split: accuracy and executed mean MACs against the static network's;
3. wall-clock at batch 1 with ONNX Runtime (1 thread): the static graph vs the GFNet bundle's host driver
   (one graph call per step, crops inside the graphs), median over interleaved repeats of the mean time per test
   image, as a ratio, beside the MAC ratio on the same images; then each graph's time and node count beside the
   bare backbone at the glance and patch sizes.

    python benchmarks/bench_gfnet.py            # ~12 min of training on a quiet core (static 8 epochs, static
                                                # 15 epochs, GFNet 2 + 10 + 1 + 5), then the tables
    python benchmarks/bench_gfnet.py --no-long-static   # skip the 15-epoch static (the fair, stronger baseline)
    python benchmarks/bench_gfnet.py --resume   # reuse the checkpoints in --out
    python benchmarks/bench_gfnet.py --quick    # a smoke run (one epoch each, few images)

Timings on a loaded machine are noisy: read the ratios, not the absolute times.
"""
from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Subset

from dyncnn.data.canvas import large_canvas_mnist
from dyncnn.train.recipes import fit_model
from dyncnn.dynamic.budget import collect_exit_logits, dynamic_evaluate, exit_scores, solve_for_budget
from dyncnn.dynamic.policy import ExitPolicy
from dyncnn.export.glance import export_glance_bundle, load_glance_bundle
from dyncnn.export.onnx import export_onnx, onnx_session
from dyncnn.models import create_model
from dyncnn.profile.macs import count_macs
from dyncnn.train import TrainConfig, Trainer, evaluate
from dyncnn.profile.latency import retain_freed_memory


def timed_per_image(fn, images: np.ndarray, repeats: int) -> float:
    """Median over ``repeats`` of the mean seconds per image of ``fn`` called on each image (batch 1)."""
    for i in range(min(20, len(images))):
        fn(images[i:i + 1])
    runs = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for i in range(len(images)):
            fn(images[i:i + 1])
        runs.append((time.perf_counter() - t0) / len(images))
    return statistics.median(runs)


def timed_pair(fn_a, fn_b, images: np.ndarray, repeats: int) -> tuple[float, float]:
    """``timed_per_image`` of two functions with their repeats interleaved (a, b, a, b, ...), so that a change in
    the machine's load hits both alike: the ratio is what to read."""
    a, b = [], []
    for _ in range(repeats):
        a.append(timed_per_image(fn_a, images, 1))
        b.append(timed_per_image(fn_b, images, 1))
    return statistics.median(a), statistics.median(b)


def graph_breakdown(static, gf, bundle, out: Path, image: np.ndarray, repeats: int) -> None:
    """Per-graph batch-1 time and ONNX node count: the static net at 128x128 and at the glance / patch sizes (the
    bare backbone: what a step could cost at best), and the bundle's three graphs. At these sizes a graph's time
    is mostly per-node overhead, not MACs: the ceiling this puts on wall / MAC."""
    import onnx
    rows = []
    for side in (128, gf.cfg.glance_size, gf.cfg.patch_size):
        path = out / f"static_{side}.onnx"
        x = torch.rand(1, 1, side, side)
        export_onnx(static, x, path)
        sess = onnx_session(path, threads=1)
        feed = {"input": x.numpy()}
        rows.append((f"static backbone {side}x{side}", path, count_macs(static, x).total,
                     lambda s=sess, f=feed: s.run(None, f)))
    st = bundle._step(0, image, {})
    feeds = {"image": image, "h_in": st["h"], "hp_in": st["hp"], "feat_in": st["feat"], "where_in": st["where"]}
    glance_feed = {"image": image, "h_in": np.zeros_like(st["h"])}
    step = bundle.manifest["step_macs"]
    for name, feed, macs in (("glance", glance_feed, step[0]), ("focus", feeds, step[1]),
                             ("focus_last", feeds, step[-1])):
        sess = bundle.sessions[name]
        rows.append((f"GFNet {name}.onnx", bundle.folder / f"{name}.onnx", macs,
                     lambda s=sess, f=feed: s.run(None, f)))
    print("\n## Per graph, batch 1, ONNX Runtime, 1 thread\n")
    print("| graph | ONNX nodes | MACs | us / call |\n|---|---|---|---|")
    for name, path, macs, fn in rows:
        t = timed_per_image(lambda _: fn(), np.zeros((200, 1)), repeats)
        print(f"| {name} | {len(onnx.load(str(path)).graph.node)} | {macs / 1e6:.3f}M | {t * 1e6:.1f} |")


def imagenet_scale_latency(out: Path, images: int, repeats: int) -> None:
    """Batch-1 ONNX Runtime time of ``gfnet_mobilenet_v3_large`` (random weights, 224x224, 96x96 glance and
    patches) stopping after each step, against the static ``mobilenet_v3_large`` on 224x224: how much of a MAC
    saving the staged driver turns into wall-clock when the steps are large enough to hide per-call overheads."""
    torch.manual_seed(0)
    gf = create_model("gfnet_mobilenet_v3_large", num_classes=1000).eval()
    static = create_model("mobilenet_v3_large", num_classes=1000).eval()
    x = torch.rand(images, 3, 224, 224)
    static_macs = count_macs(static, x[:1]).total
    export_onnx(static, x[:1], out / "mnv3_static.onnx")
    sess = onnx_session(out / "mnv3_static.onnx", threads=1)
    export_glance_bundle(gf, out / "mnv3_gfnet_bundle")
    bundle = load_glance_bundle(out / "mnv3_gfnet_bundle", threads=1)
    xs = x.numpy()
    t_static = timed_per_image(lambda im: sess.run(None, {"input": im}), xs, repeats)
    print(f"\n## ImageNet scale, batch 1, ONNX Runtime, 1 thread (random weights, {images} images, median of "
          f"{repeats})\n")
    print("| model / stop after | MACs | ms / image | MAC speedup | wall-clock speedup | wall / MAC |")
    print("|---|---|---|---|---|---|")
    print(f"| mobilenet_v3_large 224x224 | {static_macs / 1e6:.1f}M | {t_static * 1e3:.2f} | 1.00 | 1.00 | - |")
    k_exits = gf.num_exits
    for k in range(k_exits):
        policy = [float("inf")] * k + [float("-inf")] * (k_exits - 1 - k)
        macs = float(bundle.exit_macs[k])
        t_static, t = timed_pair(lambda im: sess.run(None, {"input": im}), lambda im: bundle.run_numpy(im, policy),
                                 xs, repeats)
        print(f"| GFNet step {k + 1} ({'glance' if k == 0 else 'focus'}) | {macs / 1e6:.1f}M | {t * 1e3:.2f} | "
              f"{static_macs / macs:.2f} | {t_static / t:.2f} | {t_static / t / (static_macs / macs):.2f} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="one epoch per stage, few images: a smoke run")
    ap.add_argument("--out", default="runs/bench_gfnet", help="checkpoints and bundles (default: %(default)s)")
    ap.add_argument("--resume", action="store_true", help="reuse finished checkpoints in --out")
    ap.add_argument("--static-epochs", type=int, default=8, help="static net (GFNet's encoders start from it)")
    ap.add_argument("--epochs", type=int, default=2, help="GFNet stage I epochs")
    ap.add_argument("--locate-epochs", type=int, default=10, help="stage II supervised policy warm-start epochs")
    ap.add_argument("--ppo-epochs", type=int, default=1, help="stage II PPO epochs")
    ap.add_argument("--finetune-epochs", type=int, default=5, help="stage III epochs")
    ap.add_argument("--no-long-static", action="store_true",
                    help="skip the static net trained as many epochs as GFNet's encoders in all (fair baseline)")
    ap.add_argument("--train-repeats", type=int, default=2, help="renderings of each training digit")
    ap.add_argument("--latency-images", type=int, default=300)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--imagenet-only", action="store_true", help="only the ImageNet-scale latency table")
    ap.add_argument("--no-imagenet", action="store_true", help="skip the ImageNet-scale latency table")
    args = ap.parse_args()
    torch.set_num_threads(1)
    torch.set_flush_denormal(True)
    retain_freed_memory()      # large activations reused, not page-faulted in again per call
    if args.quick:
        args.static_epochs, args.epochs, args.latency_images, args.repeats = 1, 1, 40, 2
        args.locate_epochs, args.ppo_epochs, args.finetune_epochs = 1, 1, 1
    out = Path(args.out)
    if args.imagenet_only:
        imagenet_scale_latency(out, 10 if args.quick else 30, args.repeats)
        return
    train = large_canvas_mnist("train", repeats=1 if args.quick else args.train_repeats)
    val, test = large_canvas_mnist("val"), large_canvas_mnist("test")
    if args.quick:
        train, val, test = Subset(train, range(256)), Subset(val, range(128)), Subset(test, range(128))
        for s in (train, val, test):
            s.num_classes, s.in_chans = 10, 1

    t0 = time.perf_counter()
    static = create_model("tiny_mobilenet", num_classes=10, in_chans=1, widths=[16, 32, 64, 128])
    cfg = TrainConfig(device="cpu", epochs=args.static_epochs, batch_size=32, lr=3e-3, optimizer="adamw",
                      weight_decay=1e-4, progress=False)
    Trainer(static, train, val, cfg, out / "static").fit(resume=args.resume)
    t_static = time.perf_counter() - t0
    long_epochs = args.static_epochs + args.epochs + args.finetune_epochs
    static_long = None
    if not args.no_long_static:     # the fair baseline: as many epochs as GFNet's encoders get in all
        static_long = create_model("tiny_mobilenet", num_classes=10, in_chans=1, widths=[16, 32, 64, 128])
        Trainer(static_long, train, val, replace(cfg, epochs=long_epochs), out / "static_long").fit(resume=args.resume)
        static_long.eval()
    t_long = time.perf_counter() - t0 - t_static
    gf = create_model("gfnet_tiny_mnist", num_classes=10, in_chans=1)
    cfg = TrainConfig(device="cpu", epochs=args.epochs, batch_size=32, lr=3e-3, optimizer="adamw", weight_decay=1e-4,
                      progress=False)
    gf.init_encoders_from(static)       # GFNet starts from the pretrained backbone (ImageNet in the paper)
    fit_model(gf, train, val, cfg, out / "gfnet", resume=args.resume,
              extra={"gfnet": {"locate_epochs": args.locate_epochs, "ppo_epochs": args.ppo_epochs,
                               "finetune_epochs": args.finetune_epochs, "finetune_lr_scale": 0.3}})
    t_gf = time.perf_counter() - t0 - t_static - t_long
    gf.eval()
    static.eval()

    x1 = test[0][0].unsqueeze(0)
    static_macs = count_macs(static, x1).total
    static_val, static_test = evaluate(static, val)["acc"], evaluate(static, test)["acc"]
    cum = gf.exit_macs(x1)
    val_logits, val_y = collect_exit_logits(gf, val)
    test_logits, test_y = collect_exit_logits(gf, test)
    print(f"training (1 thread): static {t_static:.0f}s, long static {t_long:.0f}s, GFNet three stages {t_gf:.0f}s\n")
    if static_long is not None:
        long_val, long_test = evaluate(static_long, val)["acc"], evaluate(static_long, test)["acc"]
    print("## Anytime: every GFNet step on the test split\n")
    print("| step | input | cumulative MACs | accuracy |\n|---|---|---|---|")
    for k, m in enumerate(cum):
        side, p = gf.cfg.glance_size, gf.cfg.patch_size
        what = f"glance {side}x{side} of 128x128" if k == 0 else f"focus {p}x{p} patch"
        acc = float((test_logits[k].argmax(-1) == test_y).double().mean())
        print(f"| {k + 1} | {what} | {m / 1e6:.3f}M | {acc:.4f} |")
    print(f"| static ({args.static_epochs} epochs: GFNet's init) | tiny_mobilenet on 128x128 | "
          f"{static_macs / 1e6:.3f}M | {static_test:.4f} |")
    if static_long is not None:
        print(f"| static ({long_epochs} epochs: as GFNet's encoders) | tiny_mobilenet on 128x128 | "
              f"{static_macs / 1e6:.3f}M | {long_test:.4f} |")
    print()

    vs, ts = exit_scores(val_logits), exit_scores(test_logits)
    vc, tc = val_logits.argmax(-1) == val_y, test_logits.argmax(-1) == test_y
    print("## Budgeted sweep (MSDNet protocol, test split, every 4th point)\n")
    print("| q | accuracy | mean MACs | exits per step |\n|---|---|---|---|")
    for p in dynamic_evaluate(vs, ts, tc, cum)[::4]:
        print(f"| {p.q:.2f} | {p.accuracy:.4f} | {p.mean_macs / 1e6:.3f}M | "
              f"{' / '.join(f'{f:.2f}' for f in p.exit_fractions)} |")
    try:
        target = long_val if static_long is not None else static_val     # the stronger (fair) static baseline
        point = solve_for_budget(vs, vc, cum, target_accuracy=target)
        policy, note = point.policy(), f"thresholds for the static val accuracy {target:.4f}"
    except ValueError as e:
        policy, note = ExitPolicy.never(gf.num_exits), f"full depth: {e}"
    correct, macs, exits = 0, [], []
    for x, y in DataLoader(test, batch_size=256):
        r = gf.infer(x, policy)
        correct += int((r.logits.argmax(1) == y).sum())
        macs.append(r.macs)
        exits.append(r.exit_index)
    macs, exits = torch.cat(macs).double(), torch.cat(exits)
    gf_acc, gf_macs = correct / len(macs), float(macs.mean())
    print(f"\n## At the static accuracy ({note})\n")
    print("| model | test accuracy | mean MACs (executed) | MACs vs static |\n|---|---|---|---|")
    print(f"| static tiny_mobilenet, 128x128, {args.static_epochs} epochs | {static_test:.4f} | "
          f"{static_macs / 1e6:.3f}M | 1.00 |")
    if static_long is not None:
        print(f"| static tiny_mobilenet, 128x128, {long_epochs} epochs | {long_test:.4f} | "
              f"{static_macs / 1e6:.3f}M | 1.00 |")
    print(f"| gfnet_tiny_mnist, early exit | {gf_acc:.4f} | {gf_macs / 1e6:.3f}M | {gf_macs / static_macs:.2f} |")
    print(f"\nexit histogram over steps: {torch.bincount(exits, minlength=gf.num_exits).tolist()}")

    # wall-clock at batch 1, ONNX Runtime, one thread
    n_lat = min(args.latency_images, len(test))
    images = torch.stack([test[i][0] for i in range(n_lat)]).numpy()
    export_onnx(static, x1, out / "static.onnx")
    sess = onnx_session(out / "static.onnx", threads=1)
    export_glance_bundle(gf, out / "gfnet_bundle", policy=policy, check_inputs=[torch.from_numpy(images[:32])])
    bundle = load_glance_bundle(out / "gfnet_bundle", threads=1)
    lat_macs = float(bundle.run_numpy(images, policy)[2].mean())
    t_static_img, t_gf_img = timed_pair(lambda im: sess.run(None, {"input": im}),
                                        lambda im: bundle.run_numpy(im, policy), images, args.repeats)
    mac_speedup, wall_speedup = static_macs / lat_macs, t_static_img / t_gf_img
    print(f"\n## Batch 1, ONNX Runtime, 1 thread, {n_lat} test images, median of {args.repeats} repeats\n")
    print("| model | ms / image | mean MACs | MAC speedup | wall-clock speedup | wall / MAC |")
    print("|---|---|---|---|---|---|")
    print(f"| static | {t_static_img * 1e3:.3f} | {static_macs / 1e6:.3f}M | 1.00 | 1.00 | - |")
    print(f"| GFNet driver | {t_gf_img * 1e3:.3f} | {lat_macs / 1e6:.3f}M | {mac_speedup:.2f} | {wall_speedup:.2f} | "
          f"{wall_speedup / mac_speedup:.2f} |")
    graph_breakdown(static, gf, bundle, out, images[:1], args.repeats)
    try:
        from dyncnn.viz.glance_plots import plot_glance_patches
        path = plot_glance_patches(gf, torch.from_numpy(images[:6]), out / "glance_patches.png", policy=policy)
        print(f"\npatch plot: {path}")
    except ImportError:
        pass
    if not args.no_imagenet:
        imagenet_scale_latency(out, 10 if args.quick else 30, args.repeats)


if __name__ == "__main__":
    main()
