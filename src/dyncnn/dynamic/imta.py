"""IMTA, the improved training of multi-exit networks (Li, Huang et al., "Improved Techniques for Training Adaptive
Deep Networks", ICCV 2019), as one recipe for every :class:`~dyncnn.dynamic.exits.MultiExitNetwork` (exits on any
backbone, MSDNet, RANet, the multi-stage network):

- **gradient equilibrium**: the gradient flowing back into the shared trunk at exit k of K is rescaled (1/(K-k)
  from exit k's head, (K-k-1)/(K-k) from the later exits), so that the trunk's gradient does not grow with the
  number of exits behind it (``MultiExitNetwork.gradient_equilibrium``); with forward transfer, what the later
  exits send back through exit k's logits enters the trunk through exit k's head, at that head's 1/(K-k);
- **forward knowledge transfer**: every exit after the first also reads the previous exit's logits
  (``MultiExitNetwork.use_forward_transfer``); inference stays executed (the previous exit's logits are already
  computed when exit k runs) and bundles export it unchanged;
- **inline distillation**: each exit is distilled from the next, deeper one (``teacher="next"``; ``"last"`` is the
  official code's one-for-all distillation from the final exit), by :class:`~dyncnn.dynamic.losses.MultiExitLoss`.

The paper trains the backbone with gradient equilibrium first and the transfer and distillation afterwards, on the
frozen backbone; here the three are one joint run, so that one ``Trainer`` run (and ``dyncnn train``) trains it. The
model owns its training loss (``model.training_loss``, the trainer's :class:`~dyncnn.dynamic.protocols.OwnTrainingLoss`
hook), so ``create_model(name, imta=True)`` is all it takes.
"""
from __future__ import annotations

from dataclasses import dataclass, fields

from torch import nn

from .losses import MultiExitLoss


@dataclass(frozen=True)
class IMTA:
    """The recipe's settings; the defaults are the ones the frontier trains with."""
    gradient_equilibrium: bool = True
    forward_transfer: bool = True
    transfer_hidden: int = 128          # units of the transfer from the previous exit's logits (official: 128)
    distill: float = 1.0                # weight of the distillation term (alpha)
    temperature: float = 3.0            # distillation temperature T (the term is scaled by T^2)
    teacher: str = "next"               # "next": each exit learns from the next one; "last": from the final exit
    label_smoothing: float = 0.0        # of the cross-entropy terms (the model's own loss: not the trainer's)
    weights: tuple[float, ...] | None = None     # per-exit weights of the loss terms (default 1 each)

    def __post_init__(self):
        if self.weights is not None:
            object.__setattr__(self, "weights", tuple(float(w) for w in self.weights))
        self.loss()                       # checks distill, temperature, teacher and label smoothing
        if not isinstance(self.transfer_hidden, int) or isinstance(self.transfer_hidden, bool) \
                or self.transfer_hidden < 1:
            raise ValueError(f"imta transfer_hidden must be an integer >= 1, got {self.transfer_hidden!r}")

    @classmethod
    def of(cls, value) -> "IMTA | None":
        """``True`` (the defaults), a dict of settings, an IMTA, or ``None`` / ``False`` (no recipe)."""
        if value is None or value is False:
            return None
        if value is True:
            return cls()
        if isinstance(value, cls):
            return value
        if isinstance(value, dict):
            valid = [f.name for f in fields(cls)]
            unknown = sorted(set(value) - set(valid))
            if unknown:
                raise ValueError(f"imta has no setting {', '.join(map(repr, unknown))} (valid: {', '.join(valid)})")
            return cls(**value)
        raise ValueError(f"imta expects true, false or a dict of settings ({', '.join(f.name for f in fields(cls))}),"
                         f" got {value!r}")

    def loss(self) -> MultiExitLoss:
        return MultiExitLoss(weights=self.weights, distill=self.distill, temperature=self.temperature,
                             label_smoothing=self.label_smoothing, teacher=self.teacher)


def apply_imta(model: nn.Module, imta) -> nn.Module:
    """Set the IMTA recipe ``imta`` (see :meth:`IMTA.of`) on a newly built multi-exit network: gradient
    equilibrium, forward knowledge transfer, and ``model.training_loss`` (the loss the trainer then uses). Returns
    the model; ``imta`` None or False leaves it as it is."""
    from .exits import MultiExitNetwork
    recipe = IMTA.of(imta)
    if recipe is None:
        return model
    if not isinstance(model, MultiExitNetwork):
        raise ValueError(f"the IMTA recipe trains multi-exit networks (MultiExitNetwork), got {type(model).__name__}")
    if model.num_exits < 2:
        raise ValueError(f"the IMTA recipe needs at least 2 exits, {type(model).__name__} has {model.num_exits}")
    if recipe.weights is not None and len(recipe.weights) != model.num_exits:
        raise ValueError(f"imta weights: {len(recipe.weights)} for {model.num_exits} exits")
    model.gradient_equilibrium = recipe.gradient_equilibrium
    if recipe.forward_transfer:
        model.use_forward_transfer(recipe.transfer_hidden)
    model.training_loss = recipe.loss()
    model.imta = recipe
    return model
