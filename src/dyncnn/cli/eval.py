"""``dyncnn eval``: accuracy of a checkpoint on a data split (executed dynamic inference, budgets, anytime)."""
from __future__ import annotations

import json

from ..errors import DyncnnError
from .common import _add_data_args, _data_cfg_for, _dataset, _device, _file_sha256, _not_a_bundle


def add_parser(sub) -> None:
    p = sub.add_parser("eval", help="accuracy of a checkpoint on a data split",
                       description="Evaluate CHECKPOINT on a split of the dataset it was trained on (or --dataset).")
    p.add_argument("checkpoint", help="a .safetensors checkpoint written by `dyncnn train`")
    _add_data_args(p)
    p.add_argument("--split", default="test", choices=["train", "val", "test"], help="data split evaluated")
    p.add_argument("--dataset-override", action="store_true",
                   help="use --dataset/--data-root instead of the dataset recorded in the checkpoint")
    p.add_argument("--budget", default=None, metavar="THRESHOLDS_JSON",
                   help="real early-exit evaluation with thresholds from `dyncnn calibrate`")
    p.add_argument("--anytime", action="store_true", help="accuracy of every exit with its cumulative MACs")
    p.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda, cuda:N or mps")
    p.add_argument("--json", action="store_true", help="print JSON instead of text")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..train import evaluate, load_checkpoint
    _not_a_bundle(args.checkpoint, "a training checkpoint")
    model, meta = load_checkpoint(args.checkpoint)
    model.to(_device(args))          # evaluation follows the model's device
    data_cfg = _data_cfg_for(args, meta)
    dataset = _dataset(args, args.split, data_cfg)
    if args.budget or args.anytime:
        return _eval_dynamic(args, model, dataset)
    from ..dynamic.evaluation import evaluate_dynamic, format_dynamic
    from ..dynamic.protocols import is_gated
    if is_gated(model):       # layer skipping, channel gating, experts, routing, pixel masks: executed inference
        result = evaluate_dynamic(model, dataset, progress=True)
        result.update(checkpoint=str(args.checkpoint), split=args.split, dataset=data_cfg["name"])
        print(json.dumps(result, indent=2) if args.json else
              f"{args.checkpoint}: {data_cfg['name']} {args.split}: " + format_dynamic(result))
        return 0
    result = evaluate(model, dataset)
    result.update(checkpoint=str(args.checkpoint), split=args.split, dataset=data_cfg["name"])
    print(json.dumps(result, indent=2) if args.json else
          f"{args.checkpoint}: {data_cfg['name']} {args.split}: accuracy {result['acc']:.4f}, "
          f"loss {result['loss']:.4f} on {result['n']} samples")
    return 0


def _eval_dynamic(args, model, dataset) -> int:
    import torch
    from torch.utils.data import DataLoader

    from ..dynamic.budget import anytime, collect_exit_logits
    from ..dynamic.calibration import load_thresholds
    from ..dynamic.protocols import HasExits
    if not isinstance(model, HasExits):
        raise DyncnnError(f"--budget/--anytime need a multi-exit network; {type(model).__name__} has no exits")
    out: dict = {"checkpoint": str(args.checkpoint), "split": args.split}
    if args.anytime:
        logits, targets = collect_exit_logits(model, dataset)
        cum = model.exit_macs(dataset[0][0].unsqueeze(0).to(next(model.parameters()).device))
        out["anytime"] = [{"exit": k + 1, "macs": m, "accuracy": a}
                          for k, (m, a) in enumerate(anytime(logits.argmax(-1) == targets, cum))]
    if args.budget:
        policy, record = load_thresholds(args.budget, model, checkpoint_sha256=_file_sha256(args.checkpoint))
        correct, macs, exits = 0, [], []
        device = next(model.parameters()).device
        for x, y in DataLoader(dataset, batch_size=256):
            r = model.infer(x.to(device), policy)
            correct += int((r.logits.argmax(1).cpu() == torch.as_tensor(y)).sum())
            macs.append(r.macs.cpu())
            exits.append(r.exit_index.cpu())
        macs, exits = torch.cat(macs), torch.cat(exits)
        out["budget"] = {"thresholds_file": str(args.budget), "accuracy": correct / len(macs),
                         "mean_macs": float(macs.double().mean()), "full_macs": record["exit_macs"][-1],
                         "exit_histogram": torch.bincount(exits, minlength=model.num_exits).tolist(),
                         "n": len(macs)}
    if args.json:
        print(json.dumps(out, indent=2))
        return 0
    if "anytime" in out:
        print("| exit | cumulative MACs | accuracy |\n|---|---|---|")
        for r in out["anytime"]:
            print(f"| {r['exit']} | {r['macs'] / 1e6:.3f}M | {r['accuracy']:.4f} |")
    if "budget" in out:
        b = out["budget"]
        print(f"budgeted ({args.budget}): accuracy {b['accuracy']:.4f}, mean MACs {b['mean_macs'] / 1e6:.3f}M "
              f"({b['mean_macs'] / b['full_macs']:.0%} of full depth), exits {b['exit_histogram']} on {b['n']} samples")
    return 0
