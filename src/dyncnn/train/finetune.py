"""Fine-tuning exits on a pretrained backbone: freeze the backbone, train the exits, then unfreeze.

The recipe (``TrainConfig(freeze="backbone", freeze_epochs=N)``, ``dyncnn train --freeze backbone
--freeze-epochs N``): for the first N epochs only the exit heads and the model's own classifier learn -- the
backbone's parameters get no gradient and its normalization layers keep their pretrained statistics (eval mode),
so the exits learn on the very features inference will give them; then everything is trained together, usually at
a lower learning rate. Without ``freeze_epochs`` the backbone stays frozen for the whole run (linear probing of
the exits). The classifier stays trainable because a pretrained network fine-tuned on new classes gets a freshly
initialised one (:mod:`dyncnn.models.pretrained`).
"""
from __future__ import annotations

from torch import nn

from ..dynamic.split import NORMS
from ..errors import DyncnnError
from ..models.pretrained import classifier_path

FREEZE_CHOICES = ("backbone",)


def trainable_when_frozen(model: nn.Module) -> list[nn.Module]:
    """The modules that keep learning while the backbone is frozen: the exit heads of a multi-exit network and
    the classifier of the model (of the backbone exits were attached to, which holds the last exit's)."""
    keep: list[nn.Module] = list(getattr(model, "heads", None) or [])
    owner = getattr(model, "source_backbone", None)
    owner = owner if isinstance(owner, nn.Module) else model
    path = classifier_path(owner)
    if path is not None:
        keep.append(owner.get_submodule(path))
    return keep


def set_backbone_frozen(model: nn.Module, frozen: bool) -> int:
    """Freeze (``frozen=True``) or unfreeze every parameter of ``model`` outside :func:`trainable_when_frozen`;
    frozen normalization layers are put in eval mode (call it after ``model.train()``). Returns the number of
    parameters (elements) frozen."""
    keep = trainable_when_frozen(model)
    kept_params = {id(p) for m in keep for p in m.parameters()}
    kept_modules = {id(m) for k in keep for m in k.modules()}
    if frozen and not kept_params:
        raise DyncnnError(f"cannot freeze the backbone of {type(model).__name__}: found no exit heads or classifier "
                          f"to train")
    count = 0
    for p in model.parameters():
        if id(p) not in kept_params:
            p.requires_grad_(not frozen)
            count += p.numel() if frozen else 0
    if frozen:
        for m in model.modules():
            if isinstance(m, NORMS) and id(m) not in kept_modules:
                m.eval()
    return count


def check_freeze(freeze: str | None, freeze_epochs: int | None) -> None:
    if freeze is not None and freeze not in FREEZE_CHOICES:
        raise ValueError(f"freeze must be one of {FREEZE_CHOICES} or None, got {freeze!r}")
    if freeze_epochs is not None and (freeze is None or freeze_epochs < 0):
        raise ValueError(f"freeze_epochs needs freeze='backbone' and a value >= 0, got {freeze_epochs!r}")
