"""Evaluation of gated dynamic models (layer skipping, channel gating, experts, routing, pixel masks, ...).

These models share one inference contract (see :class:`~dyncnn.dynamic.protocols.DynamicModel`): ``infer(x)`` returns an ``ExitResult`` whose
``macs`` are the MACs each sample really ran and whose ``choices`` (N, D) are the per-sample decisions (1 = that
block / channel group / expert ran, or the fraction of positions that ran). A model whose decisions pick one of
several options (a routing network's path per cell) returns the index taken per decision and names the options in
``choice_options``; its rates are reported per option (one-hot per decision). ``full_macs(x)`` is the per-sample
cost with every gate on.
"""
from __future__ import annotations

import torch
from torch import Tensor
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
    correct, macs, choices = 0, [], []
    try:
        for x, y in tqdm(DataLoader(dataset, batch_size=batch_size), disable=None if progress else True,
                         desc="eval", leave=False):
            r = model.infer(x.to(device))
            correct += int((r.logits.argmax(1).cpu() == torch.as_tensor(y)).sum())
            macs.append(r.macs.cpu())
            if r.choices is not None:
                choices.append(_one_hot(model, r.choices.cpu()))
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
            options = getattr(model, "choice_options", None)
            out["decision_names"] = [f"{n}.{o}" for n in names for o in options] if options else list(names)
    return out


def _one_hot(model, choices: Tensor) -> Tensor:
    """(N, D) decisions as (N, D * options) 0/1 for models whose choices are option indices, else as floats."""
    options = getattr(model, "choice_options", None)
    if not options:
        return choices.float()
    return torch.nn.functional.one_hot(choices.long(), len(options)).flatten(1).float()


def format_dynamic(result: dict) -> str:
    lines = [f"accuracy {result['accuracy']:.4f}, mean MACs {result['mean_macs'] / 1e6:.3f}M "
             f"({result['macs_fraction']:.0%} of {result['full_macs'] / 1e6:.3f}M with every gate on), "
             f"10/50/90% quantiles " + " / ".join(f"{v / 1e6:.3f}M" for v in result["macs_quantiles"].values())
             + f" on {result['n']} samples"]
    if "choice_rate" in result:
        names = result.get("decision_names") or [str(i) for i in range(len(result["choice_rate"]))]
        lines.append("decision rates: " + ", ".join(f"{n}={r:.2f}" for n, r in zip(names, result["choice_rate"])))
    return "\n".join(lines)
