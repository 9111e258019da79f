"""Stage-wise training of a multi-exit network: each stage learns for its own exit while the stages before it are
frozen -- the way a cascade's members are trained one by one, except that every stage reads what the stages before
it computed.

Joint training (the sum of the exits' losses, or IMTA's recipe) makes the exits compete for the shared features:
the first exit of a width-wise multi-stage network came out 5 points above the static network of its cost while
the last came out 5 points below the static network it should match (docs/choosing.md). In the width-wise
network (:mod:`dyncnn.models.multi_stage`) an earlier stage's channels are only *read* by later stages, so training
stage ``k`` alone leaves every earlier exit exactly as it was: exit 0 is a static network of stage 0's widths
trained on its own, and exit ``k`` adds what stage ``k``'s new channels learn from the image *and* from every
earlier stage's features, which the cascade's ``k``-th member would recompute from scratch. On exits attached to one
backbone, stage-wise training leaves the later exits only the features the earlier exits' objective kept (the
backbone's trunk is frozen after the first stage): use it for width-wise stages.

Each stage trains for ``config.epochs`` epochs (the budget of a cascade whose members each get the static networks'
epochs), with the frozen stages in eval mode (their normalization layers keep the statistics inference uses), and
checkpoints in ``out_dir/stage{k}`` (an interrupted run resumes at the stage and step it reached); the whole
network is written to ``out_dir/last.safetensors`` at the end.

The recipe of a multi-exit network built with ``stagewise=True`` (``create_model("multi_stage", stagewise=True)``,
``dyncnn train --model multi_stage --cfg stagewise=true``); every other multi-exit network trains in one Trainer
run. ``fit_stagewise`` runs it on any multi-exit network.
"""
from __future__ import annotations

import time
from dataclasses import asdict
from pathlib import Path
from typing import Callable

import torch
from torch import Tensor, nn

from ...dynamic.exits import MultiExitNetwork
from ...errors import DyncnnError
from ..checkpoint import save_checkpoint
from ..trainer import TrainConfig, Trainer, TrainResult
from . import register_recipe


def _check_multi_exit(net: nn.Module) -> None:
    if not isinstance(net, MultiExitNetwork):
        raise DyncnnError(f"stage-wise training needs a multi-exit network (stages and exit heads), got "
                          f"{type(net).__name__}")


class StageObjective(nn.Module):
    """Stage ``k`` of a multi-exit network ``net`` as a network to train: the stages before it run frozen (no
    gradient; eval mode, so that they give the features inference will give), then stage ``k`` and its exit head.
    Returns exit ``k``'s logits. Only stage ``k``'s and head ``k``'s parameters require a gradient while it exists;
    :meth:`release` makes every parameter of ``net`` trainable again."""

    def __init__(self, net: MultiExitNetwork, k: int):
        super().__init__()
        _check_multi_exit(net)
        if isinstance(k, bool) or not isinstance(k, int) or not 0 <= k < net.num_exits:
            raise ValueError(f"stage must be an int in [0, {net.num_exits - 1}], got {k!r}")
        self.net, self.k = net, k
        trained = {id(p) for m in (net.stages[k], net.heads[k]) for p in m.parameters()}
        for p in net.parameters():
            p.requires_grad_(id(p) in trained)

    def train(self, mode: bool = True) -> "StageObjective":
        super().train(mode)
        for m in list(self.net.stages[:self.k]) + list(self.net.heads[:self.k]):
            m.eval()
        return self

    def forward(self, x: Tensor) -> Tensor:
        net = self.net
        with torch.no_grad():
            state = net.initial_state(x)
            for stage in net.stages[:self.k]:
                state = stage(state)
        return net.heads[self.k](net.stages[self.k](state))

    def release(self) -> None:
        for p in self.net.parameters():
            p.requires_grad_(True)


def fit_stagewise(model: MultiExitNetwork, train_set, val_set, config: TrainConfig, out_dir: str | Path | None = None,
                  resume: bool = True, extra: dict | None = None,
                  log: Callable[[str], object] | None = print) -> TrainResult:
    """Train ``model``'s stages one after another (see the module docstring). The result's history has one record
    per epoch of every stage (``"stage"``: its index; ``val_acc``: that stage's exit), ``final_val_acc`` is the
    last exit's; the model comes back with every parameter trainable."""
    if config.freeze:
        raise ValueError(f"stage-wise training freezes the earlier stages itself: drop freeze={config.freeze!r}")
    _check_multi_exit(model)
    out = Path(out_dir) if out_dir is not None else None
    results: list[TrainResult] = []
    start = time.perf_counter()
    for k in range(model.num_exits):
        objective = StageObjective(model, k)
        try:
            result = Trainer(objective, train_set, val_set, config, out_dir=out / f"stage{k}" if out else None,
                             extra=extra).fit(resume=resume)
        finally:
            objective.release()
        results.append(result)
        if log:
            log(f"stage {k + 1}/{model.num_exits}: exit {k} val acc {result.final_val_acc:.4f} "
                f"({result.seconds:.0f} s)")
    history = [{**h, "stage": k} for k, r in enumerate(results) for h in r.history]
    combined = TrainResult(history=history, best_val_acc=results[-1].best_val_acc,
                           final_val_acc=results[-1].final_val_acc, steps=sum(r.steps for r in results),
                           seconds=time.perf_counter() - start)
    if out is not None:
        state = {"step": combined.steps, "epoch": config.epochs, "history": history, "config": asdict(config),
                 "stagewise": True}
        save_checkpoint(out / "last.safetensors", model, None, state, extra=extra)
    return combined


@register_recipe(MultiExitNetwork)
def fit_multi_exit(model: MultiExitNetwork, train_set, val_set, config: TrainConfig, out_dir=None,
                   resume: bool = False, extra: dict | None = None) -> TrainResult:
    """Stage by stage when the network was built with ``stagewise=True``, else one Trainer run."""
    if getattr(model, "stagewise", False):
        return fit_stagewise(model, train_set, val_set, config, out_dir, resume=resume, extra=extra)
    return Trainer(model, train_set, val_set, config, out_dir=out_dir, extra=extra).fit(resume=resume)
