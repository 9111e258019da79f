"""Evaluation of gated dynamic models (layer skipping, channel gating, experts, routing, pixel masks, ...).

These models share one inference contract (see :class:`~dyncnn.dynamic.protocols.DynamicModel`): ``infer(x)``
returns an ``ExitResult`` whose ``macs`` are the MACs each sample really ran and whose ``choices`` (N, D) are the
per-sample 0/1 decisions named by the model's ``decision_names`` (1 = that block / channel group / expert / step
ran; a routing cell's path is one-hot over its paths), so their mean is the rate of each decision. DynConv's share
of active positions per block is reported apart (``fractions`` -> ``active_fraction``). ``full_macs(x)`` is the
per-sample cost with every gate on.
"""
from __future__ import annotations

import torch
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from ..errors import DyncnnError


@torch.no_grad()
def evaluate_dynamic(model, dataset: Dataset, batch_size: int = 256, progress: bool = False) -> dict:
    """Accuracy, mean / quantile MACs and the rate of every decision of ``model.infer`` over ``dataset`` (on the
    device of the model's parameters)."""
    from .executor import module_device
    if len(dataset) == 0:
        raise DyncnnError("cannot evaluate on an empty dataset")
    device = module_device(model)
    was_training = model.training
    model.eval()
    correct, macs, choices, fractions = 0, [], [], []
    try:
        for x, y in tqdm(DataLoader(dataset, batch_size=batch_size), disable=None if progress else True,
                         desc="eval", leave=False):
            r = model.infer(x.to(device))
            correct += int((r.logits.argmax(1).cpu() == torch.as_tensor(y)).sum())
            macs.append(r.macs.cpu())
            if r.choices is not None:
                choices.append(r.choices.cpu().float())
            if r.fractions is not None:
                fractions.append(r.fractions.cpu().float())
        full = int(model.full_macs(dataset[0][0].unsqueeze(0).to(device)))
    finally:
        model.train(was_training)
    macs_t = torch.cat(macs).double()
    out = {"accuracy": correct / len(macs_t), "mean_macs": float(macs_t.mean()), "full_macs": full,
           "macs_fraction": float(macs_t.mean()) / full,
           "macs_quantiles": {q: float(macs_t.quantile(q)) for q in (0.1, 0.5, 0.9)}, "n": len(macs_t)}
    if choices:
        c = torch.cat(choices)
        out["choice_rate"] = [round(float(v), 4) for v in c.mean(0)]
        names = getattr(model, "decision_names", None)
        if names is not None:
            out["decision_names"] = list(names)
    if fractions:
        out["active_fraction"] = [round(float(v), 4) for v in torch.cat(fractions).mean(0)]
    return out


def format_dynamic(result: dict) -> str:
    lines = [f"accuracy {result['accuracy']:.4f}, mean MACs {result['mean_macs'] / 1e6:.3f}M "
             f"({result['macs_fraction']:.0%} of {result['full_macs'] / 1e6:.3f}M with every gate on), "
             f"10/50/90% quantiles " + " / ".join(f"{v / 1e6:.3f}M" for v in result["macs_quantiles"].values())
             + f" on {result['n']} samples"]
    for key, title in (("choice_rate", "decision rates"), ("active_fraction", "active positions")):
        if key in result:
            names = result.get("decision_names") or [str(i) for i in range(len(result[key]))]
            lines.append(f"{title}: " + ", ".join(f"{n}={r:.2f}" for n, r in zip(names, result[key])))
    return "\n".join(lines)
