"""Pixel-level sparse execution (DynConv): measured speedup per block, and accuracy against MACs on ScaledMNIST.

Part 1 (always): one residual block at CIFAR-ish sizes, dense (``block(x)``) against sparse execution of the same
block (``sparse_block_forward``) with a given mask, at 25% and 50% active positions, batch 1 and 32, eager
PyTorch on ``--threads`` threads. Masks are spatially coherent blobs (a smooth random field thresholded at the
per-sample quantile), as DynConv's learned masks are; the first unit runs on the mask dilated by the kernel, so
the MAC speedup counts the dilated positions. "ratio" = measured speedup / MAC speedup (the aim: >= 0.6 at 25%).
The mask unit is not included on either side (it is a 1x1 conv to one channel, < 1% of a block).
With ``--optimize`` the dense block is timed as eager deployment would run it (``optimize_for_inference``:
BatchNorm folded, channels-last weights) on a channels-last input, as activations are in an optimized network;
the sparse path gets the same input and always folds BatchNorm into its kernels.

Part 2 (``--train``): on ScaledMNIST (canvas 64), the static tiny backbone is trained, then DynConv models start
from its weights and fine-tune with masks at budgets 0.25 / 0.5 / 0.75; test accuracy against mean executed MACs
(``evaluate_dynamic``: the ledger's MACs of sparse inference).

    python benchmarks/bench_sparse_conv.py [--quick] [--threads 2] [--optimize] [--train] [--backbone resnet|...]
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch
import torch.nn.functional as F

from dyncnn.dynamic.spatial import gated_branch, sparse_block_forward
from dyncnn.layers.fusion import optimize_for_inference
from dyncnn.layers.sparse_conv import dilate_mask
from dyncnn.models.mobilenet import InvertedResidual, InvertedResidualCfg
from dyncnn.models.resnet import BasicBlock
from dyncnn.profile.latency import retain_freed_memory


def timed_pair(fa, fb, repeats: int, warmup: int = 5) -> tuple[float, float]:
    """Median wall time of ``fa`` and of ``fb``, interleaved run by run so that load changes hit both alike."""
    for _ in range(warmup):
        fa()
        fb()
    ta, tb = [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fa()
        t1 = time.perf_counter()
        fb()
        t2 = time.perf_counter()
        ta.append(t1 - t0)
        tb.append(t2 - t1)
    return statistics.median(ta), statistics.median(tb)


def blob_mask(n: int, h: int, w: int, density: float, seed: int = 0) -> torch.Tensor:
    """Spatially coherent mask with exactly round(density * h * w) active positions per sample."""
    g = torch.Generator().manual_seed(seed)
    field = torch.randn(n, 1, max(h // 8, 2), max(w // 8, 2), generator=g)
    field = F.interpolate(field, size=(h, w), mode="bicubic", align_corners=False).flatten(1)
    k = max(1, round(density * h * w))
    idx = field.topk(k, dim=1).indices
    return torch.zeros(n, h * w, dtype=torch.bool).scatter_(1, idx, True).view(n, h, w)


BLOCKS = {
    "basic 32ch 32x32": (lambda: BasicBlock(32, 32), 32, 32),
    "basic 64ch 16x16": (lambda: BasicBlock(64, 64), 64, 16),
    "inverted 32->192->32 32x32": (lambda: InvertedResidual(InvertedResidualCfg(32, 192, 32, act="relu6")), 32, 32),
    "inverted 64->384->64 16x16": (lambda: InvertedResidual(InvertedResidualCfg(64, 384, 64, act="relu6")), 64, 16),
}


def block_table(batches: list[int], densities: list[float], repeats: int, optimize: bool = False) -> None:
    """Prints the table row by row (a row per block, batch and density)."""
    print("| block | batch | active | dilated | MAC speedup | dense ms | sparse ms | speedup | ratio |\n"
          "|---|---|---|---|---|---|---|---|---|", flush=True)
    for name, (make, c, s) in BLOCKS.items():
        block = make().eval()
        g = gated_branch(block)
        full = sum(g.unit_macs(s, s))
        dense = optimize_for_inference(block) if optimize else block
        for n in batches:
            x = torch.randn(n, c, s, s).relu()
            xd = x.contiguous(memory_format=torch.channels_last) if optimize else x
            with torch.no_grad():
                for d in densities:
                    mask = blob_mask(n, s, s, d, seed=n)
                    _, macs = sparse_block_forward(g, x, mask)
                    mac_speedup = full * n / float(macs.sum())
                    dil = float(dilate_mask(mask, g.dilation).float().mean()) if g.split > 0 else float(d)
                    t_dense, t_sparse = timed_pair(lambda: dense(xd), lambda: sparse_block_forward(g, xd, mask),
                                                   repeats if n == 1 else max(5, repeats // 5))
                    sp = t_dense / t_sparse
                    print(f"| {name} | {n} | {d:.0%} | {dil:.0%} | {mac_speedup:.2f}x | {t_dense * 1e3:.3f} "
                          f"| {t_sparse * 1e3:.3f} | {sp:.2f}x | {sp / mac_speedup:.2f} |", flush=True)


# --- part 2: accuracy against MACs on ScaledMNIST ----------------------------------------------------------------

def train_table(backbone: str, budgets: list[float], epochs: int, ft_epochs: int, quick: bool,
                ft_lr: float = 0.02, plot_dir: str | None = None, static_ckpt: str | None = None) -> str:
    from dyncnn.data import ScaledMNIST
    from dyncnn.dynamic.evaluation import evaluate_dynamic
    from dyncnn.models.dynconv import DynConvCfg, DynConvNet, tiny_mobilenet_v2_mnist, tiny_resnet_mnist
    from dyncnn.profile.macs import count_macs
    from dyncnn.train.trainer import TrainConfig, Trainer, evaluate

    make = tiny_resnet_mnist if backbone == "resnet" else tiny_mobilenet_v2_mnist
    train, val = ScaledMNIST("train", canvas=64), ScaledMNIST("val", canvas=64)
    test = ScaledMNIST("test", canvas=64)
    if quick:
        train = torch.utils.data.Subset(train, range(512))
        test = torch.utils.data.Subset(test, range(200))
    torch.manual_seed(0)
    static = make()
    out = tempfile.mkdtemp(prefix="bench_sparse_")
    t0 = time.perf_counter()
    if static_ckpt:
        from dyncnn.train.checkpoint import load_checkpoint
        load_checkpoint(static_ckpt, static)
    else:
        Trainer(static, train, val, TrainConfig(device="cpu", epochs=epochs, batch_size=64, lr=0.05, progress=False),
                f"{out}/static").fit()
        print(f"static checkpoint: {out}/static/best.safetensors")
    t_static = time.perf_counter() - t0
    static.eval()
    acc = evaluate(static, test)["acc"]
    macs = count_macs(static, test[0][0].unsqueeze(0)).total
    rows = [f"| static {backbone} | - | {acc:.4f} | {macs / 1e6:.3f}M | 100% | - | {t_static:.0f}s |"]
    for b in budgets:
        torch.manual_seed(0)
        model = DynConvNet(make(), DynConvCfg(budget=b))
        model.backbone.load_state_dict(static.state_dict())
        t0 = time.perf_counter()
        Trainer(model, train, val, TrainConfig(device="cpu", epochs=ft_epochs, batch_size=64, lr=ft_lr, progress=False),
                f"{out}/b{b}").fit()
        t_ft = time.perf_counter() - t0
        r = evaluate_dynamic(model, test)
        if plot_dir:
            from dyncnn.viz.spatial_plots import plot_model_masks
            imgs = torch.stack([test[i][0] for i in range(6)])
            print(f"mask overlays: {plot_model_masks(model, imgs, f'{plot_dir}/dynconv_{backbone}_b{b}.png', 6)}")
        rate = ", ".join(f"{v:.2f}" for v in r["active_fraction"])
        rows.append(f"| dynconv {backbone} | {b} | {r['accuracy']:.4f} | {r['mean_macs'] / 1e6:.3f}M "
                    f"| {r['mean_macs'] / macs:.0%} | {rate} | {t_ft:.0f}s |")
    head = ["| model | budget | test acc | mean MACs | of static | active fraction per gated block | train time |",
            "|---|---|---|---|---|---|---|"]
    return "\n".join(head + rows)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="fewer repeats / blocks / epochs (a smoke run)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=None)
    p.add_argument("--optimize", action="store_true",
                   help="time the dense block BatchNorm-folded and channels-last (optimize_for_inference)")
    p.add_argument("--train", action="store_true", help="also train and evaluate models on ScaledMNIST")
    p.add_argument("--backbone", choices=("resnet", "mobilenet_v2"), default="resnet")
    p.add_argument("--epochs", type=int, default=None, help="static backbone epochs")
    p.add_argument("--ft-epochs", type=int, default=None, help="DynConv fine-tuning epochs per budget")
    p.add_argument("--skip-blocks", action="store_true", help="only the --train part")
    p.add_argument("--plot-dir", default=None, help="save mask overlays of each trained model here")
    p.add_argument("--static-ckpt", default=None, help="reuse a trained static backbone (printed by a --train run)")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    torch.set_flush_denormal(True)
    retain_freed_memory()      # large activations reused, not page-faulted in again per call
    if not a.skip_blocks:
        reps = a.repeats or (10 if a.quick else 100)
        dense = "optimize_for_inference" if a.optimize else "as built"
        print(f"## sparse vs dense block ({dense}), eager PyTorch, {a.threads} threads, median of {reps} runs at "
              f"batch 1, {max(5, reps // 5)} at batch 32 (interleaved)\n")
        block_table([1] if a.quick else [1, 32], [0.25, 0.5], reps, a.optimize)
    if a.train:
        torch.set_num_threads(1)
        epochs = a.epochs or (1 if a.quick else 6)
        ft = a.ft_epochs or (1 if a.quick else 3)
        print(f"\n## ScaledMNIST (canvas 64): static {epochs} epochs, DynConv fine-tuned {ft} epochs from it, "
              f"1 thread\n")
        print(train_table(a.backbone, [0.25, 0.5, 0.75], epochs, ft, a.quick, plot_dir=a.plot_dir,
                          static_ckpt=a.static_ckpt))


if __name__ == "__main__":
    main()
