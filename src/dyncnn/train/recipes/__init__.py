"""Training recipes: how a model family is trained when one plain :class:`~dyncnn.train.Trainer` run is not enough.

A recipe is a function ``fit(model, train_set, val_set, config, out_dir=None, resume=False, extra=None, **options)
-> TrainResult`` registered for a model class with :func:`register_recipe`; :func:`fit_model` runs the recipe of
the model's class (the nearest registered base class), or one Trainer run for every other model. ``dyncnn train``
calls :func:`fit_model`, so a family with stages is trained the same way from the command line and from Python.

- :mod:`.blockdrop`: BlockDrop's two phases (the policy on the frozen backbone, then jointly);
- :mod:`.skipnet`: SkipNet's hybrid reinforcement-learning fine-tuning (REINFORCE on the gate decisions);
- :mod:`.glance`: GFNet's three stages (random patches, PPO on the patch policy, fine-tuning);
- :mod:`.temporal`: AdaFocus's three stages (random patches, PPO or end-to-end, fine-tuning);
- :mod:`.stagewise`: a multi-exit network built with ``stagewise=True`` (the width-wise multi-stage network), one
  stage at a time for its own exit, the earlier stages frozen.

Models keep their training-mode ``forward``, ``training_loss`` and ``regularization_loss`` (the Trainer calls them);
what lives here is the loop around them, so that the model packages never import the trainer.
"""
from __future__ import annotations

import importlib
from pathlib import Path
from typing import Callable

import torch
from torch import Tensor, nn

_RECIPES: dict[type, Callable] = {}
_MODULES = ("blockdrop", "glance", "temporal", "stagewise")      # the modules that register a recipe


def register_recipe(cls: type) -> Callable[[Callable], Callable]:
    """Register the decorated function as the recipe of model class ``cls`` (and of its subclasses)."""
    def deco(fn: Callable) -> Callable:
        if cls in _RECIPES and _RECIPES[cls] is not fn:
            raise ValueError(f"{cls.__name__} already has a training recipe ({_RECIPES[cls].__name__})")
        _RECIPES[cls] = fn
        return fn
    return deco


def recipe_for(model: nn.Module) -> Callable | None:
    """The recipe registered for ``model``'s class or its nearest registered base class; None: a plain Trainer."""
    for mod in _MODULES:
        importlib.import_module(f"{__name__}.{mod}")
    model = getattr(model, "module", model)         # DistributedDataParallel
    for cls in type(model).__mro__:
        if cls in _RECIPES:
            return _RECIPES[cls]
    return None


def fit_model(model: nn.Module, train_set, val_set, config, out_dir: str | Path | None = None, resume: bool = False,
              extra: dict | None = None, **options):
    """Train ``model`` with its family's recipe (``options`` go to it), or with one Trainer run."""
    recipe = recipe_for(model)
    if recipe is None:
        if options:
            raise TypeError(f"{type(model).__name__} trains with a plain Trainer run, which takes no options "
                            f"{sorted(options)}")
        from ..trainer import Trainer
        return Trainer(model, train_set, val_set, config, out_dir=out_dir, extra=extra).fit(resume=resume)
    return recipe(model, train_set, val_set, config, out_dir=out_dir, resume=resume, extra=extra, **options)


def collate(dataset, idx: list[int]) -> tuple[Tensor, Tensor]:
    """The batch of ``dataset`` items ``idx``: stacked inputs and integer targets (the recipes' own loops)."""
    items = [dataset[i] for i in idx]
    return torch.stack([it[0] for it in items]), torch.as_tensor([int(it[1]) for it in items])


__all__ = ["collate", "fit_model", "recipe_for", "register_recipe"]
